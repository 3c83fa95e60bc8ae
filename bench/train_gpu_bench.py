"""One-GPU training throughput of the flan-t5-large architecture (random weights), bf16: samples/s,
tokens/s and MFU. Needs a CUDA GPU; no hub access (the architecture comes from train/plan.py's table).

    python -m bench.train_gpu_bench [--micro-batch 64 --source-len 64 --target-len 16 --steps 30]
        [--precision bf16-mixed|bf16] [--compile]

The step is the training loop's: T5ForConditionalGeneration forward with labels, backward, grad clip,
fused AdamW. Sequences have fixed lengths (linear_1d under the flan-t5 tokenizer is ~20-60 question
tokens, <= 16 answer tokens), so this is the upper bound the real loop's dynamic padding approaches.

MFU = achieved model FLOP/s / the card's dense bf16 peak. Model FLOPs per sequence (forward + backward
= 3x forward, no recomputation counted):
  6 * (N_enc * s + N_dec * t) + 6 * V * d * t (LM head)
  + 12 * L_enc * s^2 * inner + 12 * L_dec * (t^2 + t * s) * inner (attention score and context matmuls)
where N_enc / N_dec are the encoder / decoder block parameters (embeddings excluded, they are lookups).
Reference: the seed project ran ~132 samples/s per A100 (a few percent MFU); the target is >= 40%.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def peak_tflops(name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def model_flops_per_seq(a: dict, s: int, t: int) -> float:
    d, ff, inner, V = a["d_model"], a["d_ff"], a["num_heads"] * a["d_kv"], a["vocab_size"]
    enc_block = 4 * d * inner + 3 * d * ff
    dec_block = 8 * d * inner + 3 * d * ff
    dense = 6 * (a["num_layers"] * enc_block * s + a["num_decoder_layers"] * dec_block * t) + 6 * V * d * t
    attn = 12 * a["num_layers"] * s * s * inner + 12 * a["num_decoder_layers"] * (t * t + t * s) * inner
    return float(dense + attn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="google/flan-t5-large")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--source-len", type=int, default=64)
    ap.add_argument("--target-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16-mixed", "bf16"], default="bf16-mixed")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_gpu_bench needs a CUDA GPU")
    from transformers import T5Config, T5ForConditionalGeneration

    from train.plan import architecture

    a = architecture(args.model)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = T5ForConditionalGeneration(T5Config(**a)).to(dev)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b, s, t = args.micro_batch, args.source_len, args.target_len
    x = torch.randint(3, a["vocab_size"], (b, s), device=dev)
    y = torch.randint(3, a["vocab_size"], (b, t), device=dev)
    mask = torch.ones_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
            loss = fwd(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    sps = args.steps * b / dt
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    achieved = sps * model_flops_per_seq(a, s, t) / 1e12
    print(json.dumps({
        "device": name, "model": args.model, "precision": args.precision, "compile": args.compile,
        "micro_batch": b, "source_len": s, "target_len": t,
        "samples_per_s": round(sps, 1), "tokens_per_s": round(sps * (s + t)),
        "model_tflops": round(achieved, 1), "mfu": round(achieved / peak, 4) if peak else None,
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }))


if __name__ == "__main__":
    main()
