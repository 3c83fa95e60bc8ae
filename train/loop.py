"""The training loop each Ray Train worker runs (`train_loop_per_worker`): one visible loop.

setup (model, resume, wrap, optimizer) -> for each step: LR, `grad_accum` micro batches, clip, AdamW ->
every log_every: one progress line -> every eval_every: validation loss + exact match (sharded across
workers, all-reduced) -> every ckpt_every and at the end: checkpoint via `ray.train.report`.

Everything the loop needs arrives in `config` (a plain dict, so Ray can ship it): the TrainConfig fields
under "cfg" plus what the driver resolved ("max_steps").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.collate import IGNORE_INDEX, Collator, collate_seq2seq
from train.config import TrainConfig
from train.ddp_hooks import apply_comm_hook

log = logging.getLogger("mathtune.train")


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr, then linear decay to lr * min_lr_ratio at max_steps (a pure function of
    the step, so a resumed run continues the schedule exactly)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return cfg.lr * (1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, frac))


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop entries logged after the checkpoint's step (they will be logged again), so the file
    stays one consistent history instead of two overlapping ones."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum across workers (a sync point: called once per log interval / validation, not per step)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU; works for DDP and FSDP2 alike. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def validate(model, dataset, tokenizer, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Token-level loss and exact match by greedy generation on this worker's shard, summed over workers."""
    from eval.metrics import exact_match
    from train.decode import greedy_decode

    model.eval()
    core = unwrap(model)
    loss_sum = n_tok = correct = total = 0.0
    with torch.no_grad():
        for b in dataset.iter_batches(batch_size=cfg.eval_batch_size, batch_format="numpy"):
            batch = {k: v.to(device) for k, v in collate_seq2seq(b, tokenizer.pad_token_id, cfg.pad_to_multiple_of).items()}
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            with autocast(cfg, device):
                loss_sum += float(core(**batch).loss) * n
                # FSDP: every rank must issue the same number of forwards (each is a collective).
                gen = greedy_decode(core, batch["input_ids"], batch["attention_mask"], cfg.max_new_tokens,
                                    fixed_steps=cfg.strategy == "fsdp")
            preds = tokenizer.batch_decode(gen.cpu(), skip_special_tokens=True)
            correct += sum(exact_match(p, str(r)) for p, r in zip(preds, b["answer"], strict=True))
            total += len(preds)
            n_tok += n
    model.train()
    loss_sum, n_tok, correct, total = all_sum([loss_sum, n_tok, correct, total], device)
    return {
        "val_loss": loss_sum / max(n_tok, 1),
        "val_exact_match": correct / max(total, 1),
        "val_samples": int(total),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from train.checkpoint import load_train_state, load_weights, read_config, write_checkpoint
    from train.model import build_model, check_same_arch

    cfg = TrainConfig(**config["cfg"])
    max_steps: int = config["max_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)  # 2 workers on 2 cores: 1 thread each, no oversubscription
    device = ray.train.torch.get_device()
    out = Path(cfg.output)
    metrics_path = out / "metrics.jsonl"
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # ---- model (same seed on every rank: identical init, DDP/FSDP would sync it anyway) ----
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.resolved_tokenizer())
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.dropout)
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)

    # ---- resume ----
    state: dict[str, Any] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_train_state(d)
            check_same_arch(model.config, read_config(d), where=ckpt.path)
            load_weights(model, d)
        if rank == 0:
            log.info("[train] resuming from checkpoint %s at step %d (epoch %d, batch %d)",
                     ckpt.path, state["step"], state["epoch"], state["batch_in_epoch"])
            truncate_metrics(metrics_path, state["step"])
            append_jsonl(metrics_path, {"event": "resume", "step": state["step"], "checkpoint": ckpt.path})

    # ---- distribute ----
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.to(device)
        for block in [*model.encoder.block, *model.decoder.block]:
            fully_shard(block)
        fully_shard(model)
    else:
        model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) + move to device
        apply_comm_hook(model, cfg.ddp_comm_hook)  # bf16 gradient all-reduce between nodes (train/ddp_hooks.py)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
        fused=device.type == "cuda" and cfg.strategy == "ddp",  # one kernel for all params on GPU
    )
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))

    step = state["step"] if state else 0
    epoch = state["epoch"] if state else 0
    skip = state["batch_in_epoch"] if state else 0
    samples_done = state["samples"] if state else 0
    tokens_done = state["tokens"] if state else 0
    train_time = state["train_time_s"] if state else 0.0
    best = state.get("best") if state else None
    val: dict[str, float] = state.get("last_val", {}) if state else {}
    if rank == 0:
        if state is None:  # a fresh start (or a restart before any checkpoint was committed): new history
            truncate_metrics(metrics_path, 0)
        append_jsonl(metrics_path, {"event": "start", "step": step, "rank": rank, "pid": os.getpid(),
                                    "world_size": world, "max_steps": max_steps})

    # ---- data: this worker's shard, epoch after epoch; the position (epoch, batch) is checkpointed ----
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if cfg.eval_samples else None
    collator = Collator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)

    def micro_batches():
        nonlocal epoch, skip
        while True:
            n = 0
            for i, b in enumerate(shard.iter_torch_batches(
                batch_size=cfg.micro_batch, collate_fn=collator, drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer * cfg.micro_batch or None,
                local_shuffle_seed=cfg.seed + epoch,
            )):
                n += 1
                if i < skip:  # resume: replay the order, skip what was already trained on
                    continue
                skip = i + 1
                yield b
            if n == 0:
                raise RuntimeError(
                    f"worker {rank}'s train shard yields no full batch of {cfg.micro_batch}: the train split "
                    f"is too small for global_batch_size={cfg.global_batch_size} on {world} workers"
                )
            epoch, skip = epoch + 1, 0

    batches = micro_batches()
    # Interval accumulators (reduced across workers at each log line).
    iv_loss = iv_micro = iv_tokens = iv_samples = 0.0
    iv_t0 = time.perf_counter()
    iv_train_time = 0.0

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            last = micro == cfg.grad_accum - 1
            # Gradient all-reduce only on the last micro batch of the step.
            if cfg.strategy == "fsdp":
                model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync, autocast(cfg, device):
                loss = model(**batch).loss
            (loss / cfg.grad_accum).backward()
            iv_loss += loss.detach().float()  # a tensor: no CPU-GPU sync per micro batch
            iv_micro += 1
            iv_tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
            iv_samples += batch["input_ids"].size(0)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        iv_train_time += time.perf_counter() - t0

        samples_done += cfg.global_batch_size  # exact: drop_last keeps every micro batch full
        ckpt_now = step % cfg.ckpt_every == 0 or step == max_steps
        if step % cfg.log_every == 0 or ckpt_now:
            loss_sum, n_micro, toks, smp = all_sum([float(iv_loss), iv_micro, iv_tokens, iv_samples], device)
            tokens_done += int(toks)
            train_time += iv_train_time
            elapsed = time.perf_counter() - iv_t0
            rec = {"step": step, "loss": loss_sum / max(n_micro, 1), "lr": lr, "epoch": epoch,
                   "samples": samples_done, "samples_per_s": smp / elapsed, "tokens_per_s": toks / elapsed}
            if rank == 0:
                eta = (max_steps - step) * elapsed * cfg.global_batch_size / max(smp, 1)
                log.info("[train] step %d/%d loss %.4f lr %.2e %.0f samples/s %.0f tokens/s eta %s",
                         step, max_steps, rec["loss"], lr, rec["samples_per_s"], rec["tokens_per_s"],
                         time.strftime("%H:%M:%S", time.gmtime(eta)))
                append_jsonl(metrics_path, rec)
            iv_loss = iv_micro = iv_tokens = iv_samples = iv_train_time = 0.0
            iv_t0 = time.perf_counter()

        evaluate = val_shard is not None and (step % cfg.eval_every == 0 or step == max_steps)
        if evaluate:
            t_eval = time.perf_counter()
            val = validate(model, val_shard, tokenizer, cfg, device)
            # Rank by exact match; the tiny loss term only breaks ties (EM moves in steps of 1/eval_samples).
            val["score"] = val["val_exact_match"] - 1e-6 * min(val["val_loss"], 100.0)
            if best is None or val["score"] > best["score"]:
                best = {"step": step, **val}
            if rank == 0:
                log.info("[train] validation step %d: loss %.4f exact match %.4f (%d rows, %.1fs)",
                         step, val["val_loss"], val["val_exact_match"], val["val_samples"],
                         time.perf_counter() - t_eval)
                append_jsonl(metrics_path, {"step": step, **val})
            iv_t0 += time.perf_counter() - t_eval  # validation time is not training throughput

        if ckpt_now:
            t_ck = time.perf_counter()
            model_sd, optim_sd = full_state_dicts(model, optimizer)
            metrics = {"step": step, "epoch": epoch, "samples": samples_done, "tokens": tokens_done,
                       "train_time_s": train_time, **val}
            if "score" not in metrics:  # eval disabled: rank checkpoints by recency
                metrics["score"] = float(step)
            train_state = {"step": step, "epoch": epoch, "batch_in_epoch": skip, "samples": samples_done,
                           "tokens": tokens_done, "train_time_s": train_time, "optimizer": optim_sd,
                           "best": best, "last_val": val, "seed": cfg.seed, "world_size": world}
            with tempfile.TemporaryDirectory(prefix="mathtune-ckpt-") as tmp:
                checkpoint = None
                if rank == 0:
                    write_checkpoint(tmp, unwrap(model), model_sd, tokenizer, train_state)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                # Every rank reports (it is a barrier); only rank 0 carries files.
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:07d}")
            if rank == 0:
                # Uploaded; Ray's controller commits it (checkpoint_manager_snapshot.json) at its next poll (~2 s):
                # a crash before that resumes from the previous checkpoint.
                log.info("[train] checkpoint written at step %d (%.1fs)", step, time.perf_counter() - t_ck)
                append_jsonl(metrics_path, {"event": "checkpoint", "step": step})
            iv_t0 += time.perf_counter() - t_ck
    if rank == 0 and not math.isfinite(float(val.get("val_loss", 0.0))):
        log.warning("[train] validation loss is not finite: check lr / precision")
