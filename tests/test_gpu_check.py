"""The GPU device check's parts that run anywhere: the speedrun config, the report writer, the packed
archive (when `make gpu-pack` has run) and the shell script's syntax. The check itself needs a GPU machine
(`make gpu-check`); `make gpu-check-dry` runs it at toy sizes on a CPU."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.gpu_report import main as report

ROOT = Path(__file__).resolve().parents[1]


def test_speedrun_config_loads_and_is_the_whole_module():
    from cluster.config import from_dict, read_yaml
    from cluster.run import build_job
    from eval.config import EvalConfig
    from pipeline.config import PipelineConfig
    from train.config import TrainConfig
    from train.model import TINY_CONFIGS

    raw = read_yaml(ROOT / "configs/speedrun.yaml")
    build_job(str(ROOT / "configs/speedrun.yaml"), {})
    p = from_dict(PipelineConfig, raw["pipeline"], "pipeline")
    t = from_dict(TrainConfig, raw["train"], "train")
    e = from_dict(EvalConfig, raw["eval"], "eval")
    assert p.source == "generate" and p.modules == ["algebra__linear_1d"] and p.tokenizer == "char"
    assert 3 * p.train_rows_per_regime == 1_999_998 and p.test_rows == 10_000
    assert t.model in TINY_CONFIGS and t.use_gpu and t.num_workers == 1 and t.data == p.output
    assert t.micro_batch == t.global_batch_size and t.grad_accum == 1
    # one micro batch of the whole global batch must fit an 80 GB H100 (the planner's estimate, which is
    # just above the measured peak: tests/test_train_bucket.py) at the longest lengths
    from train.plan import estimate

    assert estimate(t).total / 2**30 < 0.9 * 80, estimate(t)
    # steps relative to each tensor's scale: the first run's plateau and NaN (see the config's header)
    assert t.optimizer == "adafactor" and t.lr == 1e-2
    assert t.in_memory_max_mb >= 512  # the 2M rows' ~340 MB of token ids in memory, not streamed
    # a fixed time, not a step count: the LR decay ends where the budget does (train.max_time_s)
    assert t.max_time_s == 300 and t.max_steps >= 50_000 and t.ckpt_every % t.eval_every == 0
    assert e.data == p.output and e.model == t.output and e.split == "test" and e.gpus_per_actor == 1
    assert raw["ray"]["dashboard"] is False  # the GPU image lacks the dashboard's packages


def test_report_sections(tmp_path):
    res = tmp_path / "R.md"
    runs = tmp_path / "r.jsonl"
    row = {"bench": "train_gpu_bench", "device": "NVIDIA H100 80GB HBM3", "model": "google/flan-t5-large",
           "compile": False, "micro_batch": 256, "shapes": [[40, 4]], "step_ms": 51.2, "samples_per_s": 5000.0,
           "useful_tokens_per_s": 120000, "mfu_useful": 0.351, "mfu_padded": 0.62, "max_memory_gib": 30.1,
           "peak_tflops": 989.0, "lengths": "t5"}
    profiled = {**row, "compile": True, "optimizer": "adafactor", "gpu_busy": 0.31, "kernels_per_step": 4210,
                "top_gpu_kernels_ms_per_step": [["sm90_gemm_bf16", 20.5], ["triton_red_fused", 9.1]],
                "top_cpu_ops_ms_per_step": [["aten::mm", 30.2], ["cudaLaunchKernel", 25.0]]}
    runs.write_text(json.dumps(row) + "\n" + json.dumps({"model": "m", "micro_batch": 512, "compile": True,
                                                         "error": "out of memory"}) + "\n" + json.dumps(profiled) + "\n")
    assert report(["train", str(res), str(runs)]) == 0
    text = res.read_text()
    # a row without an optimizer (before the option) was AdamW's
    assert "| google/flan-t5-large | adamw | False | 256 | 40x4 | 51.2 | 5,000 | 120,000 | 35.1% | 62.0% | 30.1 |" in text
    assert "| google/flan-t5-large | adafactor | True | 256 | 40x4 |" in text
    assert "out of memory" in text and "peak 989.0" in text
    assert ("- profile, adafactor, compile True, micro batch 256: GPU busy 31.0% of the step, 4,210 kernels per step; top GPU: "
            "sm90_gemm_bf16 20.5 ms, triton_red_fused 9.1 ms; top CPU: aten::mm 30.2 ms, cudaLaunchKernel 25.0 ms") in text
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps({"model": "flan-t5-large", "rows": 10000, "batch_size": 512, "runs": [
        {"what": "python -m eval", "wall_s": 59.0, "examples_per_s": 169.4, "ray_data_wall_s": 32.6,
         "timing_s": {"process_start_to_ray": 8.04, "ray_start": 9.2, "ray_data": 32.6},
         "actor_ready_s": [{"since_process_start": 21.5, "imports": 6.1, "model_load": 9.3}]}]}))
    assert report(["eval", str(res), str(ev)]) == 0
    assert "| python -m eval | 59.0 | 169 | 32.6 | 8.0 | 9.2 | 21.5 (6.1, 9.3) |" in res.read_text()
    # Steps that left nothing behind are reported as such, not as a crash.
    assert report(["eval", str(res), str(tmp_path / "missing.json")]) == 0
    assert report(["speedrun", str(res), str(tmp_path / "d"), str(tmp_path / "t"), str(tmp_path / "e")]) == 0
    text = res.read_text()
    assert text.count("No result: the step failed, timed out or was left out") == 1
    assert "train: no summary.json" in text and "eval: no metrics.json" in text
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.json").write_text(json.dumps({"exact_match": 0.9612, "f1": 0.97, "rows_scored": 10000,
                                                             "wall_s": 12.5}))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "summary.json").write_text(json.dumps({
        "model": "t5-small-scratch", "steps": 1800, "global_batch_size": 512, "samples": 921600,
        "train_time_s": 179.9, "samples_per_s": 5122.8, "wall_time_s": 231.0, "max_time_s": 180.0,
        "optimizer": "adafactor", "lr": 0.01, "first_steps_s": 2.1, "samples_per_s_after_first_step": 5180.4, "stopped_by_time": True, "best": {"step": 1800, "val_exact_match": 0.95}}))
    probe = tmp_path / "probe.jsonl"  # the bare step with each optimizer: the ratio takes the run's own
    probe.write_text("\n".join(json.dumps({"model": "t5-small-scratch", "micro_batch": 512, "optimizer": o,
                                           "samples_per_s": v}) for o, v in (("adafactor", 6000.0), ("adamw", 7000.0))))
    report(["speedrun", str(res), str(tmp_path / "d"), str(tmp_path / "t"), str(tmp_path / "e"), "--probe", str(probe)])
    text = res.read_text()
    assert "**exact match 96.1%** on 10000 interpolate rows" in text
    assert "the loop ran at **0.86x the probe's bare step** (5,180 vs 6,000 samples/s, adafactor, batch 512)" in text
    assert ("- train: t5-small-scratch (adafactor, lr 0.01), 1800 steps of 512, 921,600 samples in 179.9 s of training (5,123 samples/s, "
            "5,180 after the first step of 2.1 s; ended by its time budget, 180 s), 231.0 s wall; best validation exact match 95.0% at step 1800") in text
    # A run that went NaN: no summary.json, but its curve and the divergence are in the report.
    t2 = tmp_path / "t2"
    t2.mkdir()
    lines = [{"event": "start", "step": 0}, *({"step": s, "loss": 2.0 - s / 1000, "grad_norm": 0.5, "lr": 1e-3}
                                              for s in range(100, 800, 100)),
             {"event": "checkpoint", "step": 500, "write_s": 0.84, "blocked_s": 0.12, "layout": "full"},
             {"step": 500, "val_loss": 1.4, "val_exact_match": 0.02, "val_samples": 2000},
             {"step": 800, "loss": float("nan"), "grad_norm": float("nan"), "lr": 9e-4},
             {"event": "diverged", "step": 800, "first_step": 701, "loss": float("nan"), "grad_norm": float("nan"),
              "lr": 9e-4, "last_checkpoint_step": 500}]
    (t2 / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    report(["speedrun", str(res), str(tmp_path / "d"), str(t2), str(tmp_path / "e")])
    text = res.read_text().split("### Speedrun")[-1]
    assert "- train loss (grad norm) by step: 100: 1.9 (0.5), 200: 1.8 (0.5), 300: 1.7 (0.5)" in text
    assert "800: nan (nan)" in text and "- validation exact match by step: 500: 2.0%" in text
    assert "- checkpoints (step: local write s / training blocked s): 500: 0.84 / 0.12" in text
    assert ("**train DIVERGED**: loss nan, largest grad norm nan over steps 701-800 (lr 9.00e-04); stopped, "
            "last checkpoint step 500") in text


def test_gpu_check_script_parses():
    for script in ("bench/gpu_check.sh", "bench/gpu_pack.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # reads the whole 25 MB xz stream
@pytest.mark.skipif(not (ROOT / ".gpu/ray.tar.xz").is_file(), reason="make gpu-pack has not run here")
def test_packed_archive_fits_and_holds_ray():
    total = sum(f.stat().st_size for f in (ROOT / ".gpu").rglob("*") if f.is_file())
    assert total < 60 * 2**20, f".gpu is {total / 2**20:.1f} MiB: over what the device tool carries"
    with tarfile.open(ROOT / ".gpu/ray.tar.xz") as tar:
        names = set(tar.getnames())
        assert {"./ray/__init__.py", "./ray/data/__init__.py", "./ray/train/torch/__init__.py"} <= names
        assert not any(n.startswith(("./ray/jars/", "./ray/rllib/")) for n in names)
        gcs = tar.getmember("./ray/core/src/ray/gcs/gcs_server")
        assert gcs.mode & 0o111, "gcs_server lost its exec bit (unzip it, not python -m zipfile)"
    wheels = sorted(p.name.split("-")[0].lower() for p in (ROOT / ".gpu/wheels").glob("*.whl"))
    assert {"pydantic", "pydantic_core", "jsonschema", "tensorboardx", "mathematics_dataset"} <= set(wheels)
    assert len(wheels) == len(set(wheels)), "two versions of one wheel stop pip --no-index"
