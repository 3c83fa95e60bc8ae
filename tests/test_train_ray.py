"""Ray Train end to end on a local Ray (CPU, gloo): a 2-worker run, a worker crash that
resumes from the last checkpoint onto the same loss curve (DDP from a full checkpoint, FSDP from its
per-rank shards), early stopping, and the up-front refusals. (The driver kill + rerun is tested on the
whole job: tests/test_run_e2e.py.)

One fault-free 2-worker DDP run is the reference for both killed runs: on CPU in fp32, FSDP2 computes the
same steps as DDP (same init, same batches, averaged gradients; measured difference ~1e-6 over 16 steps),
so each start of Ray Train (~20 s on 2 cores) is paid once per guarantee."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.config import ConfigError
from cluster.connect import ResourceError
from cluster.core import DivergedError, OutputError
from train.config import TrainConfig
from train.model import ModelError
from train.trainer import DataError, run

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import (  # noqa: E402
    assert_same_curve,
    assert_sharded_and_exported,
    committed_checkpoints,
    loss_curve,
    make_dataset,
    read_metrics,
    read_scalars,
    run_killing_rank0,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train-data"), n_train=256, n_val=32)


def small_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(out), model="t5-tiny", precision="fp32", num_workers=2,
                global_batch_size=16, max_steps=16, warmup_steps=2, eval_every=4, ckpt_every=4,
                eval_samples=16, eval_batch_size=8, max_new_tokens=4, log_every=1, keep_best_k=1,
                max_failures=1, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def assert_outputs_load(out: Path, cfg: TrainConfig, steps: int) -> dict:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from train.checkpoint import verify_checkpoint

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["samples"] == steps * cfg.global_batch_size
    AutoModelForSeq2SeqLM.from_pretrained(out / "final", use_safetensors=True)
    AutoTokenizer.from_pretrained(out / "final")
    kept = sorted((Path(cfg.resolved_storage_path()) / cfg.run_name).glob("step_*"))
    assert kept, "no checkpoint kept"
    for d in kept:  # every kept checkpoint is complete and loadable
        verify_checkpoint(d)
        AutoModelForSeq2SeqLM.from_pretrained(d, use_safetensors=True)
    return summary


@pytest.fixture(scope="module")
def fault_free(ray_local, data, tmp_path_factory):
    """The reference: a 2-worker CPU run, no faults."""
    out = tmp_path_factory.mktemp("fault-free")
    cfg = small_cfg(data, out)
    return cfg, run(cfg), out


@pytest.mark.slow
def test_two_worker_run(fault_free):
    cfg, summary, out = fault_free
    assert_outputs_load(out, cfg, 16)
    curve = loss_curve(out)
    assert sorted(curve) == list(range(1, 17))
    assert curve[16] < curve[1]  # learning, not just running
    vals = [m for m in read_metrics(out) if "val_exact_match" in m]
    assert [v["step"] for v in vals] == [4, 8, 12, 16] and all(v["val_samples"] == 16 for v in vals)
    assert summary["best"]["step"] in (4, 8, 12, 16) and summary["samples_per_s"] > 0
    assert summary["data_loading"] == "memory" and not summary["stopped_early"]
    assert (summary["optimizer"], summary["lr"]) == ("adamw", cfg.lr)
    assert summary["first_steps"] == 1 and 0 < summary["first_steps_s"] < summary["train_time_s"]
    assert summary["samples_per_s_after_first_step"] == pytest.approx(
        (16 - 1) * cfg.global_batch_size / (summary["train_time_s"] - summary["first_steps_s"]), rel=0.01)
    # TensorBoard: the same numbers as metrics.jsonl, readable from the event files
    scalars = read_scalars(out / "tensorboard")
    assert sorted(scalars["train/loss"]) == list(range(1, 17))
    assert scalars["train/loss"][16] == pytest.approx(curve[16], rel=1e-6)
    assert sorted(scalars["val/exact_match"]) == [4, 8, 12, 16] and "train/lr" in scalars
    assert "train/samples_per_s" in scalars and "val/loss" in scalars
    # the gradient norm (before clipping, the interval's largest): logged, finite, the same in TensorBoard
    norms = {m["step"]: m["grad_norm"] for m in read_metrics(out) if "grad_norm" in m}
    assert sorted(norms) == list(range(1, 17)) and all(0 < g < 1e3 for g in norms.values()), norms
    assert scalars["train/grad_norm"][16] == pytest.approx(norms[16], rel=1e-6)
    # every checkpoint written by rank 0 on its background thread, then reported, in order
    ckpts = [m for m in read_metrics(out) if m.get("event") == "checkpoint"]
    assert [c["step"] for c in ckpts] == [4, 8, 12, 16] and all(c["layout"] == "full" for c in ckpts)
    assert all(c["write_s"] > 0 and c["blocked_s"] >= 0 for c in ckpts), ckpts


@pytest.mark.slow
def test_early_stopping_and_fsdp_on_two_cpu_workers(ray_local, data, tmp_path, monkeypatch):
    """One Ray Train run for two guarantees (each start of Ray Train costs ~20 s on 2 cores):

    - early stopping: no validation can beat the first by 0.5 exact match, so with patience 2 the run
      stops at the third validation (step 6 of 16), and final/ is the best validation's checkpoint (every
      new best is kept). Tracked to an MLflow file store on the way.
    - strategy: fsdp (torch FSDP2 fully_shard, gloo): trains, validates in lockstep (both ranks decide to
      stop at the same validation, or the run would hang), saves sharded checkpoints, exports a full model."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSeq2SeqLM

    from train.tracking import mlflow_uri

    cfg = small_cfg(data, tmp_path, strategy="fsdp", eval_every=2, ckpt_every=8, log_every=2,
                    early_stopping_patience=2, early_stopping_min_delta=0.5, keep_best_k=2,
                    tracking=["tensorboard", "mlflow"])
    summary = run(cfg)
    assert summary["stopped_early"] and summary["steps"] == 6 and summary["samples"] == 6 * 16
    assert summary["final"]["val_samples"] == 16
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "final", use_safetensors=True).config.d_model == 128
    stops = [m for m in read_metrics(tmp_path) if m.get("event") == "early_stop"]
    assert stops == [{"event": "early_stop", "step": 6, "validations_without_improvement": 2}]
    vals = [m for m in read_metrics(tmp_path) if "val_exact_match" in m]
    assert [m["step"] for m in vals] == [2, 4, 6]
    best_step = max(vals, key=lambda m: (m["score"], m["step"]))["step"]
    assert summary["best"]["step"] == best_step and summary["best_checkpoint"].endswith(f"step_{best_step:07d}")
    from safetensors.torch import load_file

    from train.checkpoint import consolidate_model, is_sharded

    # FSDP checkpoints are per-rank shards (torch.distributed.checkpoint); final/ is consolidated from them
    assert is_sharded(summary["best_checkpoint"])
    best = consolidate_model(summary["best_checkpoint"]).state_dict()
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: reading a file store is opt-in too
    client = MlflowClient(tracking_uri=mlflow_uri(None, tmp_path))
    mrun = client.get_run((tmp_path / "mlflow_run_id").read_text().strip())
    assert mrun.data.params["early_stopping_patience"] == "2" and mrun.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "val/exact_match")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")] == [2, 4, 6]


@pytest.mark.slow
def test_time_budget_stops_both_workers_at_one_step_with_the_lr_decayed(ray_local, data, tmp_path):
    """train.max_time_s (the speedrun's fixed budget): the run ends once 4 s of training steps are spent,
    long before max_steps, both workers at the same step (under DDP a disagreement would hang); the LR
    decay ends at the budget, not at max_steps; the end validates, checkpoints and exports as usual."""
    cfg = small_cfg(data, tmp_path, max_steps=100_000, max_time_s=4.0, log_every=4, eval_every=100_000,
                    ckpt_every=100_000)
    summary = run(cfg)
    steps = summary["steps"]
    assert summary["stopped_by_time"] and summary["max_time_s"] == 4.0 and 8 <= steps < 100_000, summary
    # Spent to within a step (the stop comes when less than one step's time is left: ~0.1 s here, room
    # for slow steps on a loaded box), over by at most about one log interval's misestimate.
    assert 3.0 <= summary["train_time_s"] <= 7.0, summary
    metrics = read_metrics(tmp_path)
    budget = [m for m in metrics if m.get("event") == "time_budget"]
    assert len(budget) == 1 and budget[0]["step"] == steps
    assert budget[0]["train_time_s"] == pytest.approx(summary["train_time_s"], abs=0.01)
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert lrs[-1] < 0.5 * cfg.lr  # decayed towards lr * min_lr_ratio at the budget's end (max_steps: ~lr)
    assert summary["final"]["step"] == steps and summary["final"]["val_samples"] == 16
    assert_outputs_load(tmp_path, cfg, steps)


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_at_once_with_no_checkpoint_and_a_clear_error(fault_free, tmp_path):
    """A loss or gradient norm that goes non-finite stops every worker at the next log line, with no
    checkpoint of the NaN state and no Ray Train retry (max_failures is 1 here: a retry would replay the
    same batches into the same NaN), and the driver raises DivergedError naming the steps, the LR and the
    last checkpoint. Resumed from the fault-free run's step 16 with an LR that overflows fp32 at once."""
    ref_cfg, _, ref_out = fault_free
    out = tmp_path / "nan"
    shutil.copytree(ref_out, out)  # its checkpoints too: Ray's snapshot names them relative to the storage
    cfg = dataclasses.replace(ref_cfg, output=str(out), lr=1e30, max_steps=24, eval_every=2, ckpt_every=2)
    with pytest.raises(DivergedError, match=r"training diverged: loss \S+, largest gradient norm \S+ over steps 1[78]-1[78] \(lr .*"
                       r"last checkpoint is step 16 in .*rerunning resumes from it"):
        run(cfg)
    events = read_metrics(out)
    starts = [i for i, m in enumerate(events) if m.get("event") == "start"]
    assert len(starts) == 2, "Ray Train retried the diverged run"
    nan = [m for m in events if m.get("event") == "diverged"]
    assert len(nan) == 1 and nan[0]["last_checkpoint_step"] == 16
    # here the gradient norm goes first (step 18: loss 4.58, norm nan): AdamW would have made the
    # weights NaN, and step 18's checkpoint would have saved them
    assert not (math.isfinite(nan[0]["loss"]) and math.isfinite(nan[0]["grad_norm"])), nan
    assert committed_checkpoints(out / "ray" / cfg.run_name)[-1] == "step_0000016"  # none after the NaN
    later = [d.name for d in (out / "ray" / cfg.run_name).glob("step_*") if int(d.name[5:]) > 16]
    assert not later, f"a NaN state was checkpointed: {later}"


@pytest.mark.slow
def test_worker_sigkill_resumes_on_the_same_curve(fault_free, data, tmp_path):
    ref_cfg, _, ref_out = fault_free
    out = tmp_path / "killed"
    cfg = dataclasses.replace(ref_cfg, output=str(out))
    run_killing_rank0(cfg, after_step=4)
    events = read_metrics(out)
    resumes = [m for m in events if m.get("event") == "resume"]
    assert resumes and resumes[0]["step"] >= 4, events
    assert_outputs_load(out, cfg, 16)
    assert_same_curve(ref_out, out, 16)


@pytest.mark.slow
def test_fsdp_worker_sigkill_resumes_from_shards_on_the_same_curve(fault_free, tmp_path):
    """FSDP writes sharded checkpoints (one DCP file per rank, nothing gathered); a worker killed after the
    first committed checkpoint resumes from the shards onto the uninterrupted (DDP) run's loss curve, and
    final/ (consolidated once, at the end) loads with from_pretrained and holds the best checkpoint's weights."""
    ref_cfg, _, ref_out = fault_free
    out = tmp_path / "killed"
    cfg = dataclasses.replace(ref_cfg, output=str(out), strategy="fsdp")
    summary = run_killing_rank0(cfg, after_step=4)
    assert summary["steps"] == 16 and summary["strategy"] == "fsdp"
    starts = [m for m in read_metrics(out) if m.get("event") == "start"]  # the starts the final state went through
    assert summary["first_steps"] == len(starts) >= 2, "each start's first step (the first and the resumed one)"
    resumes = [m for m in read_metrics(out) if m.get("event") == "resume"]
    assert resumes and resumes[0]["step"] >= 4
    assert_sharded_and_exported(cfg, summary, out)
    assert_same_curve(ref_out, out, 16)


def test_impossible_worker_request_fails_fast(ray_local, data, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match="8 x"):
        run(small_cfg(data, tmp_path, num_workers=8))
    with pytest.raises(ResourceError, match="GPUs"):
        run(small_cfg(data, tmp_path, use_gpu=True))
    assert time.monotonic() - t0 < 60


def test_unwritable_paths_are_clear_errors(data, tmp_path):
    with pytest.raises(OutputError, match="train.storage_path /proc/mathtune is not writable"):
        run(small_cfg(data, tmp_path, storage_path="/proc/mathtune"))
    with pytest.raises(OutputError, match="train.output /proc/x is not writable"):
        run(small_cfg(data, "/proc/x"))


def test_storage_with_another_models_checkpoints_is_refused(data, tmp_path):
    from cluster.core import load_tokenizer
    from train.checkpoint import write_checkpoint
    from train.model import build_model

    tok = load_tokenizer("char")
    other = build_model("t5-mini", len(tok))
    write_checkpoint(tmp_path / "ray" / "train" / "step_0000004", other, other.state_dict(), tok, {"step": 4})
    with pytest.raises(ModelError, match="written by another model"):
        run(small_cfg(data, tmp_path))


def test_resume_with_another_worker_count_or_seed_is_refused_before_ray(data, tmp_path):
    """The saved data position means other rows under another seed or worker count: refused from the
    checkpoint's manifest, before any worker starts."""
    from cluster.core import CheckpointError, load_tokenizer
    from train.checkpoint import write_checkpoint
    from train.loop import data_order
    from train.model import build_model

    tok = load_tokenizer("char")
    m = build_model("t5-tiny", len(tok))
    cfg = small_cfg(data, tmp_path)
    order = data_order(dataclasses.replace(cfg, num_workers=4), 4, in_memory=True)
    write_checkpoint(tmp_path / "ray" / "train" / "step_0000004", m, m.state_dict(), tok,
                     {"step": 4, "data_order": order})
    with pytest.raises(CheckpointError, match=r"world_size=4 \(this run: 2\)"):
        run(cfg)
    with pytest.raises(CheckpointError, match=r"seed=0 \(this run: 5\)"):
        run(small_cfg(data, tmp_path, seed=5, num_workers=4))


def test_bad_data_dirs(data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run(small_cfg(tmp_path / "missing", tmp_path))
    bad = make_dataset(tmp_path / "incomplete", n_train=32, n_val=8)
    (bad / "manifest.json").write_text('{"complete": false}')
    with pytest.raises(DataError, match="does not say complete"):
        run(small_cfg(bad, tmp_path))
    with pytest.raises(ConfigError, match="train.data is required"):
        run(dataclasses.replace(small_cfg(data, tmp_path), data=""))
