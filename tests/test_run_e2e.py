"""The end-to-end job as a user runs it (`python -m cluster.run`, a fresh process with its own local
Ray), on a tiny config: every stage's output, resume-by-skipping on a rerun, and no secret leaks."""

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
  max_steps: 6
  eval_every: 3
  ckpt_every: 3
  eval_samples: 16
  log_every: 2
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
def test_end_to_end_job_outputs_resume_and_no_token_leak(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(out=out))
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "PYTHONUNBUFFERED": "1"}

    log = _run(config, env)
    summary = json.loads((out / "run_summary.json").read_text())
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["rows_in"] == 640 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert summary["train"]["steps"] == 6
    test_rows = pq.read_table(out / "data" / "test").num_rows
    for stage in ("eval-before", "eval-after"):
        preds = pq.read_table(out / stage / "predictions.parquet")
        assert preds.num_rows == test_rows  # every test row scored once, before and after training
    assert (out / "train" / "final" / "model.safetensors").is_file()
    assert "exact match" in log and str(out / "train" / "final") in log

    # A rerun of the same command finds every stage complete and redoes nothing.
    log2 = _run(config, env)
    assert log2.count("already complete, skipped") == 4, log2[-3000:]

    # The token was in the job's environment the whole time; it must appear in no output and no log.
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert FAKE_TOKEN not in log + log2


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
