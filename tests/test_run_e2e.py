"""The end-to-end job as a user runs it (`python -m cluster.run`, a fresh process with its own local
Ray), on a tiny config: the driver is killed mid-training and the same command rerun resumes; then every stage's output, a third run that skips everything, and no secret leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError
from cluster.run import build_job, format_summary

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import committed_checkpoints, read_metrics, read_scalars, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefLEAKCHECK"

TINY = """
run:
  output_dir: {out}
ray:
  object_store_memory_gb: 1
pipeline:
  modules: [algebra__linear_1d, numbers__is_prime, arithmetic__add_or_sub]  # a 3-module mixture
  train_rows_per_regime: 100     # per module
  test_rows: 40                  # interpolate, per module; add_or_sub also gets 40 extrapolate rows
  rows_per_shard: 100
  validation_size: 24
train:
  model: t5-tiny
  precision: fp32
  global_batch_size: 16
  warmup_steps: 2
  max_steps: 16                  # killed once a checkpoint is committed (seen at step 4-8): steps left to resume
  eval_every: 4
  ckpt_every: 4
  eval_samples: 16
  log_every: 2                   # a checkpoint written in the background is committed at the next log line
eval:
  batch_size: 32
  num_actors: 1                  # 160 rows: one actor; pools are tested in test_eval_job.py (2 CPUs: each extra actor start slows it)
"""


def _run(config: Path, env: dict) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.run", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_end_to_end_job_driver_kill_resume_outputs_and_no_token_leak(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=out))
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    train_out = out / "train"
    run_dir = train_out / "ray" / "train"  # Ray Train's storage for the run: <train.output>/ray/<run_name>

    # 1. Kill the driver (and with it its local Ray) once training has a committed checkpoint.
    with open(tmp_path / "first.log", "w") as first_log:
        p = subprocess.Popen([sys.executable, "-m", "cluster.run", "--config", str(config)], cwd=ROOT, env=env,
                             stdout=first_log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: committed_checkpoints(run_dir) or p.poll() is not None, 420,
                     "the first committed checkpoint")
            assert p.poll() is None, "the first run ended before it could be killed:\n" + \
                (tmp_path / "first.log").read_text()[-3000:]
            p.kill()
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
    log1 = (tmp_path / "first.log").read_text()
    kept_before = {d.name: d.stat().st_mtime for d in run_dir.glob("step_*")}
    assert not (out / "run_summary.json").exists()

    # 2. The same command: finished stages are skipped, training resumes from its checkpoint.
    log2 = _run(config, env)
    assert log2.count("already complete, skipped") == 2, log2[-3000:]  # pipeline, eval-before
    events = read_metrics(train_out)
    resumes = [e["step"] for e in events if e.get("event") == "resume"]
    starts = [e["step"] for e in events if e.get("event") == "start"]
    assert resumes and resumes[0] >= 4, events
    assert starts[0] == 0 and len(starts) >= 2 and all(s >= 4 for s in starts[1:])  # from scratch once only
    assert sorted(e["step"] for e in events if "loss" in e) == list(range(2, 17, 2))  # each step logged once
    for name, mtime in kept_before.items():  # the first run's checkpoints were not rewritten
        d = run_dir / name
        assert not d.exists() or d.stat().st_mtime == mtime

    summary = json.loads((out / "run_summary.json").read_text())
    # The stages the killed first invocation finished keep their times (logs/stages.jsonl).
    assert list(summary["stage_seconds"]) == ["pipeline", "eval-before", "train", "eval-after"], summary
    assert all(v > 0 for v in summary["stage_seconds"].values())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["rows_in"] == 3 * 3 * 100 + 3 * 40 + 40 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert summary["train"]["steps"] == 16 and summary["train"]["samples"] == 16 * 16
    test_rows = pq.read_table(out / "data" / "test").num_rows
    for stage in ("eval-before", "eval-after"):
        preds = pq.read_table(out / stage / "predictions.parquet")
        assert preds.num_rows == test_rows  # every test row scored once, before and after training
    assert (train_out / "final" / "model.safetensors").is_file()
    # The mixture is scored per module x regime (metrics, report table, plot), extrapolation included.
    modules = {"algebra__linear_1d", "numbers__is_prime", "arithmetic__add_or_sub"}
    after = json.loads((out / "eval-after" / "metrics.json").read_text())
    assert set(after["by_module"]) == modules and sum(m["n"] for m in after["by_module"].values()) == test_rows
    assert set(after["by_module"]["arithmetic__add_or_sub"]["by_regime"]) == {"interpolate", "extrapolate"}
    report = (out / "eval-after" / "report.md").read_text()
    assert "## By module and regime" in report and all(f"| **{m}** |" in report for m in modules)
    assert (out / "eval-after" / "accuracy_by_module.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ... and the test metrics sit beside training's curves in TensorBoard (before: step 0, after: the last).
    scalars = read_scalars(train_out / "tensorboard")
    assert scalars["eval_after/exact_match"] == {16: pytest.approx(after["exact_match"])}
    assert set(scalars["eval_before/f1"]) == {0} and "train/loss" in scalars
    assert "exact match" in log2 and str(train_out / "final") in log2

    # A console a person reads: no per-report chatter, no progress-bar escape codes from workers, Ray Data's
    # progress as short driver lines, where Ray's logs are said once; the model card carries the metrics.
    assert "Reporting training result" not in log1 + log2 and "Checkpoint successfully created" not in log2
    assert "\x1b[" not in log2 and "Running Dataset" not in log2 and "exclude_resources" not in log2  # no escape codes
    assert "will hang" not in log1 + log2  # no stage starts a Ray Data job before the last one's CPUs are back
    assert "NOT tie them" not in log1 + log2  # transformers' notice at every load of an untied-head T5
    assert log2.count("full logs: ") == 1 and "[train] step " in log2
    from huggingface_hub import ModelCard

    card = ModelCard.load(train_out / "final" / "README.md")
    after = json.loads((out / "eval-after" / "metrics.json").read_text())
    assert {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}[
        ("exact_match", "after")] == round(after["exact_match"], 6)

    # 3. A third run finds every stage complete and redoes nothing.
    log3 = _run(config, env)
    assert log3.count("already complete, skipped") == 4, log3[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["stage_seconds"] == summary["stage_seconds"]

    # The token was in the job's environment the whole time; it must appear in no output and no log.
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert FAKE_TOKEN not in log1 + log2 + log3


def test_job_rejects_unknown_sections_and_bad_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        build_job(str(bad), {})
    bad.write_text("eval:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="eval.batch_size"):
        build_job(str(bad), {})


def test_job_puts_every_output_under_one_root(tmp_path):
    job = build_job(str(ROOT / "configs" / "demo.yaml"), {"run": {"output_dir": str(tmp_path)}})
    assert job.pipeline.output == job.train.data == job.eval_after.data == str(tmp_path / "data")
    assert job.eval_after.model == str(tmp_path / "train" / "final")
    text = format_summary({
        "root": str(tmp_path), "rows": {"rows_in": 3, "rows_kept": 2, "rows_rejected": 1},
        "train": {"steps": 5, "samples": 80, "wall_time_s": 10.0, "samples_per_s": 8.0},
        "eval_before": {"exact_match": 0.0, "f1": 0.1}, "eval_after": {"exact_match": 0.5, "f1": 0.75},
        "outputs": {"data": "d"},
    })
    assert "50.00%" in text and "75.00%" in text and "rejected 1" in text


# ---------------------------------------------------------------------------------------------------
# The front door: every option as --<section>.<field>, one error line for any user error, the model card.

def _job_from_argv(argv: list[str]):
    from cluster.run import build_parser, parse_overrides

    args = vars(build_parser().parse_args(argv))
    return build_job(args.pop("config"), parse_overrides(args))


def test_prefixed_flags_override_the_file_and_are_typed(tmp_path):
    demo = str(ROOT / "configs" / "demo.yaml")
    job = _job_from_argv([
        "--config", demo, "--train.max-steps", "40", "--train.warmup_steps", "5", "--pipeline.source", "/data/x",
        "--eval.max-rows", "100", "--ray.num-cpus", "8", "--no-train.use-gpu", "--run.output-dir", str(tmp_path),
        "--force",
    ])
    assert job.train.max_steps == 40 and job.train.warmup_steps == 5  # the file says 300 and 30
    assert job.train.lr == 3.0e-3 and job.train.model == "t5-tiny"  # untouched fields keep the file's values
    assert job.pipeline.source == "/data/x" and job.pipeline.train_rows_per_regime == 20000
    assert job.eval_after.max_rows == job.eval_before.max_rows == 100 and job.eval_after.batch_size == 64
    assert job.ray.num_cpus == 8 and job.ray.object_store_memory_gb == 2
    assert job.run.force is True and job.root == tmp_path
    assert job.train.output == str(tmp_path / "train")  # the job's wiring is unchanged by flags


@pytest.mark.parametrize("argv, message", [
    (["--train.max-steps", "many"], "error: train.max_steps: expected an integer, got 'many'"),
    (["--train.max-stepz", "3"], "error: unrecognized arguments: --train.max-stepz 3; did you mean --train.max-steps?"),
    (["--eval.batch-size", "0"], "error: eval.batch_size must be positive, got 0"),
    (["--train.output", "/tmp/x"], "error: --train.output is set by the job"),
    (["--train.precision", "fp64"], "error: train.precision: 'fp64' is not one of"),
])
def test_bad_flags_are_one_error_line_exit_2(tmp_path, capsys, argv, message):
    from cluster.config import run_cli
    from cluster.run import main

    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--run.output-dir", str(tmp_path / "run"), *argv]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything tries to start or connect to Ray."""
    import ray

    def refuse(*a, **kw):
        raise AssertionError("Ray was started before the error was found")

    monkeypatch.setattr(ray, "init", refuse)
    # Another test module's session Ray may still be up in this process: the code under test must still
    # see "no Ray" and try to start one (and be refused), not reuse it and hide a late check.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MATHTUNE_DEBUG", raising=False)
    yield


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "missing source": (["--pipeline.source", str(tmp_path / "missing")], "error: source not found"),
        "bad config value": (["--train.lr", "-1"], "error: train.lr must be > 0"),
        "unwritable output": (["--run.output-dir", str(a_file)], f"error: run.output_dir {a_file} exists and is a file"),
        "missing model dir": (["--train.model", str(tmp_path / "no-model")], "error: model directory"),
        "impossible resources": (["--train.num-workers", "64", "--train.global-batch-size", "128"],
                                 "error: training needs 64 workers"),
        "push without token": (["--push-to-hub", "me/math-t5"], "error: --push-to-hub needs a Hugging Face token"),
        "eval pool too large": (["--eval.num-actors", "8"], "error: eval needs 8 actor(s) x 1 CPUs, but"),
    }


@pytest.mark.parametrize("case", ["missing source", "bad config value", "unwritable output", "missing model dir",
                                  "impossible resources", "push without token", "eval pool too large"])
def test_each_class_of_bad_input_is_one_line_before_ray(tmp_path, capsys, monkeypatch, no_ray, case):
    from cluster.config import run_cli
    from cluster.run import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    flags, message = _bad_inputs(tmp_path)[case]
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=tmp_path / "run"))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--config", str(config), *flags]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(message), err
    log_file = Path(err.rsplit("(traceback: ", 1)[1].rstrip(")\n"))
    assert "Traceback (most recent call last)" in log_file.read_text()  # the details are kept


def test_the_real_command_fails_in_one_line_within_seconds(tmp_path):
    """`python -m cluster.run` as a user runs it: a missing source is one line, exit 2, no Ray session,
    and the traceback is in <run>/logs/."""
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=tmp_path / "run"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MATHTUNE_DEBUG", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cluster.run", "--config", str(config), "--pipeline.source",
                           str(tmp_path / "missing")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: source not found: {tmp_path / 'missing'} (traceback: {tmp_path}/run/logs/")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "local Ray" not in proc.stdout + proc.stderr and wall < 60  # Ray never started (~5 s of imports)
    assert "SourceError" in next((tmp_path / "run" / "logs").glob("error-*.log")).read_text()
    # --debug: the same error with its traceback, for a bug report.
    proc = subprocess.run([sys.executable, "-m", "cluster.run", "--config", str(config), "--pipeline.source",
                           str(tmp_path / "missing"), "--debug"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("cluster.core.SourceError: source not found")


def test_model_card_carries_the_metrics_and_parses(tmp_path):
    from huggingface_hub import ModelCard

    from cluster.run import eval_metrics, write_model_card

    job = build_job(str(ROOT / "configs" / "demo.yaml"), {"run": {"output_dir": str(tmp_path)}})
    final = Path(job.train.output) / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (Path(job.train.output) / "summary.json").write_text(json.dumps({"steps": 300, "samples": 38400,
                                                                      "best": {"step": 250}}))
    Path(job.pipeline.output).mkdir(parents=True)
    (Path(job.pipeline.output) / "manifest.json").write_text(json.dumps({
        "config": {"module": "algebra__linear_1d", "source": "generate"}, "rows_in": 62000, "rows_kept": 61990,
        "rows_rejected": 10, "tokenizer": {"spec": "char"}}))
    for stage, em, f1 in (("eval-before", 0.0, 0.0145), ("eval-after", 0.012, 0.2909)):
        Path(tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.json").write_text(json.dumps({"exact_match": em, "f1": f1, "split": "test"}))

    card = ModelCard.load(write_model_card(job, *eval_metrics(job)))
    assert card.data.datasets == ["deepmind/math_dataset"] and card.data.base_model is None  # from scratch
    results = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert results == {("exact_match", "after"): 0.012, ("f1", "after"): 0.2909,
                       ("exact_match", "before"): 0.0, ("f1", "before"): 0.0145}
    meta = card.data.to_dict()["mathtune"]
    assert meta["modules"] == ["algebra__linear_1d"] and meta["rows"]["rows_rejected"] == 10
    assert meta["training"]["max_steps"] == 300 and meta["training"]["lr"] == 3.0e-3 and meta["steps"] == 300
    assert "| after training | 1.20% | 29.09% |" in card.text

    # A hub checkpoint is named as the base model (the hub links the two).
    job.train.model = "google/flan-t5-small"
    assert ModelCard.load(write_model_card(job, *eval_metrics(job))).data.base_model == "google/flan-t5-small"


def test_push_to_hub_refuses_without_token_before_any_work(tmp_path, monkeypatch):
    import train.trainer
    from train.__main__ import main as train_main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(train.trainer, "run", lambda *a: pytest.fail("training started without a token"))
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        train_main(["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--push-to-hub", "me/math-t5"])
    with pytest.raises(ConfigError, match="repo id like 'user/name'"):
        train_main(["--data", str(tmp_path), "--push-to-hub", "not a repo"])
