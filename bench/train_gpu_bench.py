"""One-GPU training throughput of flan-t5-large (random weights, untied head, 783.2M parameters) on
linear_1d's real token lengths: samples/s, tokens/s and MFU on useful and on padded tokens.

    python -m bench.train_gpu_bench [--micro-batch 64 128 256] [--steps 20] [--compile]
        [--precision bf16-mixed|bf16|fp32] [--pad-to-multiple-of 8] [--bucket] [--json-out FILE]
    python -m bench.train_gpu_bench --model t5-tiny --device cpu --precision fp32 --micro-batch 8 --steps 2  # smoke

Shapes: each row's question and answer lengths are drawn from linear_1d's measured lengths under the
flan-t5 tokenizer (bench/flops.py: questions 13-38 tokens, answers 2-4, eos included); a micro batch pads
its questions to the batch's longest rounded up to --pad-to-multiple-of and its labels to the longest
answer rounded up to --label-pad-to-multiple-of, as the training loop's collation does. --bucket sorts
a pool of --distinct-batches micro batches by question length before cutting them (length bucketing).
--lengths char uses the char tokenizer's lengths (the speedrun's; its step rate sets the speedrun's step
count in bench/gpu_check.sh), --lengths-from a pipeline output's. The same few batches are cycled, all
seen in the warm-up (the compilation, if any, happens there: `warmup_s`).

The step is the training loop's: forward with labels (no KV cache) under bf16 autocast, backward, clip the
gradient norm to 1.0, the optimizer (train.loop.make_optimizer: fused AdamW, or `--optimizer adafactor`),
zero_grad. Dropout 0.1 as flan-t5 finetunes. --compile compiles as
`train.compile: true` does (each T5 block, dynamic shapes: train/loop.py compile_blocks), so the number is
the one training gets.

MFU = model FLOP/s / the card's dense bf16 peak (bench/flops.py has both, with the formula). "useful"
counts each row at its own lengths (the work an unpadded step needs), "padded" at the batch's padded
lengths (the work the GPU does): their ratio is what padding costs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone

from bench.flops import batch_train_flops, peak_tflops, round_up, sample_lengths

FLAN_T5_LARGE_PARAMS = 783_150_080  # flan-t5-large with its own LM head (train/plan.py's count)


def build_model(name: str, device, dropout: float = 0.1):
    """The model from train.plan's architecture table with train.model's untied head, built directly on
    `device` (no weights to download). Asserts the parameter count against the planner's."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from train.model import untie_lm_head
    from train.plan import architecture, count_params

    a = architecture(name)
    fields = ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers",
              "feed_forward_proj", "relative_attention_num_buckets")
    cfg = T5Config(**{k: a[k] for k in fields}, tie_word_embeddings=False, dropout_rate=dropout,
                   relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.device(device):
        model = untie_lm_head(T5ForConditionalGeneration(cfg))
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(a)[0], f"{name}: built {n} parameters, the planner counts {count_params(a)[0]}"
    if name == "google/flan-t5-large":
        assert n == FLAN_T5_LARGE_PARAMS, f"flan-t5-large must have {FLAN_T5_LARGE_PARAMS} parameters, got {n}"
    return model, a


def lengths_from(data: str, rows: int = 50_000) -> list[tuple[int, int]]:
    """(input, label) token lengths of the first `rows` rows of a pipeline output's train split."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(f"{data}/train", format="parquet").head(rows, columns=["input_ids", "labels"])
    src = pc.list_value_length(table["input_ids"]).to_pylist()
    tgt = pc.list_value_length(table["labels"]).to_pylist()
    return list(zip(src, tgt, strict=True))


def make_batches(a: dict, micro_batch: int, n_batches: int, pad_src: int, pad_tgt: int, bucket: bool,
                 device, seed: int = 0, lengths: str | list[tuple[int, int]] = "t5") -> list[dict]:
    """`n_batches` micro batches with linear_1d's lengths ("t5" / "char": the measured histograms in
    bench/flops.py, or a list of (input, label) lengths to draw from), padded as the collation pads."""
    import torch

    n = micro_batch * n_batches
    if isinstance(lengths, str):
        rows = sample_lengths(n, "train", seed, tokenizer=lengths)
    else:
        rows = random.Random(seed).choices(lengths, k=n)
    if bucket:
        rows.sort()
    chunks = [rows[i * micro_batch:(i + 1) * micro_batch] for i in range(n_batches)]
    random.Random(seed).shuffle(chunks)
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in chunks:
        src, tgt = [s for s, _ in chunk], [t for _, t in chunk]
        S, T = round_up(max(src), pad_src), round_up(max(tgt), pad_tgt)
        ids = torch.randint(3, a["vocab_size"], (len(chunk), S), generator=g)
        labels = torch.randint(3, a["vocab_size"], (len(chunk), T), generator=g)
        pos_s, pos_t = torch.arange(S)[None, :], torch.arange(T)[None, :]
        mask = (pos_s < torch.tensor(src)[:, None]).long()
        labels = labels.masked_fill(pos_t >= torch.tensor(tgt)[:, None], -100)
        ids = ids * mask  # pad id 0
        useful, padded = batch_train_flops(a, src, tgt, S, T)
        out.append({
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "shape": (S, T), "useful_flops": useful, "padded_flops": padded,
            "useful_tokens": sum(src) + sum(tgt), "padded_tokens": len(chunk) * (S + T),
        })
    return out


def run_one(model, a: dict, args, micro_batch: int, device, optimizer: str = "adamw") -> dict:
    import torch

    from train.config import TrainConfig
    from train.loop import make_optimizer

    on_cuda = device.type == "cuda"
    batches = make_batches(a, micro_batch, args.distinct_batches, args.pad_to_multiple_of,
                           args.label_pad_to_multiple_of, args.bucket, device, args.seed,
                           lengths_from(args.lengths_from) if args.lengths_from else args.lengths)
    # The optimizer training builds (fused AdamW on CUDA, or Adafactor), with train's defaults
    opt = make_optimizer(model, TrainConfig(data="-", optimizer=optimizer, lr=1e-4, weight_decay=0.0), device, None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def step(b):
        with amp:
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(max(args.warmup, len(batches))):  # every distinct shape once: compile happens here
        step(batches[i % len(batches)])
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed = [batches[i % len(batches)] for i in range(args.steps)]
    for b in timed:
        step(b)
    if on_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    prof = profile_steps(step, [batches[i % len(batches)] for i in range(args.profile)], on_cuda) if args.profile else {}
    name = torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu"
    peak = peak_tflops(name) if on_cuda else None
    useful = sum(b["useful_flops"] for b in timed) / dt / 1e12
    padded = sum(b["padded_flops"] for b in timed) / dt / 1e12
    return {
        "bench": "train_gpu_bench", "device": name, "model": args.model, "precision": args.precision,
        "compile": args.compile, "bucket": args.bucket, "micro_batch": micro_batch, "optimizer": optimizer,
        "lengths": args.lengths_from or f"{args.lengths} tokens of linear_1d (bench/flops.py)",
        "shapes": sorted({b["shape"] for b in batches}), "steps": args.steps,
        "warmup_s": round(warm_s, 1), "step_ms": round(1000 * dt / args.steps, 2),
        "samples_per_s": round(args.steps * micro_batch / dt, 1),
        "useful_tokens_per_s": round(sum(b["useful_tokens"] for b in timed) / dt),
        "padded_tokens_per_s": round(sum(b["padded_tokens"] for b in timed) / dt),
        "useful_tflops": round(useful, 6), "padded_tflops": round(padded, 6), "peak_tflops": peak,
        "mfu_useful": round(useful / peak, 4) if peak else None,
        "mfu_padded": round(padded / peak, 4) if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
        **prof,
    }


def profile_steps(step, batches: list, on_cuda: bool, top: int = 8) -> dict:
    """Where a step's time goes (torch.profiler over a few more steps, after the timed ones): the share of
    the wall time the GPU spent in kernels (far below 1: the host cannot issue kernels fast enough, and a
    faster GPU would not help), kernel launches per step, and the top operators by their own GPU and CPU
    time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        if on_cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    n = len(batches)
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    out: dict = {"profiled_steps": n,
                 "top_cpu_ops_ms_per_step": [[e.key, round(e.self_cpu_time_total / n / 1e3, 2)] for e in cpu_ops]}
    if on_cuda:  # the GPU's own events: kernels, copies, memsets (names shortened for the report)
        gpu_us: dict[str, float] = {}
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in events:
            gpu_us[e.name[:60]] = gpu_us.get(e.name[:60], 0.0) + e.time_range.elapsed_us()
        out.update(gpu_busy=round(sum(gpu_us.values()) / wall_us, 3), kernels_per_step=round(len(events) / n),
                   top_gpu_kernels_ms_per_step=[[k, round(v / n / 1e3, 2)] for k, v in
                                                sorted(gpu_us.items(), key=lambda kv: -kv[1])[:top]])
    return out


def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_gpu_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="google/flan-t5-large", help="a name train/plan.py knows")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[64, 128, 256], help="one run per value")
    ap.add_argument("--optimizer", nargs="+", choices=["adamw", "adafactor"], default=["adamw"],
                    help="train.optimizer's choices; one run per value and micro batch (side by side)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per micro batch")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least --distinct-batches)")
    ap.add_argument("--distinct-batches", type=int, default=4, help="distinct micro batches cycled")
    ap.add_argument("--precision", choices=["bf16-mixed", "bf16", "fp32"], default="bf16-mixed",
                    help="fp32: CPU smoke tests (no bf16 units there)")
    ap.add_argument("--compile", action="store_true",
                    help="train.compile: torch.compile each T5 block as training does (train/loop.py compile_blocks)")
    ap.add_argument("--pad-to-multiple-of", type=int, default=8, help="question padding multiple")
    ap.add_argument("--label-pad-to-multiple-of", type=int, default=1, help="answer padding multiple")
    ap.add_argument("--bucket", action="store_true", help="sort rows by question length into batches")
    ap.add_argument("--lengths", choices=["t5", "char"], default="t5",
                    help="measured linear_1d lengths under flan-t5's tokenizer or the char tokenizer")
    ap.add_argument("--lengths-from", default=None, metavar="DATA",
                    help="draw lengths from a pipeline output's train split instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N more steps: GPU busy share, kernels per step, top operators")
    ap.add_argument("--json-out", default=None, help="append one JSON line per run to this file")
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_gpu_bench needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    model, a = build_model(args.model, device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    if args.compile:  # once: the graphs (dynamic shapes) serve every micro batch size below
        from train.loop import compile_blocks

        compile_blocks(model)
    model.train()
    common = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **versions()}
    rc = 0
    for opt_name, mb in [(o, mb) for o in args.optimizer for mb in args.micro_batch]:
        try:
            r = {**run_one(model, a, args, mb, device, opt_name), **common}
        except torch.OutOfMemoryError:
            r = {"bench": "train_gpu_bench", "model": args.model, "micro_batch": mb, "compile": args.compile,
                 "optimizer": opt_name, "error": "out of memory", **common}
            rc = 1
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
