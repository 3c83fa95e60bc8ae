"""Model FLOPs of a T5 training step, peak bf16 FLOP/s of the cards we may run on, and the length
distribution of algebra__linear_1d under flan-t5's tokenizer: the pure parts of the GPU benchmarks
(tests/test_bench_flops.py checks them on CPU).

FLOPs count every matmul at 2 FLOPs per multiply-add, forward x 3 for forward + backward (the backward
pass does two matmuls per forward one; no activation recomputation is counted, as in PaLM's MFU). A T5
sequence of s encoder (question) tokens and t decoder (answer) tokens, model width d, attention width
inner = heads x d_kv, feed-forward width ff (gated: 3 matrices), vocabulary V:
  encoder, per layer, over s:  self-attn Q, K, V, O  4 * 2*d*inner*s
                               scores + context      2 * 2*s*s*inner
                               feed-forward          3 * 2*d*ff*s      (2 * for a non-gated ReLU FFN)
  decoder, per layer, over t:  self-attn Q, K, V, O  4 * 2*d*inner*t
                               scores + context      2 * 2*t*t*inner   (causal, but SDPA computes it all)
                               cross-attn Q, O       2 * 2*d*inner*t
                               cross-attn K, V       2 * 2*d*inner*s   <- over the QUESTION length
                               cross scores+context  2 * 2*t*s*inner
                               feed-forward          3 * 2*d*ff*t
  LM head, over t:             2*d*V*t
Embedding lookups, layer norms, softmax and the relative position bias are not matmuls and are left out
(< 1% here). With s = t = n and no attention terms this is 6 * (matmul parameters) * n, the usual 6*N*D.
"""

from __future__ import annotations

import random
from typing import Any

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from each card's datasheet. Matched against
# torch.cuda.get_device_name() in order, first hit wins: the specific names come before the general ones
# ("H100 PCIe" before "H100", "L40S" before "L4", "A100 80GB PCIe" needs no special case: same peak).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835.0),        # 2 x 94 GB boards; per GPU
    ("H100 PCIe", 756.0),
    ("H100", 989.0),            # SXM5: "NVIDIA H100 80GB HBM3"
    ("GH200", 989.0),           # before "H200", which it contains
    ("H200 NVL", 835.0),
    ("H200", 989.0),            # "NVIDIA H200" (SXM)
    ("B200", 2250.0),
    ("A100", 312.0),            # "A100-SXM4-80GB", "A100-SXM4-40GB", "A100 80GB PCIe", "A100-PCIE-40GB"
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),             # AWS g5: A10G is not an A10 (125)
    ("A10", 125.0),
    ("V100", 0.0),              # no bf16 tensor cores: MFU is not defined
    ("T4", 0.0),                # likewise (fp16 only)
]


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name, None if unknown or the card has no bf16 tensor cores."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops or None
    return None


def t5_forward_flops(a: dict[str, Any], s: int, t: int) -> float:
    """Forward matmul FLOPs of one sequence: s encoder (question) tokens, t decoder (answer) tokens.

    `a` holds T5 config fields (d_model, d_ff, d_kv, num_heads, num_layers, num_decoder_layers,
    vocab_size, feed_forward_proj), as train.plan.architecture returns them.
    """
    d, ff, V = a["d_model"], a["d_ff"], a["vocab_size"]
    inner = a["num_heads"] * a["d_kv"]
    n_ffn = 3 if str(a.get("feed_forward_proj", "relu")).startswith("gated") else 2
    mm = 2  # FLOPs per multiply-add
    enc = 4 * mm * d * inner * s + 2 * mm * s * s * inner + n_ffn * mm * d * ff * s
    dec = (4 * mm * d * inner * t + 2 * mm * t * t * inner      # self-attention
           + 2 * mm * d * inner * t + 2 * mm * d * inner * s    # cross-attention Q, O over t; K, V over s
           + 2 * mm * t * s * inner                             # cross-attention scores + context
           + n_ffn * mm * d * ff * t)
    head = mm * d * V * t
    return float(a["num_layers"] * enc + a["num_decoder_layers"] * dec + head)


def t5_train_flops(a: dict[str, Any], s: int, t: int) -> float:
    """Forward + backward FLOPs of one sequence (3 x forward)."""
    return 3.0 * t5_forward_flops(a, s, t)


def batch_train_flops(a: dict[str, Any], src_lens: list[int], tgt_lens: list[int], pad_src: int, pad_tgt: int
                      ) -> tuple[float, float]:
    """(useful, padded) training FLOPs of one micro batch. Useful: each row at its own lengths, what an
    unpadded (perfectly packed) step would compute. Padded: every row at the batch's padded lengths,
    what the GPU actually does."""
    useful = sum(t5_train_flops(a, s, t) for s, t in zip(src_lens, tgt_lens, strict=True))
    return useful, len(src_lens) * t5_train_flops(a, pad_src, pad_tgt)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Token lengths (eos included) of algebra__linear_1d under flan-t5's tokenizer (/work/shared/t5-tokenizer,
# T5's 32k SentencePiece): 1,000 rows per regime from the project's generator (pipeline.generate,
# seed 123), 2026-11-26. {length: rows}. Embedded so the benchmarks need neither the tokenizer nor the
# generator. Train = the three train regimes in equal parts; the test split is interpolate.
LINEAR_1D_T5_LENGTHS: dict[str, dict[str, dict[int, int]]] = {
    "train-easy": {
        "question": {13: 3, 14: 27, 15: 66, 16: 136, 17: 169, 18: 184, 19: 140, 20: 127, 21: 83, 22: 33, 23: 25,
                     24: 7},
        "answer": {2: 479, 3: 521},
    },
    "train-medium": {
        "question": {16: 17, 17: 32, 18: 80, 19: 113, 20: 155, 21: 125, 22: 135, 23: 99, 24: 89, 25: 76, 26: 38,
                     27: 22, 28: 9, 29: 9, 30: 1},
        "answer": {2: 467, 3: 484, 4: 49},
    },
    "train-hard": {
        "question": {16: 3, 17: 2, 18: 23, 19: 41, 20: 59, 21: 75, 22: 82, 23: 81, 24: 85, 25: 90, 26: 112,
                     27: 79, 28: 57, 29: 55, 30: 41, 31: 39, 32: 33, 33: 27, 34: 10, 35: 2, 36: 1, 37: 2, 38: 1},
        "answer": {2: 392, 3: 289, 4: 319},
    },
    "interpolate": {
        "question": {16: 6, 17: 10, 18: 30, 19: 52, 20: 71, 21: 69, 22: 89, 23: 79, 24: 103, 25: 95, 26: 110,
                     27: 84, 28: 60, 29: 46, 30: 38, 31: 17, 32: 13, 33: 17, 34: 10, 35: 1},
        "answer": {2: 478, 3: 291, 4: 231},
    },
}
TRAIN_REGIMES = ("train-easy", "train-medium", "train-hard")

# The same 3,000 train rows under the project's char tokenizer (pipeline/tokenizer.py: one token per
# character + eos), the speedrun's tokenizer: questions 22-61 tokens, answers 2-5.
LINEAR_1D_CHAR_TRAIN_LENGTHS: dict[str, dict[int, int]] = {
    "question": {
        22: 3, 23: 4, 24: 8, 25: 20, 26: 39, 27: 69, 28: 95, 29: 150, 30: 188, 31: 186, 32: 174, 33: 171,
        34: 172, 35: 170, 36: 150, 37: 180, 38: 142, 39: 126, 40: 127, 41: 116, 42: 99, 43: 99, 44: 79, 45: 73,
        46: 52, 47: 50, 48: 38, 49: 39, 50: 38, 51: 31, 52: 21, 53: 25, 54: 20, 55: 11, 56: 12, 57: 11, 58: 5,
        59: 6, 61: 1
    },
    "answer": {2: 837, 3: 1401, 4: 728, 5: 34},
}


def mean_length(split: str, field: str) -> float:
    regimes = TRAIN_REGIMES if split == "train" else (split,)
    total = sum(n * c for r in regimes for n, c in LINEAR_1D_T5_LENGTHS[r][field].items())
    rows = sum(c for r in regimes for c in LINEAR_1D_T5_LENGTHS[r][field].values())
    return total / rows


def sample_lengths(rows: int, split: str = "train", seed: int = 0, tokenizer: str = "t5") -> list[tuple[int, int]]:
    """(question, answer) token lengths for `rows` rows drawn from the measured histograms: a regime
    uniformly (train) or interpolate (test), then each length from that regime's histogram. tokenizer
    "char": the char tokenizer's train histogram (train split only)."""
    rng = random.Random(seed)
    regimes = TRAIN_REGIMES if split == "train" else (split,)
    if tokenizer == "char" and split != "train":
        raise ValueError("char-tokenizer lengths were measured on the train split only")
    out = []
    for _ in range(rows):
        h = LINEAR_1D_CHAR_TRAIN_LENGTHS if tokenizer == "char" else LINEAR_1D_T5_LENGTHS[rng.choice(regimes)]
        q = rng.choices(list(h["question"]), weights=list(h["question"].values()))[0]
        a = rng.choices(list(h["answer"]), weights=list(h["answer"].values()))[0]
        out.append((q, a))
    return out
