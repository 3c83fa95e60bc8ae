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
- activations for micro_batch x (plan_source_len, plan_target_len) tokens, saved for backward, at 2
  bytes/element (bf16 / bf16-mixed) or 4 (fp32): per encoder layer b*s*(4d + 4*inner + 5*d_ff) plus the
  attention scores b*h*s^2 (fp32 softmax + its low-precision copy); per decoder layer the same for
  self-attention over t plus cross-attention (b*h*t*s scores, encoder K/V); the logits b*t*V in bf16, their
  fp32 upcast for the loss and its gradient. No activation checkpointing.
- a fixed 1.5 GiB for the CUDA context, cuBLAS workspaces and allocator fragmentation.
It fits a GPU when the total is at most the card's memory. This is an estimate, meant to be within
~20% and conservative; measure with torch.cuda.max_memory_allocated() on a real card before relying on a
margin (no GPU was available to calibrate it when this was written).
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
# The GPUs of the node types in cluster/ (A100 40GB: p4d.24xlarge, a2-highgpu-8g) and of their documented
# alternatives: what `fits` answers for. tests/test_cluster_files.py checks each shipped GPU config fits the
# GPU of every cluster file's node type.
GPUS = {"A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80}
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

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def fits(self) -> dict[str, bool]:
        return {name: self.total <= gb * 1e9 for name, gb in GPUS.items()}


def estimate(cfg: TrainConfig) -> Plan:
    a = architecture(cfg.model)
    P, block = count_params(a)
    wbytes = 2 if cfg.precision == "bf16" else 4
    abytes = 4 if cfg.precision == "fp32" else 2
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
    b, s, t = cfg.micro_batch, cfg.plan_source_len, cfg.plan_target_len
    d, ff, h, inner, V = a["d_model"], a["d_ff"], a["num_heads"], a["num_heads"] * a["d_kv"], a["vocab_size"]
    enc = b * s * (4 * d + 4 * inner + 5 * ff) * abytes + b * h * s * s * (4 + abytes)
    dec = (b * t * (6 * d + 8 * inner + 5 * ff) * abytes + b * h * (t * t + t * s) * (4 + abytes)
           + b * s * 2 * inner * abytes)
    parts["activations"] = a["num_layers"] * enc + a["num_decoder_layers"] * dec + b * (s + t) * d * 4
    parts["logits + loss"] = b * t * V * (abytes + 4 + 4)
    parts["CUDA context + workspace"] = CUDA_OVERHEAD
    return Plan(cfg.model, P, cfg.num_workers, cfg.precision, cfg.strategy, b, s, t, parts)


def format_plan(p: Plan) -> str:
    lines = [
        f"model {p.model}: {p.params / 1e6:.1f}M parameters; {p.precision}, {p.strategy} on {p.workers} worker(s); "
        f"micro batch {p.micro_batch} x ({p.source_len} source, {p.target_len} target) tokens",
        "per-worker memory estimate:",
    ]
    lines += [f"  {k:<34} {v / GIB:8.2f} GiB" for k, v in p.parts.items()]
    lines.append(f"  {'total':<34} {p.total / GIB:8.2f} GiB")
    lines += [f"  fits {name:<12} {'yes' if ok else 'NO ':<3}  "
              f"({', '.join(n for n, (gpu, _) in NODE_TYPES.items() if gpu == name)})" for name, ok in p.fits().items()]
    return "\n".join(lines)
