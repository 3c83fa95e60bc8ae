"""The end-to-end job as a user runs it (`python -m cluster.run`, a fresh process with its own local
Ray), on a tiny config: the driver is killed mid-training and the same command rerun resumes (issue 6,
fault 5); then every stage's output, a third run that skips everything, and no secret leaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError
from cluster.run import build_plan, format_summary

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import committed_checkpoints, read_metrics, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefLEAKCHECK"

TINY = """
run:
  output_dir: {out}
ray:
  object_store_memory_gb: 1
pipeline:
  train_rows_per_regime: 200
  test_rows: 40
  rows_per_shard: 100
  validation_size: 24
train:
  model: t5-tiny
  precision: fp32
  global_batch_size: 16
  warmup_steps: 2
  max_steps: 24
  eval_every: 4
  ckpt_every: 4
  eval_samples: 16
  log_every: 4
eval:
  batch_size: 32
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
    assert sorted(e["step"] for e in events if "loss" in e) == list(range(4, 25, 4))  # each step logged once
    for name, mtime in kept_before.items():  # the first run's checkpoints were not rewritten
        d = run_dir / name
        assert not d.exists() or d.stat().st_mtime == mtime

    summary = json.loads((out / "run_summary.json").read_text())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["rows_in"] == 640 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert summary["train"]["steps"] == 24 and summary["train"]["samples"] == 24 * 16
    test_rows = pq.read_table(out / "data" / "test").num_rows
    for stage in ("eval-before", "eval-after"):
        preds = pq.read_table(out / stage / "predictions.parquet")
        assert preds.num_rows == test_rows  # every test row scored once, before and after training
    assert (train_out / "final" / "model.safetensors").is_file()
    assert "exact match" in log2 and str(train_out / "final") in log2

    # 3. A third run finds every stage complete and redoes nothing.
    log3 = _run(config, env)
    assert log3.count("already complete, skipped") == 4, log3[-3000:]

    # The token was in the job's environment the whole time; it must appear in no output and no log.
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert FAKE_TOKEN not in log1 + log2 + log3


def test_plan_rejects_unknown_sections_and_bad_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        build_plan(str(bad), {})
    bad.write_text("eval:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="eval.batch_size"):
        build_plan(str(bad), {})


def test_plan_puts_every_output_under_one_root(tmp_path):
    plan = build_plan(str(ROOT / "configs" / "demo.yaml"), {"output_dir": str(tmp_path)})
    assert plan.pipeline.output == plan.train.data == plan.eval_after.data == str(tmp_path / "data")
    assert plan.eval_after.model == str(tmp_path / "train" / "final")
    text = format_summary({
        "root": str(tmp_path), "rows": {"rows_in": 3, "rows_kept": 2, "rows_rejected": 1},
        "train": {"steps": 5, "samples": 80, "wall_time_s": 10.0, "samples_per_s": 8.0},
        "eval_before": {"exact_match": 0.0, "f1": 0.1}, "eval_after": {"exact_match": 0.5, "f1": 0.75},
        "outputs": {"data": "d"},
    })
    assert "50.00%" in text and "75.00%" in text and "rejected 1" in text
