"""The training loop each Ray Train worker runs (`train_loop_per_worker`), in named parts:

    setup_model (build, resume) -> distribute (DDP or FSDP2) -> make_optimizer -> make_batches
    loop: set the LR -> train_step (grad_accum micro batches, clip, AdamW)
          every log_every:  log_interval (one progress line, metrics.jsonl, TensorBoard/MLflow)
          every eval_every: validate (loss + exact match, sharded, all-reduced) -> early stopping
          every ckpt_every, at an improving validation when early stopping, and at the end: save_checkpoint
          (written locally, on a background thread under DDP, sharded under FSDP; Ray uploads it in the
          background while training goes on)

Everything the loop needs arrives in `config` (a plain dict, so Ray can ship it): the TrainConfig fields
under "cfg" plus what the driver resolved ("max_steps", the in-memory train files or None for a streamed
split, the validation subset and its decoding bound).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.core import CheckpointError, append_jsonl, read_jsonl, write_text_atomic
from train.collate import collate_seq2seq
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
    write_text_atomic(path, "".join(k + "\n" for k in keep))


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


# ---------------------------------------------------------------------------------------------------
# The run's state: what a checkpoint saves besides weights and optimizer, and what resume checks.


@dataclasses.dataclass
class RunState:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    epoch: int = 0  # data position: epoch, and micro batches of it already trained on
    batch_in_epoch: int = 0
    last_val: dict[str, float] = dataclasses.field(default_factory=dict)
    best_score: float | None = None  # early stopping: the best validation score so far ...
    since_best: int = 0  # ... and the validations since it
    end_step: int | None = None  # train.max_time_s: the step where the budget runs out (last estimate)
    # The first step of each start (fresh or resumed) holds one-off costs (train.compile's compilation, CUDA
    # warm-up): their seconds and count, so the summary can give the steady rate beside the overall one.
    first_steps_s: float = 0.0
    first_steps: int = 0

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> RunState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def data_order(cfg: TrainConfig, world: int, in_memory: bool) -> dict[str, Any]:
    """What the saved data position means: the same (epoch, batch) is the same data only with the same
    seed, worker count, micro batch and loading mode. Saved with every checkpoint and compared on resume
    (by the driver from the manifest before Ray starts, and by each worker)."""
    order = {"seed": cfg.seed, "world_size": world, "data_loading": "memory" if in_memory else "stream",
             "length_bucketing": cfg.length_bucketing}
    if not cfg.auto_micro_batch:  # auto is chosen on the workers, and a resume adopts the checkpoint's
        order["micro_batch"] = cfg.micro_batch
    return order


def resolve_micro_batch(cfg: TrainConfig, device: torch.device, saved: dict[str, Any] | None) -> TrainConfig:
    """train.micro_batch_size auto: a resumed run keeps its checkpoint's micro batch (its data position
    counts micro batches); a fresh one takes the planner's choice for this GPU's free memory, the smallest
    over all workers (DDP steps in lockstep: every rank the same accumulation)."""
    if not cfg.auto_micro_batch:
        return cfg
    from train.plan import choose_micro_batch, micro_batch_candidates

    saved_micro = ((saved or {}).get("data_order") or {}).get("micro_batch")
    if saved_micro:
        return cfg.with_micro_batch(int(saved_micro))
    memory = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        memory = free + torch.cuda.memory_reserved(device)  # what this process holds is ours to plan with
    chosen = choose_micro_batch(cfg, memory) or micro_batch_candidates(cfg.per_worker_batch)[0]
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([chosen], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        chosen = int(t.item())
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("[train] micro batch %d, %d accumulation steps (the planner's choice for %s)", chosen,
                 cfg.per_worker_batch // chosen, f"{memory / 2**30:.1f} GiB" if memory else "CPU")
    return cfg.with_micro_batch(chosen)


def check_data_order(saved: dict[str, Any] | None, now: dict[str, Any], where: str) -> None:
    if not saved:
        return
    diff = {k: (saved.get(k), v) for k, v in now.items() if k in saved and saved[k] != v}
    if diff:
        shown = ", ".join(f"{k}={a!r} (this run: {b!r})" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint {where} was trained with {shown}: its data position would point at other rows. "
            "Resume with the same seed, num_workers and micro batch (and train.in_memory_max_mb on the same "
            "side of the split's size), or start a new run (a different run_name or storage_path)."
        )


# ---------------------------------------------------------------------------------------------------
# Setup


def setup_model(cfg: TrainConfig, tokenizer, rank: int, metrics_path: Path) -> tuple[Any, dict | None]:
    """The model (identical init on every rank) and, when Ray hands back a checkpoint, the saved training
    state. A full checkpoint's weights load here; a sharded one's load after `distribute`
    (`load_sharded_checkpoint`: each rank reads only its shards)."""
    import ray.train

    from train.checkpoint import is_sharded, load_train_state, load_weights, read_config
    from train.model import build_model, check_same_arch

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.dropout)
    if cfg.precision == "bf16":
        model = model.to(torch.bfloat16)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return model, None
    with ckpt.as_directory() as d:
        saved = load_train_state(d)
        check_same_arch(model.config, read_config(d), where=ckpt.path)
        saved["sharded"] = is_sharded(d)
        if not saved["sharded"]:
            load_weights(model, d)
    saved["checkpoint"] = ckpt.path
    if rank == 0:
        log.info("[train] resuming from checkpoint %s at step %d (epoch %d, batch %d)",
                 ckpt.path, saved["step"], saved["epoch"], saved["batch_in_epoch"])
        truncate_metrics(metrics_path, saved["step"])
        append_jsonl(metrics_path, {"event": "resume", "step": saved["step"], "checkpoint": ckpt.path})
    return model, saved


def load_sharded_checkpoint(model, optimizer) -> None:
    """Resume from a sharded (FSDP) checkpoint: DCP reads each rank's part of the model and AdamW state
    straight into the distributed model. On local or shared storage nothing is copied first; from s3://
    Ray downloads the checkpoint folder before DCP reads it. Collective."""
    import ray.train

    from train.checkpoint import load_sharded_state

    with ray.train.get_checkpoint().as_directory() as d:
        load_sharded_state(model, optimizer, d)


def fsdp_policy(cfg: TrainConfig):
    """FSDP2's mixed precision for bf16-mixed: bf16 weights in the all-gathers and the forward, fp32
    gradient reduction and fp32 master weights (None otherwise)."""
    if cfg.precision != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def compile_blocks(model, backend: str | Callable = "inductor") -> None:
    """torch.compile each T5 block in place (the blocks are where the kernel launches are; the embedding,
    head and loss stay eager), with dynamic shapes: four graphs (the first encoder and decoder blocks
    compute the position bias, the other encoder and decoder blocks share one graph each), compiled in the
    first step and reused for every padded length bucketing produces.

    Every block of a T5 runs the same Python function, and dynamo compiles at most 8 variants of one
    function (`recompile_limit`); past that, whatever matches none of them runs eager, after one warning
    line. Measured on CPU: with static shapes t5-mini reached the limit at its second (question, answer)
    length pair, and from then on every block meeting a new length ran eager; a forward that fills T5's
    KV cache guards each decoder block on its own cache slot, and a 12+12-layer T5 reached the limit at
    its 6th decoder block (so train_step passes use_cache=False). Validation runs eager (`validate`):
    cached decoding would need a variant per decoded position.

    Under DDP, dynamo's DDP optimizer (which splits a compiled graph at DDP's bucket boundaries) fails on
    these dynamic-shape graphs ("'int' object has no attribute 'meta'" at the first step, measured with
    torch 2.13 in Ray workers and in one process), so it is off: the block graphs are boundaries enough,
    each block's backward hands DDP its gradients for all-reduce while the next block's runs."""
    torch._dynamo.config.optimize_ddp = False
    for block in [*model.encoder.block, *model.decoder.block]:
        block.compile(dynamic=True, backend=backend)


def shard(model, mp_policy=None) -> None:
    """FSDP2: one unit per T5 block, then the root (embeddings, head, final norms)."""
    from torch.distributed.fsdp import fully_shard

    # A T5 block returns the relative position bias as a slice (a view) that the next block reuses, and FSDP2
    # warns, in every worker, that an in-place op on such an output would skip its all-gather. T5 only adds
    # the bias out of place (transformers' modeling_t5: `attn_weights + position_bias`), and FSDP runs replay
    # DDP's loss curve (tests/test_train_ray.py), so that warning, for T5 blocks only, is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPT5Block\) returned a view tensor")
    kw = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def distribute(model, cfg: TrainConfig, device: torch.device):
    """Compile the T5 blocks (optional), then shard (FSDP2, one unit per block) or replicate (DDP)."""
    import ray.train.torch

    if cfg.compile:
        compile_blocks(model)
    if cfg.strategy == "fsdp":
        model.to(device)
        shard(model, fsdp_policy(cfg))
    else:
        model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU) + move to device
        apply_comm_hook(model, cfg.ddp_comm_hook)  # bf16 gradient all-reduce between nodes (train/ddp_hooks.py)
    model.train()
    return model


def make_optimizer(model, cfg: TrainConfig, device: torch.device, saved: dict | None):
    saved_name = (saved or {}).get("optimizer_name", "adamw")  # checkpoints before the option: AdamW's
    if saved is not None and saved_name != cfg.optimizer:
        raise CheckpointError(f"checkpoint {saved['checkpoint']} holds {saved_name}'s state, this run's "
                              f"train.optimizer is {cfg.optimizer}: resume with the same optimizer, or start a "
                              "new run (a different run_name or storage_path)")
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # scale_parameter: each step is lr x the tensor's RMS; relative_step off: the loop sets the LR
        optimizer = Adafactor(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=True,
                              relative_step=False, warmup_init=False)
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2),
            fused=device.type == "cuda",  # one kernel for all parameters (plain and FSDP2 DTensors alike)
        )
    if saved is not None and "optimizer" in saved:  # a full checkpoint (a sharded one: load_sharded_checkpoint)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    return optimizer


def make_batches(cfg: TrainConfig, config: dict[str, Any], tokenizer, rank: int, world: int,
                 device: torch.device, state: RunState):
    """This worker's micro batches, continuing at the saved data position."""
    from train.data import InMemoryShard, ShardIterator, StreamedShard

    if config["train_files"]:
        source = InMemoryShard(config["train_files"], rank, world, cfg.micro_batch, cfg.seed,
                               tokenizer.pad_token_id, cfg.pad_to_multiple_of, cfg.length_bucketing)
    else:
        import ray.train

        source = StreamedShard(ray.train.get_dataset_shard("train"), rank, cfg.micro_batch, cfg.seed,
                               cfg.shuffle_buffer, tokenizer.pad_token_id, cfg.pad_to_multiple_of,
                               pin_memory=device.type == "cuda", bucket_window=cfg.length_bucketing)
    return ShardIterator(source, state.epoch, state.batch_in_epoch)


# ---------------------------------------------------------------------------------------------------
# The parts of a step


@dataclasses.dataclass
class Interval:
    """What happened since the last log line; the loss stays a device tensor (no sync per micro batch)."""

    loss: Any = 0.0
    micro: int = 0
    tokens: int = 0
    samples: int = 0
    train_time: float = 0.0
    grad_norm: Any = 0.0  # the largest gradient norm of the interval (before clipping), a device tensor
    t0: float = dataclasses.field(default_factory=time.perf_counter)


def train_step(model, optimizer, batches, cfg: TrainConfig, device: torch.device, world: int, iv: Interval) -> None:
    from train.data import host_counts, to_device

    t0 = time.perf_counter()
    for micro in range(cfg.grad_accum):
        batch = next(batches)
        samples, tokens = host_counts(batch)  # counted on the host, before the copy: no device sync
        batch = to_device(batch, device)
        last = micro == cfg.grad_accum - 1
        # Gradient all-reduce only on the last micro batch of the step.
        if cfg.strategy == "fsdp":
            model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
        with sync, autocast(cfg, device):
            # use_cache=False: otherwise T5's decoder fills a KV cache that training never reads, and under
            # train.compile each decoder block's guard on its own cache slot is one more compiled variant
            # (compile_blocks).
            loss = model(**batch, use_cache=False).loss
        (loss / cfg.grad_accum).backward()
        iv.loss = iv.loss + loss.detach().float()
        iv.micro, iv.tokens, iv.samples = iv.micro + 1, iv.tokens + tokens, iv.samples + samples
    # The norm is always computed (max_norm inf: no clipping): it is logged, and a non-finite one stops
    # the run before the optimizer's NaN weights reach a checkpoint (see `diverged`).
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (each rank's partial norm); one scalar all-reduce
        norm = norm.full_tensor()
    norm = norm.detach().float()  # stays on the device: no sync (the first step's float would be a copy to it)
    iv.grad_norm = norm if isinstance(iv.grad_norm, float) else torch.maximum(iv.grad_norm, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iv.train_time += time.perf_counter() - t0


def log_interval(iv: Interval, state: RunState, lr: float, epoch: int, max_steps: int, cfg: TrainConfig,
                 device: torch.device, rank: int, metrics_path: Path, tracker) -> dict[str, Any]:
    """One progress line (rank 0), summed over workers; returns the record, the same on every rank (the
    grad norm too: DDP averages the gradients, FSDP's norm is all-reduced)."""
    loss_sum, n_micro, toks, smp = all_sum([float(iv.loss), iv.micro, iv.tokens, iv.samples], device)
    state.tokens += int(toks)
    state.train_time_s += iv.train_time
    elapsed = time.perf_counter() - iv.t0
    rec = {"step": state.step, "loss": loss_sum / max(n_micro, 1), "grad_norm": float(iv.grad_norm), "lr": lr,
           "epoch": epoch, "samples": state.samples, "samples_per_s": smp / elapsed, "tokens_per_s": toks / elapsed}
    if rank == 0:
        eta = (max_steps - state.step) * elapsed * cfg.global_batch_size / max(smp, 1)
        if cfg.max_time_s is not None:  # the budget's end, also before the first estimate of its step
            eta = min(eta, max(0.0, cfg.max_time_s - state.train_time_s))
        log.info("[train] step %d/%d loss %.4f grad norm %.3g lr %.2e %.0f samples/s %.0f tokens/s eta %s",
                 state.step, max_steps, rec["loss"], rec["grad_norm"], lr, rec["samples_per_s"],
                 rec["tokens_per_s"], time.strftime("%H:%M:%S", time.gmtime(eta)))
        append_jsonl(metrics_path, rec)
        tracker.log_metrics({f"train/{k}": rec[k] for k in ("loss", "grad_norm", "lr", "samples_per_s",
                                                             "tokens_per_s", "epoch")}, state.step)
    return rec


def diverged(rec: dict[str, Any]) -> bool:
    return not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]))


def record_divergence(rec: dict[str, Any], first_step: int, last_saved: int | None, metrics_path: Path) -> None:
    """Rank 0, on a non-finite loss or gradient norm: say so, and leave the driver a `diverged` entry in
    metrics.jsonl (it raises DivergedError from it). The run stops cleanly rather than raising here: Ray
    Train retries every worker error (max_failures), and a retry would replay the same batches from the
    last checkpoint with the same LR into the same NaN."""
    log.error("[train] the loss went non-finite: loss %s, largest grad norm %s over steps %d-%d (lr %.2e); "
              "stopping without a checkpoint of it (last checkpoint: %s)", rec["loss"], rec["grad_norm"],
              first_step, rec["step"], rec["lr"], f"step {last_saved}" if last_saved else "none")
    append_jsonl(metrics_path, {"event": "diverged", "step": rec["step"], "first_step": first_step,
                                "loss": rec["loss"], "grad_norm": rec["grad_norm"], "lr": rec["lr"],
                                "last_checkpoint_step": last_saved})


def divergence(metrics_path: Path) -> dict[str, Any] | None:
    """The driver's side: the `diverged` entry of the latest attempt in metrics.jsonl, if it has one."""
    found = None
    for rec in read_jsonl(metrics_path):
        if rec.get("event") == "start":
            found = None  # an entry of an earlier attempt (resumed since) does not count
        elif rec.get("event") == "diverged":
            found = rec
    return found


def validate(model, rows: dict[str, list], tokenizer, cfg: TrainConfig, device: torch.device,
             max_new_tokens: int) -> dict[str, float]:
    """Token-level loss and exact match by greedy generation on this worker's rows, summed over workers."""
    from eval.metrics import exact_match
    from train.decode import greedy_decode

    model.eval()
    core = unwrap(model)
    loss_sum = n_tok = correct = total = 0.0
    # Eager even when train.compile is on: the compiled blocks stay the training step's (compile_blocks).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for i in range(0, len(rows["answer"]), cfg.eval_batch_size):
            part = {k: v[i:i + cfg.eval_batch_size] for k, v in rows.items()}
            batch = {k: v.to(device) for k, v in
                     collate_seq2seq(part, tokenizer.pad_token_id, cfg.pad_to_multiple_of).items()}
            n = sum(len(x) for x in part["labels"])  # from the host lists: no device sync
            with autocast(cfg, device):
                loss_sum += float(core(**batch).loss) * n
                # FSDP: every rank must issue the same number of forwards (each is a collective).
                gen = greedy_decode(core, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                    fixed_steps=cfg.strategy == "fsdp")
            preds = tokenizer.batch_decode(gen.cpu(), skip_special_tokens=True)
            correct += sum(exact_match(p, str(r)) for p, r in zip(preds, part["answer"], strict=True))
            total += len(preds)
            n_tok += n
    model.train()
    loss_sum, n_tok, correct, total = all_sum([loss_sum, n_tok, correct, total], device)
    val = {"val_loss": loss_sum / max(n_tok, 1), "val_exact_match": correct / max(total, 1), "val_samples": int(total)}
    # Rank by exact match; the tiny loss term only breaks ties (EM moves in steps of 1/eval_samples).
    val["score"] = val["val_exact_match"] - 1e-6 * min(val["val_loss"], 100.0)
    return val


def early_stopping_update(state: RunState, cfg: TrainConfig) -> tuple[bool, bool]:
    """After a validation: (is it a new best, whose checkpoint must then be kept; stop now?). Patience
    restarts only on a clear improvement: more than early_stopping_min_delta over the best so far."""
    score = state.last_val["score"]
    improved = state.best_score is None or score > state.best_score
    clear = state.best_score is None or score > state.best_score + cfg.early_stopping_min_delta
    state.best_score = score if improved else state.best_score
    state.since_best = 0 if clear else state.since_best + 1
    stop = cfg.early_stopping_patience is not None and state.since_best >= cfg.early_stopping_patience
    return improved, stop


def time_budget_end(iv: Interval, state: RunState, cfg: TrainConfig, max_steps: int, device: torch.device,
                    rank: int) -> int:
    """train.max_time_s: the step at which the budget runs out, at the run's mean seconds per step so far
    (rank 0's, all-reduced with zeros: every rank gets the same step, so they stop together), each start's
    first step left out (train.compile's compilation, CUDA warm-up); the last interval's rate until a later
    step is timed. A mean, not the last interval: one slow interval (a busy machine, a checkpoint upload)
    moved the end, and with it the LR schedule, back and forth (measured on a shared 2-core VM: 13,986 ->
    5,021 -> 10,724 steps in three intervals, the LR rising mid-decay). At a validation step, with less than
    a log interval of budget left, this step. Called after `log_interval` added the interval to
    state.train_time_s."""
    first = rank == 0
    steady = [state.train_time_s - state.first_steps_s, state.step - state.first_steps] if first else [0.0, 0]
    last = [iv.train_time, iv.micro / cfg.grad_accum] if first else [0.0, 0]
    used, steady_s, steady_steps, interval_s, steps = all_sum([state.train_time_s if first else 0.0, *steady, *last],
                                                             device)
    if steady_steps >= 1 and steady_s > 0:
        step_s = steady_s / steady_steps
    elif steps >= 1 and interval_s > 0:
        step_s = interval_s / steps
    else:
        return state.end_step or max_steps
    left_steps = int((cfg.max_time_s - used) / step_s)
    if state.step % cfg.eval_every == 0 and left_steps < cfg.log_every:
        # this step validates (and may checkpoint) anyway: end here rather than validate and write a
        # checkpoint again a few steps later, at the budget's end
        return state.step
    return max(state.step, min(max_steps, state.step + left_steps))


def log_validation(state: RunState, stopped_early: bool, seconds: float, metrics_path: Path, tracker) -> None:
    val = state.last_val
    log.info("[train] validation step %d: loss %.4f exact match %.4f (%d rows, %.1fs)",
             state.step, val["val_loss"], val["val_exact_match"], val["val_samples"], seconds)
    append_jsonl(metrics_path, {"step": state.step, **val})
    tracker.log_metrics({"val/loss": val["val_loss"], "val/exact_match": val["val_exact_match"]}, state.step)
    if stopped_early:
        log.info("[train] early stopping at step %d: %d validations without improvement", state.step,
                 state.since_best)
        append_jsonl(metrics_path, {"event": "early_stop", "step": state.step,
                                    "validations_without_improvement": state.since_best})


# Local checkpoint folders this process handed to Ray's background upload (Ray deletes each once uploaded).
_pending_uploads: list[str] = []
UPLOAD_WAIT_TIMEOUT_S = 3600.0


def wait_for_uploads(pending: list[str], max_pending: int = 1, timeout_s: float = UPLOAD_WAIT_TIMEOUT_S) -> float:
    """Backpressure for the background upload. Ray uploads one checkpoint at a time and queues the others,
    each a full local copy (9.4 GB for flan-t5-large under DDP): with storage slower than ckpt_every they
    would pile up until the disk is full. Waits until fewer than `max_pending` of `pending` still exist,
    at most timeout_s (then goes on: the caller warns); prunes `pending`; returns the seconds waited."""
    t0 = time.perf_counter()
    while True:
        pending[:] = [d for d in pending if os.path.exists(d)]
        waited = time.perf_counter() - t0
        if len(pending) < max_pending or waited >= timeout_s:
            return waited
        time.sleep(0.05)


@dataclasses.dataclass
class PendingCheckpoint:
    """A checkpoint written in the background, not yet handed to Ray (`report_checkpoint`)."""

    step: int
    metrics: dict[str, Any]
    layout: str
    directory: str | None = None  # this rank's local folder (None: this rank writes nothing)
    writer: threading.Thread | None = None  # rank 0's writing thread under DDP
    error: BaseException | None = None  # the writer's, raised in the training thread
    blocked_s: float = 0.0  # what the training thread spent on it (the snapshot, or a whole sharded write)
    upload_wait_s: float = 0.0
    write_s: float = 0.0  # the local write's own seconds (on the writer thread under DDP)

    def written(self) -> bool:
        return self.writer is None or not self.writer.is_alive()


def save_checkpoint(model, optimizer, tokenizer, cfg: TrainConfig, state: RunState, order: dict[str, Any],
                    rank: int, device: torch.device, metrics_path: Path,
                    extra_metrics: dict[str, Any]) -> PendingCheckpoint | None:
    """Write this step's checkpoint to local disk and hand it to Ray Train, which uploads it in the
    background while training goes on. Returns the checkpoint still being written (DDP), else None.

    FSDP: every rank writes its own shard (torch.distributed.checkpoint), nothing is gathered, and the
    checkpoint is reported at once. DDP and one worker: the state is replicated, so rank 0 writes all of
    it (a safetensors model folder + the optimizer: 9.4 GB for flan-t5-large) on a background thread from
    a CPU snapshot (the copy off the GPU, or a clone on a CPU run, is all the training thread waits for);
    `report_checkpoint` hands it to Ray at the first log line after the write is done, or at the next
    checkpoint or the end of training, which wait for it. Until then a crash resumes from the previous
    checkpoint, as a crash during a synchronous write would.
    The upload (`CheckpointUploadMode.ASYNC`): `report` returns at once; Ray copies the files to storage on
    a background thread, deletes the local folder after the copy, and commits the checkpoint
    (checkpoint_manager_snapshot.json) only when every rank's copy is done, in report order. A failed write
    or upload fails the worker group (it is raised in the training thread), which restarts from the last
    committed checkpoint under max_failures; it is never silently skipped. A new checkpoint is written only
    once the previous one's upload is done (`wait_for_uploads`): at most one local copy waits for storage,
    however slow it is. Every rank calls it: the snapshot, the shards and `report` are collectives."""
    from train.checkpoint import local_checkpoint_dir, write_checkpoint, write_sharded_checkpoint

    t_ck = time.perf_counter()
    upload_wait = wait_for_uploads(_pending_uploads)
    if _pending_uploads:
        log.warning("[train] rank %d: the previous checkpoint's upload is still running after %.0fs; writing "
                    "step %d beside it", rank, upload_wait, state.step)
    metrics = {"step": state.step, "epoch": state.epoch, "samples": state.samples, "tokens": state.tokens,
               "train_time_s": state.train_time_s, "first_steps_s": state.first_steps_s,
               "first_steps": state.first_steps, **state.last_val, **extra_metrics}
    if "score" not in metrics:  # eval disabled: rank checkpoints by recency
        metrics["score"] = float(state.step)
    train_state = {**dataclasses.asdict(state), "data_order": order, "optimizer_name": cfg.optimizer}
    # Not a TemporaryDirectory: the folder must outlive this call until the background upload is done;
    # Ray deletes it then (delete_local_checkpoint_after_upload).
    pending = PendingCheckpoint(state.step, metrics, "sharded" if cfg.strategy == "fsdp" else "full",
                                upload_wait_s=upload_wait)
    if cfg.strategy == "fsdp":
        pending.directory = local_checkpoint_dir()
        _pending_uploads.append(pending.directory)
        write_sharded_checkpoint(pending.directory, model, optimizer, tokenizer, train_state, rank)
        pending.blocked_s = pending.write_s = time.perf_counter() - t_ck
        return report_checkpoint(pending, rank, device, metrics_path, wait=True)
    model_sd, optim_sd = full_state_dicts(model, optimizer)  # on CPU: the live tensors themselves ...
    if rank == 0:
        if device.type == "cpu":  # ... which the next steps change in place: the writer gets its own copy
            model_sd, optim_sd = copy.deepcopy(model_sd), copy.deepcopy(optim_sd)
        pending.directory = local_checkpoint_dir()
        _pending_uploads.append(pending.directory)
        core = unwrap(model)

        def write(model_state: dict, optim_state: dict) -> None:
            t0 = time.perf_counter()
            try:
                write_checkpoint(pending.directory, core, model_state, tokenizer, {**train_state, "optimizer": optim_state})
            except BaseException as e:  # raised by report_checkpoint, in the training thread
                pending.error = e
            pending.write_s = time.perf_counter() - t0

        pending.writer = threading.Thread(target=write, args=(model_sd, optim_sd), name=f"checkpoint-{state.step}",
                                          daemon=True)
        pending.writer.start()
    del model_sd, optim_sd
    pending.blocked_s = time.perf_counter() - t_ck
    return pending


def report_checkpoint(pending: PendingCheckpoint | None, rank: int, device: torch.device, metrics_path: Path,
                      wait: bool) -> PendingCheckpoint | None:
    """Hand a written checkpoint to Ray Train (`ray.train.report`, which uploads it in the background).
    wait=False (at a log line): only if rank 0's writer is done, else it stays pending (returned); the
    decision is rank 0's, all-reduced, so every rank reports at the same step. wait=True (the next
    checkpoint, the end): waits for the writer. Collective: every rank calls it at the same points."""
    import ray.train

    if pending is None:
        return None
    if not wait:
        (done,) = all_sum([float(pending.written())] if rank == 0 else [0.0], device)
        if not done:
            return pending
    t_wait = time.perf_counter()
    if pending.writer is not None:
        pending.writer.join()
    if pending.error is not None:
        raise CheckpointError(f"writing checkpoint step {pending.step} to {pending.directory} failed: "
                              f"{pending.error}") from pending.error
    waited = time.perf_counter() - t_wait
    # Every rank reports (it is a barrier); Ray merges the ranks' folders into one step_* directory.
    ray.train.report(pending.metrics,
                     checkpoint=ray.train.Checkpoint.from_directory(pending.directory) if pending.directory else None,
                     checkpoint_dir_name=f"step_{pending.step:07d}",
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                     delete_local_checkpoint_after_upload=True)
    if rank == 0:
        blocked = pending.blocked_s + waited
        where = "on a background thread" if pending.writer is not None else "by every rank"
        log.info("[train] checkpoint step %d written locally in %.1fs %s (training blocked %.1fs%s); uploading "
                 "in the background", pending.step, pending.write_s, where, blocked,
                 f", of which {pending.upload_wait_s:.1f}s waiting for the previous upload"
                 if pending.upload_wait_s >= 0.5 else "")
        append_jsonl(metrics_path, {"event": "checkpoint", "step": pending.step, "blocked_s": round(blocked, 3),
                                    "write_s": round(pending.write_s, 3), "upload_wait_s": round(pending.upload_wait_s, 3),
                                    "layout": pending.layout})
    return None


def gpu_worker_env() -> None:
    """Variable sequence lengths fragment CUDA's caching allocator; expandable segments avoid that."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with contextlib.suppress(Exception):  # takes effect even if CUDA was initialized before this point
        torch.cuda.memory._set_allocator_settings(os.environ["PYTORCH_CUDA_ALLOC_CONF"])


# ---------------------------------------------------------------------------------------------------
# The loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from cluster.core import load_tokenizer
    from train.checkpoint import remove_orphaned_checkpoints
    from train.tracking import make_tracker

    cfg = TrainConfig(**config["cfg"])
    max_steps: int = config["max_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.use_gpu:
        gpu_worker_env()
    torch.set_num_threads(cfg.threads)  # 2 workers on 2 cores: 1 thread each, no oversubscription
    device = ray.train.torch.get_device()
    metrics_path = Path(cfg.output) / "metrics.jsonl"
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    orphans = remove_orphaned_checkpoints()
    if orphans:
        log.info("[train] rank %d: removed %d local checkpoint cop%s left by a failed worker", rank, len(orphans),
                 "y" if len(orphans) == 1 else "ies")
    tokenizer = load_tokenizer(cfg.resolved_tokenizer())
    model, saved = setup_model(cfg, tokenizer, rank, metrics_path)
    cfg = resolve_micro_batch(cfg, device, saved)
    order = data_order(cfg, world, in_memory=bool(config["train_files"]))
    if saved is not None:
        check_data_order(saved.get("data_order"), order, saved["checkpoint"])
    state = RunState.from_checkpoint(saved) if saved else RunState()
    torch.manual_seed(cfg.seed + rank)  # after init (identical on every rank): each rank its own dropout
    model = distribute(model, cfg, device)
    optimizer = make_optimizer(model, cfg, device, saved)
    if saved is not None and saved["sharded"]:
        load_sharded_checkpoint(model, optimizer)
    del saved
    batches = make_batches(cfg, config, tokenizer, rank, world, device, state)
    val_rows = config["validation"]
    if val_rows:  # the driver trimmed the subset to a multiple of the worker count: equal slices
        per = len(val_rows["answer"]) // world
        val_rows = {k: v[rank * per:(rank + 1) * per] for k, v in val_rows.items()}
    tracker = make_tracker(cfg, rank, fresh=state.step == 0)  # a fresh start: a new MLflow run too
    if rank == 0:
        if state.step == 0:  # a fresh start (or a restart before any checkpoint was committed): new history
            truncate_metrics(metrics_path, 0)
        append_jsonl(metrics_path, {"event": "start", "step": state.step, "rank": rank, "pid": os.getpid(),
                                    "world_size": world, "max_steps": max_steps})
        tracker.log_params({**dataclasses.asdict(cfg), "max_steps": max_steps, "world_size": world, **order})

    iv = Interval()
    pending = None  # a checkpoint still being written in the background (save_checkpoint)
    stopped_early = False
    went_nan = False
    last_saved = state.step if state.step else None  # the step of the last checkpoint (resumed from, or saved)
    # The last step: max_steps, or sooner where train.max_time_s runs out (re-estimated every log interval).
    end = min(state.end_step or max_steps, max_steps) if cfg.max_time_s is not None else max_steps
    start_step = state.step
    while state.step < end and not stopped_early:
        lr = lr_at(state.step, cfg, end)
        for g in optimizer.param_groups:
            g["lr"] = lr
        t_before = iv.train_time
        train_step(model, optimizer, batches, cfg, device, world, iv)
        if state.step == start_step:
            state.first_steps_s += iv.train_time - t_before
            state.first_steps += 1
        state.step += 1
        state.samples += cfg.global_batch_size  # exact: drop_last keeps every micro batch full
        # A log line (and its NaN check) before every validation and checkpoint (ckpt_every is a multiple of
        # eval_every): none sees a NaN state.
        if state.step % cfg.log_every == 0 or state.step % cfg.eval_every == 0 or state.step >= end:
            rec = log_interval(iv, state, lr, batches.epoch, end, cfg, device, rank, metrics_path, tracker)
            if diverged(rec):  # the same on every rank: all stop here, no checkpoint, no retry
                pending = report_checkpoint(pending, rank, device, metrics_path, wait=True)  # taken before the NaN
                if rank == 0:
                    record_divergence(rec, state.step - iv.micro // cfg.grad_accum + 1, last_saved, metrics_path)
                went_nan = True
                break
            pending = report_checkpoint(pending, rank, device, metrics_path, wait=False)  # if written by now
            if cfg.max_time_s is not None:
                end = state.end_step = time_budget_end(iv, state, cfg, max_steps, device, rank)
            iv = Interval()
        at_end = state.step >= end

        improved = False
        if val_rows and (state.step % cfg.eval_every == 0 or at_end):
            t_eval = time.perf_counter()
            state.last_val = validate(model, val_rows, tokenizer, cfg, device, config["val_max_new_tokens"])
            improved, stopped_early = early_stopping_update(state, cfg)  # the same on every rank (all-reduced)
            if rank == 0:
                log_validation(state, stopped_early, time.perf_counter() - t_eval, metrics_path, tracker)
            iv.t0 += time.perf_counter() - t_eval  # validation time is not training throughput
            if stopped_early and iv.micro:  # the steps since the last log line count in the totals
                log_interval(iv, state, lr, batches.epoch, end, cfg, device, rank, metrics_path, tracker)
                iv = Interval()

        keep_best = improved and cfg.early_stopping_patience is not None  # the best model must be kept
        if state.step % cfg.ckpt_every == 0 or at_end or stopped_early or keep_best:
            t_ck = time.perf_counter()
            state.epoch, state.batch_in_epoch = batches.epoch, batches.position
            report_checkpoint(pending, rank, device, metrics_path, wait=True)  # the previous one, if still writing
            pending = save_checkpoint(model, optimizer, tokenizer, cfg, state, order, rank, device, metrics_path,
                                      {"stopped_early": stopped_early, "stopped_by_time": at_end and end < max_steps})
            last_saved = state.step
            iv.t0 += time.perf_counter() - t_ck
    report_checkpoint(pending, rank, device, metrics_path, wait=True)  # the last one
    if rank == 0 and end < max_steps and state.step >= end and not went_nan:
        log.info("[train] time budget spent (train.max_time_s %gs): stopped at step %d of max_steps %d",
                 cfg.max_time_s, state.step, max_steps)
        append_jsonl(metrics_path, {"event": "time_budget", "step": state.step, "max_time_s": cfg.max_time_s,
                                    "train_time_s": round(state.train_time_s, 3)})
    tracker.close()
    if rank == 0 and not math.isfinite(float(state.last_val.get("val_loss", 0.0))):
        log.warning("[train] validation loss is not finite: check lr / precision")

