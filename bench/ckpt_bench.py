"""How long a checkpoint blocks training: rank 0's time in the save, before and after asynchronous upload and
sharded FSDP state, on a local Ray (CPU, gloo), real Ray Train storage (a local storage_path).

    .venv/bin/python -m bench.ckpt_bench [--models t5-tiny t5-small-scratch] [--reps 3] [--gap 5] [--strategies ddp]

For each model and strategy (DDP on 1 worker: the replicated case; FSDP on 2 workers), one TorchTrainer
run does one AdamW step (so the optimizer has its moments) and then saves `reps` times each way, with
`--gap` seconds before each save (as between checkpoints in a real run: Ray's controller has taken the
previous report and no upload is in flight, so neither way pays for the other):

- before: what train/loop.py did until the asynchronous upload: the full model + optimizer state gathered
  to rank 0 (`full_state_dicts`), written as a safetensors model folder + train_state.pt, then
  `ray.train.report` with the default synchronous upload (every rank waits at the barrier);
- write_then_async_upload: what it did from then until 2026-11-27 evening: the same gather and local write,
  then `report` with the asynchronous upload (only the upload left the training thread);
- after: `train.loop.save_checkpoint` as it is now, timed until it returns, plus the previous
  checkpoint's `report_checkpoint` (as at a log line; its write finished during the gap). DDP: a CPU
  snapshot (here a clone), then rank 0 writes on a background thread; FSDP: each rank writes its DCP
  shard. The upload runs in the background; Ray waits for the last one when the function ends.

Prints one JSON line per (model, strategy) with the median seconds of each and the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def bench_loop(config: dict) -> None:
    import ray.train

    from cluster.core import load_tokenizer
    from train.checkpoint import local_checkpoint_dir, write_checkpoint
    from train.collate import collate_seq2seq
    from train.config import TrainConfig
    from train.loop import RunState, distribute, full_state_dicts, report_checkpoint, save_checkpoint, unwrap
    from train.model import build_model

    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(1)
    tok = load_tokenizer("char")
    torch.manual_seed(0)
    model = distribute(build_model(cfg.model, len(tok)), cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = collate_seq2seq({"input_ids": [[5, 6, 1], [7, 1]], "labels": [[8, 1], [9, 1]]})
    model(**batch).loss.backward()
    opt.step()
    times: dict[str, list[float]] = {"before": [], "write_then_async_upload": [], "after": [],
                                     "after_report": [], "after_save": []}
    step = 0
    # The two earlier ways: the full state gathered to rank 0 and written there, then `report` with Ray's
    # synchronous upload (before) or its asynchronous one (write_then_async_upload).
    for way, mode in (("before", ray.train.CheckpointUploadMode.SYNC),
                      ("write_then_async_upload", ray.train.CheckpointUploadMode.ASYNC)):
        for _ in range(config["reps"]):
            time.sleep(config["gap_s"])  # as between checkpoints in a run: Ray's queue is drained, nothing in flight
            step += 1
            t0 = time.perf_counter()
            model_sd, optim_sd = full_state_dicts(model, opt)
            tmp = None
            if rank == 0:
                tmp = local_checkpoint_dir()
                write_checkpoint(tmp, unwrap(model), model_sd, tok, {"step": step, "optimizer": optim_sd})
            ray.train.report({"step": step, "score": float(step)},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if tmp else None,
                             checkpoint_dir_name=f"step_{step:07d}", checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=True)
            times[way].append(time.perf_counter() - t0)
            del model_sd, optim_sd
    cpu, metrics, pending = torch.device("cpu"), Path(config["out"]) / "metrics.jsonl", None
    for _ in range(config["reps"]):
        time.sleep(config["gap_s"])  # the previous write and upload done: they do not slow this save
        step += 1
        t0 = time.perf_counter()
        # as at a log line: hand the previous (written) checkpoint to Ray, then save this one
        report_checkpoint(pending, rank, cpu, metrics, wait=True)
        t1 = time.perf_counter()
        pending = save_checkpoint(model, opt, tok, cfg, RunState(step=step), {}, rank, cpu, metrics, {})
        times["after"].append(time.perf_counter() - t0)
        times["after_report"].append(t1 - t0)  # the parts: handing the previous one to Ray ...
        times["after_save"].append(time.perf_counter() - t1)  # ... and this one's snapshot
    report_checkpoint(pending, rank, cpu, metrics, wait=True)
    if rank == 0:
        Path(config["out"], "times.json").write_text(json.dumps(times))


def run_one(model: str, strategy: str, workers: int, reps: int, gap_s: float, root: Path) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from train.config import TrainConfig

    out = root / f"{model}-{strategy}"
    out.mkdir(parents=True)
    cfg = TrainConfig(model=model, strategy=strategy, num_workers=workers, global_batch_size=2 * workers,
                      precision="fp32")
    trainer = TorchTrainer(
        bench_loop, train_loop_config={"cfg": cfg.__dict__, "reps": reps, "gap_s": gap_s, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="bench", storage_path=str(out / "storage"),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.fit()
    times = json.loads((out / "times.json").read_text())
    kept = sorted((out / "storage" / "bench").glob("step_*"))
    size = {d.name: sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) for d in kept}
    params = sum(p.numel() for p in __import__("train.model", fromlist=["x"]).build_model(model, 98).parameters())
    return {"model": model, "params": params, "strategy": strategy, "workers": workers, "reps": reps,
            "before_s": round(statistics.median(times["before"]), 3),
            "write_then_async_upload_s": round(statistics.median(times["write_then_async_upload"]), 3),
            "after_s": round(statistics.median(times["after"]), 3),
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "checkpoint_mb": {k: round(v / 2**20, 1) for k, v in size.items()}}


def main() -> None:
    import ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["t5-tiny", "t5-small-scratch"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gap", type=float, default=5.0, help="seconds between saves")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    args = p.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as root:
        for model in args.models:
            for strategy, workers in (("ddp", 1), ("fsdp", 2)):
                if strategy not in args.strategies:
                    continue
                print(json.dumps(run_one(model, strategy, workers, args.reps, args.gap, Path(root))), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
