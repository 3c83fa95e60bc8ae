"""Memory planner: estimated per-worker GPU memory for a training config, without loading any weights.

python -m train plan --config configs/flan-t5-large.yaml [--micro-batch-size 16 --strategy fsdp ...]

How the estimate is computed (bytes per worker):
- parameters P: counted exactly from the architecture (T5 gated-GELU: shared embedding, the LM head where
  it is untied as in flan-t5, q/k/v/o, wi_0/wi_1/wo, layer norms, relative position bias), from a built-in
  table of the flan-t5 sizes, a named tiny config, or a local config.json. No weights are read.
- weights = P x (4 bytes in fp32 / bf16-mixed, 2 in bf16); gradients the same; AdamW keeps two moments
  in the parameter dtype (8 or 4 bytes). DDP adds a gradient-bucket copy (= gradients). bf16-mixed adds
  autocast's bf16 copy of the weights used in the forward (2 bytes x P).
- FSDP (fully_shard per block): weights, gradients, optimizer states and autocast copies divided by the
  worker count, plus the two largest unsharded blocks in flight (prefetch) in weights+grads.
- activations for micro_batch x (plan_source_len, plan_target_len) tokens (`activation_bytes`): the tensors
  autograd saves for backward, counted per token from what a T5 layer keeps (T5LayerNorm's fp32 input and
  output, autocast's bf16 copy of each fp32 linear input, q/k/v/o, the gated-GELU's intermediates - the
  tanh GELU runs as ~6 elementwise ops -, dropout masks at 1 byte), the attention scores per head, the
  decoder's cross-attention K/V over the source, the logits (bf16, their fp32 upcast and gradient); times
  ACTIVATION_CALIBRATION, fitted to peaks measured on a GPU (below). No activation checkpointing.
- a fixed 1.5 GiB for the CUDA context, cuBLAS workspaces and allocator fragmentation.
Gradients are counted whole although a step without accumulation frees them until its backward: the
estimate errs high by that much, on the safe side.

Calibration (2026-11-27, one H200, bench/train_gpu_bench.py: flan-t5-large untied, bf16-mixed, fused
AdamW, dropout 0.1, questions padded to 40 tokens, answers 4): torch.cuda.max_memory_allocated 25.82 /
41.43 / 72.65 GiB at micro batch 128 / 256 / 512: exactly linear, 0.1220 GiB per row. The count above
gives 0.0937 GiB per row there, so ACTIVATION_CALIBRATION = 1.30 (the rest: SDPA and autocast buffers the
count leaves out, transients at the forward/backward turn, the caching allocator's rounding). With it the
estimate is 6-17% above those three peaks (tests/test_train_bucket.py holds them).

train.compile (per-block torch.compile, `train.loop.compile_blocks`) saves fewer activations: inductor fuses
the elementwise chains (the tanh GELU's ~6 ops, the layer norms, dropout) and its partitioner recomputes
cheap elementwise results in the backward instead of keeping them. Measured on the same H200 and shapes
at micro batch 256: 23.22 GiB compiled against 41.43 eager, i.e. 13.0 GiB of activations (the peak less
the 10.2 GiB that does not grow with rows) against 31.2: COMPILED_ACTIVATION_RATIO = 0.42. One point so
far; the device check's compiled sweep (micro batch 512, 1024) is there to test that it stays linear.

The micro batch (`choose_micro_batch`): the largest divisor of the per-worker batch that is a multiple of
8 (or 1, 2, 4) whose estimate fits in (1 - MARGIN) of the card's memory. `python -m train plan` prints it
per card; with train.micro_batch_size auto each worker makes the same choice at run time on its GPU's
free memory (torch.cuda.mem_get_info), and all workers take the smallest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.core import CHAR_VOCAB_SIZE, ModelError
from train.config import TrainConfig
from train.model import TINY_CONFIGS, tiny_config

GIB = 2**30
CUDA_OVERHEAD = 1.5 * GIB
ACTIVATION_CALIBRATION = 1.30  # measured peaks / counted saved tensors (module docstring)
COMPILED_ACTIVATION_RATIO = 0.42  # train.compile's activations / eager's, measured (module docstring)
MARGIN = 0.10  # of the card's memory left free by the chosen micro batch
CPU_MICRO_BATCH = 32  # auto on CPU: memory is not the bound, a small batch keeps steps short
# The GPUs of the node types in cluster/ (A100 40GB: p4d.24xlarge, a2-highgpu-8g) and of their documented
# alternatives: what `fits` answers for. tests/test_cluster_files.py checks each shipped GPU config fits the
# GPU of every cluster file's node type.
GPUS = {"A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80, "H200 141GB": 141}
# 8-GPU NVLink node types -> (GPU, GPUs per node).
NODE_TYPES = {
    "p4d.24xlarge": ("A100 40GB", 8), "p4de.24xlarge": ("A100 80GB", 8), "p5.48xlarge": ("H100 80GB", 8),
    "a2-highgpu-8g": ("A100 40GB", 8), "a2-ultragpu-8g": ("A100 80GB", 8), "a3-highgpu-8g": ("H100 80GB", 8),
}

_FLAN = dict(vocab_size=32128, d_kv=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False)
KNOWN_ARCHS: dict[str, dict[str, Any]] = {
    "google/flan-t5-small": dict(_FLAN, d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "google/flan-t5-base": dict(_FLAN, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "google/flan-t5-large": dict(_FLAN, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "google/flan-t5-xl": dict(_FLAN, d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "google/flan-t5-xxl": dict(_FLAN, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


def architecture(model: str) -> dict[str, Any]:
    """Architecture numbers for a model spec, without weights (table, tiny config, or local config.json)."""
    if model in TINY_CONFIGS:  # the model's own config (one source), with the built-in char tokenizer's vocab
        return tiny_config(model, CHAR_VOCAB_SIZE).to_dict()
    if model in KNOWN_ARCHS:
        return dict(KNOWN_ARCHS[model])
    cfg = Path(os.path.expanduser(model)) / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        d.setdefault("num_decoder_layers", d["num_layers"])
        return d
    raise ModelError(f"plan: no architecture for {model!r}: use a known name ({', '.join(KNOWN_ARCHS)}, "
                     f"{', '.join(TINY_CONFIGS)}) or a local directory with config.json")


def untied_head(a: dict[str, Any]) -> bool:
    """Whether the model has its own LM head (flan-t5 / T5 v1.1 and our tiny models) or reuses the shared
    embedding (original T5). A config.json saved by transformers 5 always says tie_word_embeddings=true
    (T5Config forces it) and keeps the truth in scale_decoder_outputs=false; older ones say
    tie_word_embeddings=false."""
    return a.get("tie_word_embeddings") is False or a.get("scale_decoder_outputs") is False


def count_params(a: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, parameters of the largest transformer block)."""
    d, ff, inner, h = a["d_model"], a["d_ff"], a["num_heads"] * a["d_kv"], a["num_heads"]
    gated = str(a.get("feed_forward_proj", "relu")).startswith("gated")
    ffn = (3 if gated else 2) * d * ff
    attn = 4 * d * inner
    enc_block = attn + ffn + 2 * d
    dec_block = 2 * attn + ffn + 3 * d
    bias = a.get("relative_attention_num_buckets", 32) * h  # first block of each stack
    head = a["vocab_size"] * d if untied_head(a) else 0
    total = (a["vocab_size"] * d + head + a["num_layers"] * enc_block + a["num_decoder_layers"] * dec_block
             + 2 * bias + 2 * d)
    return total, dec_block + bias


def activation_bytes(a: dict[str, Any], precision: str, b: int, s: int, t: int) -> float:
    """Bytes autograd holds for backward after the forward of b rows x (s source, t target) tokens,
    calibrated (ACTIVATION_CALIBRATION). A formula over the architecture and the lengths."""
    d, ff, h, inner, V = a["d_model"], a["d_ff"], a["num_heads"], a["num_heads"] * a["d_kv"], a["vocab_size"]
    gated = str(a.get("feed_forward_proj", "relu")).startswith("gated")
    x = 4 if precision == "fp32" else 2  # matmul inputs and outputs (bf16 under autocast)
    r = 2 if precision == "bf16" else 4  # the residual stream and the layer norms (fp32 under autocast)
    cast = x if precision == "bf16-mixed" else 0  # autocast's bf16 copy of an fp32 input, one per linear
    ln = 2 * r * d  # T5LayerNorm keeps its input and its normalized output
    attn = ln + 3 * cast * d + 4 * x * inner + d  # q, k, v, the o projection's input; dropout mask (1 byte)
    score = 4 + 1 + 2 * x  # per attention score: fp32 softmax, dropout mask, the scores and dropped weights
    ffn = ln + (2 if gated else 1) * cast * d + ff * ((6 * x if gated else 2 * x) + 1 + x) + d
    cross = ln + cast * d + 2 * x * inner + d  # cross-attention: q and o per target token ...
    cross_src = 2 * cast * d + 2 * x * inner  # ... K and V per source token, in every decoder layer
    enc_tok = attn + ffn + h * s * score
    dec_tok = attn + h * t * score + cross + h * s * score + ffn
    per_row = (a["num_layers"] * s * enc_tok + a["num_decoder_layers"] * (t * dec_tok + s * cross_src)
               + (s + t) * d * r * 2  # embeddings and their dropout
               + t * V * (x + 4 + 4))  # logits, their fp32 upcast for the loss, its gradient
    return ACTIVATION_CALIBRATION * b * per_row


def micro_batch_candidates(per_worker: int) -> list[int]:
    """Micro batches that keep global batch = micro x accumulation x workers: the divisors of the
    per-worker batch that are multiples of 8 (tensor-core tiles), and 1, 2, 4 for tiny batches."""
    return [m for m in range(1, per_worker + 1) if per_worker % m == 0 and (m % 8 == 0 or m in (1, 2, 4))]


@dataclass
class Plan:
    model: str
    params: int
    workers: int
    precision: str
    strategy: str
    micro_batch: int
    source_len: int
    target_len: int
    parts: dict[str, float]  # bytes per worker
    auto: bool = False  # micro batch chosen per card (train.micro_batch_size auto)
    choices: dict[str, int | None] | None = None  # card -> the planner's micro batch (None: none fits)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self) -> dict[str, bool]:
        """Per card: the configured micro batch fits; with auto, some micro batch does."""
        if self.auto:
            return {name: m is not None for name, m in (self.choices or {}).items()}
        return {name: self.total <= gb * 1e9 for name, gb in GPUS.items()}


def choose_micro_batch(cfg: TrainConfig, memory_bytes: float | None) -> int | None:
    """The largest candidate micro batch whose estimate fits in (1 - MARGIN) x memory_bytes (None: none
    fits). memory_bytes None (CPU): the largest candidate up to CPU_MICRO_BATCH."""
    cands = micro_batch_candidates(cfg.per_worker_batch)
    if memory_bytes is None:
        return max(m for m in cands if m <= CPU_MICRO_BATCH)
    fitting = [m for m in cands if _estimate(cfg, m).total <= (1 - MARGIN) * memory_bytes]
    return max(fitting) if fitting else None


def estimate(cfg: TrainConfig, micro_batch: int | None = None) -> Plan:
    """The estimate at `micro_batch` (default: the configured one; with auto, the choice for the largest
    card that has one, else the smallest candidate), with the planner's choice per card."""
    choices = {name: choose_micro_batch(cfg, gb * 1e9) for name, gb in GPUS.items()}
    if micro_batch is None:
        if cfg.auto_micro_batch:
            fitting = [m for m in choices.values() if m is not None]
            micro_batch = max(fitting) if fitting else micro_batch_candidates(cfg.per_worker_batch)[0]
        else:
            micro_batch = cfg.micro_batch
    plan = _estimate(cfg, micro_batch)
    plan.auto, plan.choices = cfg.auto_micro_batch, choices
    return plan


def _estimate(cfg: TrainConfig, micro_batch: int) -> Plan:
    a = architecture(cfg.model)
    P, block = count_params(a)
    wbytes = 2 if cfg.precision == "bf16" else 4
    shard = cfg.num_workers if cfg.strategy == "fsdp" else 1
    parts: dict[str, float] = {
        "weights": P * wbytes / shard,
        "gradients": P * wbytes / shard,
        "optimizer (AdamW 2 moments)": 2 * P * wbytes / shard,
    }
    if cfg.strategy == "ddp" and cfg.num_workers > 1:
        parts["DDP gradient buckets"] = P * wbytes
    if cfg.precision == "bf16-mixed":
        parts["autocast bf16 weight copies"] = 2 * P / shard
    if cfg.strategy == "fsdp":
        parts["FSDP unsharded blocks in flight"] = 2 * block * wbytes * 2
    b, s, t = micro_batch, cfg.plan_source_len, cfg.plan_target_len
    acts = activation_bytes(a, cfg.precision, b, s, t)
    if cfg.compile:
        parts["activations (saved, compiled)"] = COMPILED_ACTIVATION_RATIO * acts
    else:
        parts["activations (saved for backward)"] = acts
    parts["CUDA context + workspace"] = CUDA_OVERHEAD
    return Plan(cfg.model, P, cfg.num_workers, cfg.precision, cfg.strategy, b, s, t, parts)


def format_plan(p: Plan) -> str:
    how = "the planner's choice for the largest card" if p.auto else "configured"
    lines = [
        f"model {p.model}: {p.params / 1e6:.1f}M parameters; {p.precision}, {p.strategy} on {p.workers} worker(s); "
        f"micro batch {p.micro_batch} ({how}) x ({p.source_len} source, {p.target_len} target) tokens",
        "per-worker memory estimate:",
    ]
    lines += [f"  {k:<34} {v / GIB:8.2f} GiB" for k, v in p.parts.items()]
    lines.append(f"  {'total':<34} {p.total / GIB:8.2f} GiB")
    lines.append(f"per card (micro batch: the largest that fits with a {MARGIN:.0%} margin"
                 f"{', used at run time' if p.auto else ''}):")
    for name, ok in p.fits().items():
        nodes = ", ".join(n for n, (gpu, _) in NODE_TYPES.items() if gpu == name) or "-"
        choice = (p.choices or {}).get(name)
        lines.append(f"  fits {name:<12} {'yes' if ok else 'NO ':<3}  micro batch {choice or 'none':>5}  ({nodes})")
    return "\n".join(lines)
