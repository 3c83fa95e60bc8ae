"""Ray Train overhead on CPU: `train.run` with 2 Ray workers x 1 thread vs a plain single-process PyTorch
loop with 2 threads, same model (t5-tiny, fp32), data, global batch and steps, in one run.

    .venv/bin/python -m bench.train_bench [--steps 100] [--rows 16384]

Both numbers are training samples/s over the optimizer steps only (data fetching included; Ray start-up,
validation and checkpointing excluded), reported twice: over all steps, and in steady state (after the
first WARM steps on both sides: Ray's first batch waits for the Ray Data stream to start, seconds that are
start-up, not throughput). Target: ray / plain >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

WARM = 10  # steps excluded from the steady-state numbers (and the Ray run's log interval)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from train_fixtures import make_dataset, read_metrics  # noqa: E402  (contract-format data; run outputs)


def plain_loop(data: Path, steps: int, batch: int, threads: int, lr: float = 3e-3) -> float:
    import pyarrow.parquet as pq

    from train.collate import collate_seq2seq
    from train.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = pq.read_table(data / "train", columns=["input_ids", "labels"]).to_pydict()
    model = build_model("t5-tiny", 98)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    n = len(t["input_ids"])
    elapsed = steady = 0.0
    for s in range(steps):
        t0 = time.perf_counter()
        i = (s * batch) % (n - batch)
        b = collate_seq2seq({"input_ids": t["input_ids"][i:i + batch], "labels": t["labels"][i:i + batch]})
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        if s == WARM - 1:
            steady = elapsed
    return steps * batch / elapsed, (steps - WARM) * batch / (elapsed - steady)


def ray_run(data: Path, out: Path, steps: int, batch: int) -> dict:
    from cluster.config import RayConfig
    from train.config import TrainConfig
    from train.trainer import run

    cfg = TrainConfig(data=str(data), output=str(out), model="t5-tiny", precision="fp32", num_workers=2,
                      cpus_per_worker=1, torch_threads=1, global_batch_size=batch, max_steps=steps,
                      warmup_steps=5, eval_every=steps, ckpt_every=steps, eval_samples=0, log_every=WARM,
                      max_failures=0)
    return run(cfg, RayConfig())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", n_train=args.rows, n_val=64, files=4)
        plain, plain_steady = plain_loop(data, args.steps, args.batch, threads=2)
        summary = ray_run(data, Path(tmp) / "out", args.steps, args.batch)
        # Interval throughput from the run's own log lines (wall time between them, eval/ckpt excluded).
        steady = [m["samples_per_s"] for m in read_metrics(Path(tmp) / "out") if "loss" in m and m["step"] > WARM]
        ray_steady = len(steady) / sum(1 / x for x in steady)  # equal-sized intervals: harmonic mean
    result = {
        "plain_samples_per_s": round(plain, 1),
        "ray_2workers_samples_per_s": round(summary["samples_per_s"], 1),
        "ratio": round(summary["samples_per_s"] / plain, 3),
        "plain_steady_samples_per_s": round(plain_steady, 1),
        "ray_steady_samples_per_s": round(ray_steady, 1),
        "ratio_steady": round(ray_steady / plain_steady, 3),
        "steps": args.steps, "global_batch": args.batch, "model": "t5-tiny fp32",
        "ray_wall_time_s": summary["wall_time_s"],
        "loadavg_1m": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
