"""Tiny datasets in the pipeline's output contract, for training tests (no generator, no Ray needed), and
readers of what a training run leaves behind (metrics.jsonl, Ray Train's committed checkpoints).

Rows look like algebra__linear_1d ("Solve 3*x + 4 = 10 for x." -> "2"), tokenized with the built-in
char tokenizer; the directory layout, columns and manifest are the contract's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.core import load_tokenizer


def linear_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x, a, c = rng.randint(-9, 9), rng.randint(1, 9), rng.randint(-20, 20)
        v = rng.choice("xyzabc")
        rows.append((f"Solve {a}*{v} + {c} = {a * x + c} for {v}.", str(x)))
    return rows


def write_split(path: Path, rows: list[tuple[str, str]], tokenizer, files: int = 1) -> None:
    path.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for f in range(files):
        chunk = rows[f * per:(f + 1) * per]
        if not chunk:
            continue
        q = [r[0] for r in chunk]
        a = [r[1] for r in chunk]
        ids = [tokenizer(s)["input_ids"] for s in q]
        labels = [tokenizer(s)["input_ids"] for s in a]
        table = pa.table({
            "question": q,
            "answer": a,
            "regime": ["train-easy"] * len(chunk),
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "attention_mask": pa.array([[1] * len(i) for i in ids], type=pa.list_(pa.int32())),
            "labels": pa.array(labels, type=pa.list_(pa.int32())),
        })
        pq.write_table(table, path / f"part-{f:05d}.parquet")


def make_dataset(root: Path, n_train: int = 256, n_val: int = 64, seed: int = 0, files: int = 2,
                 train_rows: list[tuple[str, str]] | None = None,
                 val_rows: list[tuple[str, str]] | None = None) -> Path:
    """<root>/{train,validation,test}/*.parquet + tokenizer/ + manifest.json (complete)."""
    tok = load_tokenizer("char")
    train_rows = train_rows if train_rows is not None else linear_rows(n_train, seed)
    val_rows = val_rows if val_rows is not None else linear_rows(n_val, seed + 1)
    write_split(root / "train", train_rows, tok, files)
    write_split(root / "validation", val_rows, tok)
    write_split(root / "test", val_rows, tok)
    tok.save_pretrained(root / "tokenizer")
    (root / "manifest.json").write_text(json.dumps({"complete": True, "rows": {"train": len(train_rows)}}))
    return root


def read_metrics(out: Path) -> list[dict]:
    """The entries of <train output>/metrics.jsonl ([] before the run writes any)."""
    p = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def committed_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoint dirs Ray Train's controller has registered for a run (<storage_path>/<run_name>): what a
    restarted run resumes from. It registers at its next poll of the workers (~2 s); a step_* dir exists
    earlier, while being written, and a fault then resumes from the checkpoint before."""
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    results = [*snap.get("checkpoint_results", []), snap.get("latest_checkpoint_result") or {}]
    return sorted({r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")})


def wait_for(pred, timeout: float, what: str):
    """Poll pred() every 0.1 s until it is truthy (returned), or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# Same loss curve: same seed, config and worker count on CPU replay the same batches in the same order
# (each epoch's order is a function of the seed and epoch; the data position is checkpointed) and the
# same gloo reductions; observed differences are ~1e-7.
LOSS_TOL = 1e-4


def loss_curve(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def assert_same_curve(ref_out: Path, out: Path, steps: int) -> None:
    ref, got = loss_curve(ref_out), loss_curve(out)
    assert sorted(got) == list(range(1, steps + 1))
    for s in ref:
        assert abs(ref[s] - got[s]) <= LOSS_TOL * max(1.0, abs(ref[s])), (s, ref[s], got[s])


def run_killing_rank0(cfg, after_step: int) -> dict:
    """`python -m train`'s run(cfg) in a thread; once Ray has committed a checkpoint at `after_step` or later
    (one reported but not yet registered is not resumed from), SIGKILL the rank-0 training worker from
    outside, as a preempted node would. Returns the run's summary: max_failures must carry it to the end."""
    from train.trainer import run

    out, box = Path(cfg.output), {}
    t = threading.Thread(target=lambda: box.update(summary=run(cfg)), daemon=True)
    t.start()
    wait_for(lambda: any(name >= f"step_{after_step:07d}"
                         for name in committed_checkpoints(out / "ray" / cfg.run_name)),
             240, "the first committed checkpoint")
    pid = next(m["pid"] for m in read_metrics(out) if m.get("event") == "start")
    os.kill(pid, signal.SIGKILL)
    t.join(300)
    assert "summary" in box, "the run did not complete after the worker was killed"
    return box["summary"]


def assert_sharded_and_exported(cfg, summary: dict, out: Path) -> None:
    """An FSDP run's kept checkpoints are per-rank DCP shards (nothing gathered, no full optimizer state),
    each checkpoint blocked training for a measured time, and final/ holds the best checkpoint's weights
    with flan-t5's untied head."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from train.checkpoint import consolidate_model, verify_checkpoint

    kept = sorted((Path(cfg.resolved_storage_path()) / cfg.run_name).glob("step_*"))
    assert kept
    for d in kept:
        manifest = verify_checkpoint(d)
        assert manifest["layout"] == "sharded"
        # one shard per rank and DCP's metadata; no gathered safetensors, no full optimizer state
        assert {f for f in manifest["files"] if f.startswith("dcp/")} == {"dcp/.metadata", "dcp/__0_0.distcp",
                                                                       "dcp/__1_0.distcp"}
        assert not list(d.glob("*.safetensors"))
        assert "optimizer" not in torch.load(d / "train_state.pt", weights_only=True)
    ckpts = [m for m in read_metrics(out) if m.get("event") == "checkpoint"]
    assert ckpts and all(c["layout"] == "sharded" and c["blocked_s"] > 0 for c in ckpts)
    final = AutoModelForSeq2SeqLM.from_pretrained(out / "final", use_safetensors=True)
    best = consolidate_model(summary["best_checkpoint"]).state_dict()
    got = final.state_dict()
    assert set(best) == set(got) and all(torch.equal(best[k], got[k]) for k in best)
    assert final.lm_head.weight is not final.shared.weight  # flan-style untied head survives the export


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Scalars from TensorBoard event files, parsed with tensorboardX's own protobufs (TFRecord framing:
    length, crc, payload, crc)."""
    from tensorboardX.proto.event_pb2 import Event  # no tensorboard package needed to read them back

    out: dict[str, dict[int, float]] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out
