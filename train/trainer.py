"""The driver side: check inputs, size the request, run the TorchTrainer, export the best model.

`run(cfg, ray_cfg)` is the Python API `cluster.run` calls (Ray may already be up; it is never shut down
here). Everything that can be refused is refused before `fit()`: a missing or incomplete pipeline
output, an unwritable output or storage path, checkpoints in storage from another model, and a worker
request the cluster can never schedule (instead of a run that waits forever).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from cluster.config import RayConfig
from cluster.connect import init_ray, require_resources
from cluster.core import (
    ConfigError,
    DataError,
    DivergedError,
    check_data_dir,
    check_writable,
    load_tokenizer,
    open_split,
    read_json,
    write_json_atomic,
)
from cluster.storage import require_shared_storage
from train.config import TrainConfig
from train.data import TRAIN_COLUMNS, VAL_COLUMNS, split_bytes, validation_subset
from train.tracking import TENSORBOARD_DIR

log = logging.getLogger("mathtune.train")


def check_existing_checkpoints(cfg: TrainConfig, vocab_size: int, pad_id: int, eos_id: int, in_memory: bool) -> None:
    """A run name whose storage holds checkpoints of another architecture, or of another data order (seed,
    worker count, micro batch, loading mode), would resume into a mismatch: refuse before starting
    workers, naming the differing fields."""
    from train.checkpoint import read_config
    from train.loop import check_data_order, data_order
    from train.model import TINY_CONFIGS, check_same_arch, tiny_config

    storage = cfg.resolved_storage_path()
    if "://" in storage:
        return
    run_dir = Path(storage) / cfg.run_name
    found = sorted(run_dir.glob("step_*/config.json"))
    if not found:
        return
    latest = found[-1].parent
    manifest = read_json(latest / "checkpoint.json") or {}
    check_data_order(manifest.get("data_order"), data_order(cfg, cfg.num_workers, in_memory), str(latest))
    if cfg.model in TINY_CONFIGS:
        expected = tiny_config(cfg.model, vocab_size, pad_id, eos_id)
    else:
        from transformers import AutoConfig

        try:
            expected = AutoConfig.from_pretrained(os.path.expanduser(cfg.model), trust_remote_code=False)
        except OSError:
            return  # the worker's own load check reports it
    check_same_arch(expected, read_config(latest), where=str(latest))


def steady_rate(metrics: dict[str, Any], global_batch_size: int) -> dict[str, Any]:
    """Samples/s without each start's first step (train.compile's compilation, CUDA warm-up: a 30-step
    compiled CPU run trained at 5 samples/s overall and 170-225 after its first step), beside the overall
    rate; None when every step was a first step."""
    n, secs = metrics.get("first_steps", 0), metrics.get("first_steps_s", 0.0)
    rest_s = metrics["train_time_s"] - secs
    rest = metrics["samples"] - n * global_batch_size
    return {"first_steps": n, "first_steps_s": round(secs, 2),
            "samples_per_s_after_first_step": rest / rest_s if rest > 0 and rest_s > 0 else None}


def resolve_max_steps(cfg: TrainConfig, train_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    steps = math.ceil(cfg.epochs * train_rows / cfg.global_batch_size)
    if steps <= cfg.warmup_steps:
        raise ConfigError(f"train.epochs={cfg.epochs} gives {steps} steps, not more than warmup_steps={cfg.warmup_steps}")
    return steps


def run(cfg: TrainConfig, ray_cfg: RayConfig | None = None) -> dict[str, Any]:
    import copy

    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from train.checkpoint import export_model_dir
    from train.loop import divergence, train_loop_per_worker

    t_start = time.time()
    ray_cfg = ray_cfg or RayConfig()
    if not cfg.data:
        raise ConfigError("train.data is required: the pipeline output folder (--data DIR)")
    check_data_dir(cfg.data)
    tokenizer = load_tokenizer(cfg.resolved_tokenizer())
    # Absolute paths: workers run in other working directories.
    cfg = dataclasses.replace(cfg, data=os.path.abspath(cfg.data), output=os.path.abspath(cfg.output),
                              tokenizer=os.path.abspath(cfg.resolved_tokenizer())
                              if os.path.isdir(cfg.resolved_tokenizer()) else cfg.resolved_tokenizer())
    out = Path(cfg.output)
    check_writable(cfg.output, "train.output")
    storage = cfg.resolved_storage_path()
    check_writable(storage, "train.storage_path")
    if "mlflow" in cfg.tracking:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise ConfigError("train.tracking includes mlflow, but the mlflow package is not installed "
                              "(pip install mlflow-skinny)") from e
    train_files = open_split(cfg.data, "train", TRAIN_COLUMNS)
    val_files = open_split(cfg.data, "validation", VAL_COLUMNS)
    train_rows = train_files.count_rows()  # from the Parquet footers
    if train_rows < cfg.global_batch_size:
        raise DataError(f"the train split has {train_rows} rows, fewer than one global batch ({cfg.global_batch_size})")
    max_steps = resolve_max_steps(cfg, train_rows)
    train_mb = split_bytes(train_files.files) / 2**20
    in_memory = train_mb <= cfg.in_memory_max_mb
    check_existing_checkpoints(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, in_memory)
    # A fixed subset, picked and read once on the driver and shipped with the config: every validation
    # scores the same rows, each regime (and module) in its share, without a Ray Data job.
    val_rows = validation_subset(val_files, cfg.eval_samples, cfg.num_workers, cfg.seed) if cfg.eval_samples else None
    # Decoding stops at the longest answer of the subset (eos included): answers are a few tokens.
    val_max_new = min(cfg.max_new_tokens, max(map(len, val_rows["labels"]))) if val_rows else cfg.max_new_tokens

    init_ray(ray_cfg)
    # Multi-node: workers must see the data, rank 0's outputs and the checkpoints (cluster/storage.py).
    per_worker = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    require_shared_storage({"train.data": (cfg.data, False), "train.output": (cfg.output, False),
                            "train.storage_path": (storage, True)}, ray_cfg, per_worker, cfg.num_workers)
    # Small splits are read by the workers themselves (once, reshuffled in memory each epoch); only a large
    # one goes through Ray Data.
    datasets = {} if in_memory else {"train": ray.data.read_parquet(train_files.files, columns=list(TRAIN_COLUMNS))}

    require_resources(
        f"training ({cfg.num_workers} workers x {per_worker})",
        cpus=cfg.num_workers * cfg.cpus_per_worker, gpus=cfg.num_workers if cfg.use_gpu else 0,
        per_bundle=per_worker, bundles=cfg.num_workers, timeout_s=ray_cfg.resource_timeout_s,
    )
    # Deterministic data order: with preserve_order the splitter hands blocks out in order to the
    # least-fed worker, so the same seed + worker count replays the same batches (and resume can skip).
    # A copy of the context's options: DataConfig.default_ingest_options() trips Ray's exclude_resources
    # deprecation warning (it passes that field to the ExecutionOptions constructor).
    exec_opts = copy.deepcopy(ray.data.DataContext.get_current().execution_options)
    exec_opts.preserve_order = True
    log.info("[train] %s: %d steps x %d sequences (%d workers x %s micro x %s accum), %d train rows (%.1f MB, %s); "
             "storage %s/%s", cfg.model, max_steps, cfg.global_batch_size, cfg.num_workers,
             "auto" if cfg.auto_micro_batch else cfg.micro_batch, "auto" if cfg.auto_micro_batch else cfg.grad_accum,
             train_rows, train_mb, "read once per worker" if in_memory else "streamed",
             storage, cfg.run_name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "max_steps": max_steps, "validation": val_rows,
                           "val_max_new_tokens": val_max_new,
                           "train_files": list(train_files.files) if in_memory else None},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_best_k, checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=exec_opts),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if (nan := divergence(out / "metrics.jsonl")) is not None:
        last = nan["last_checkpoint_step"]
        raise DivergedError(
            f"training diverged: loss {nan['loss']}, largest gradient norm {nan['grad_norm']} over steps "
            f"{nan['first_step']}-{nan['step']} (lr {nan['lr']:.2e}, precision {cfg.precision}); stopped without "
            f"saving that state. Lower train.lr (now {cfg.lr:g}) or raise train.warmup_steps (now "
            f"{cfg.warmup_steps}). " + (f"The last checkpoint is step {last} in {storage}/{cfg.run_name}: rerunning "
                                        f"resumes from it (with the new settings), a new run_name starts over"
                                        if last else "No checkpoint was saved: a rerun starts over"))

    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"training finished without a checkpoint in {storage}/{cfg.run_name}")
    # result.metrics / result.checkpoint: the last reported checkpoint (Train V2); best_checkpoints: the
    # kept ones, which may leave out the latest when it does not rank among the best K.
    final_metrics = result.metrics
    candidates = [*(result.best_checkpoints or []), (result.checkpoint, final_metrics)]
    best_ckpt, best_metrics = max(candidates, key=lambda cm: (cm[1].get("score", -1e9), cm[1]["step"]))
    with best_ckpt.as_directory() as d:
        export_model_dir(d, out / "final")
    wall = time.time() - t_start
    summary = {
        "model": cfg.model,
        "steps": final_metrics["step"],
        "max_steps": max_steps,
        "samples": final_metrics["samples"],
        "tokens": final_metrics["tokens"],
        "wall_time_s": round(wall, 2),
        "train_time_s": round(final_metrics["train_time_s"], 2),
        "samples_per_s": final_metrics["samples"] / max(final_metrics["train_time_s"], 1e-9),
        "tokens_per_s": final_metrics["tokens"] / max(final_metrics["train_time_s"], 1e-9),
        **steady_rate(final_metrics, cfg.global_batch_size),
        "final": {k: final_metrics.get(k) for k in ("step", "val_loss", "val_exact_match", "val_samples")},
        "best": {k: best_metrics.get(k) for k in ("step", "val_loss", "val_exact_match", "val_samples")},
        "best_checkpoint": best_ckpt.path,
        "stopped_early": bool(final_metrics.get("stopped_early", False)),
        "max_time_s": cfg.max_time_s,
        "stopped_by_time": bool(final_metrics.get("stopped_by_time", False)),
        "early_stopping_patience": cfg.early_stopping_patience,
        "data_loading": "memory" if in_memory else "stream",
        "tensorboard_dir": str(out / TENSORBOARD_DIR),
        "final_dir": str(out / "final"),
        "num_workers": cfg.num_workers,
        "global_batch_size": cfg.global_batch_size,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "precision": cfg.precision,
        "strategy": cfg.strategy,
        "run_name": cfg.run_name,
        "storage_path": storage,
    }
    write_json_atomic(out / "summary.json", summary)
    if summary["stopped_early"]:
        log.info("[train] stopped early at step %d (no better validation score in %d validations); final/ "
                 "is the best checkpoint, step %s", summary["steps"], cfg.early_stopping_patience, summary["best"]["step"])
    steady = summary["samples_per_s_after_first_step"]
    log.info("[train] done: %d steps, %d samples in %.0fs (%.0f samples/s training%s); best val exact match %.4f "
             "at step %s -> %s", summary["steps"], summary["samples"], wall, summary["samples_per_s"],
             f", {steady:.0f} after the first step" if steady else "",
             summary["best"]["val_exact_match"] or 0.0, summary["best"]["step"], summary["final_dir"])
    return summary
