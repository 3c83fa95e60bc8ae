"""The benchmarks' pure parts (bench/flops.py) and a CPU smoke run of the GPU training bench."""

from __future__ import annotations

import json

import pytest

from bench.flops import (
    LINEAR_1D_T5_LENGTHS,
    batch_train_flops,
    mean_length,
    peak_tflops,
    round_up,
    sample_lengths,
    t5_forward_flops,
    t5_train_flops,
)
from train.plan import architecture, count_params

SMALL = dict(d_model=4, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=10,
             feed_forward_proj="gated-gelu")


def test_hand_computed_small_case():
    # d=4, inner=2*2=4, ff=8 (gated: 3 matrices), V=10, s=3 question tokens, t=2 answer tokens, 2 FLOPs/MAC.
    enc = 4 * 2 * 4 * 4 * 3 + 2 * 2 * 3 * 3 * 4 + 3 * 2 * 4 * 8 * 3  # QKVO, scores+context, FFN = 1104
    dec = (4 * 2 * 4 * 4 * 2 + 2 * 2 * 2 * 2 * 4   # self-attention QKVO over t, scores+context
           + 2 * 2 * 4 * 4 * 2                     # cross Q, O over t
           + 2 * 2 * 4 * 4 * 3                     # cross K, V over s (the question)
           + 2 * 2 * 2 * 3 * 4                     # cross scores + context
           + 3 * 2 * 4 * 8 * 2)                    # FFN = 1120
    head = 2 * 4 * 10 * 2
    assert enc == 1104 and dec == 1120
    assert t5_forward_flops(SMALL, 3, 2) == enc + dec + head == 2384
    assert t5_train_flops(SMALL, 3, 2) == 3 * 2384
    relu = dict(SMALL, feed_forward_proj="relu")  # 2 FFN matrices instead of 3
    assert t5_forward_flops(SMALL, 3, 2) - t5_forward_flops(relu, 3, 2) == 2 * 4 * 8 * (3 + 2)


def _matmul_params(a):
    """Every parameter that multiplies activations: the planner's exact count minus the embedding lookup,
    layer norms and relative position biases."""
    total, _ = count_params(a)
    d, h = a["d_model"], a["num_heads"]
    norms = a["num_layers"] * 2 * d + a["num_decoder_layers"] * 3 * d + 2 * d
    return total - a["vocab_size"] * d - norms - 2 * a["relative_attention_num_buckets"] * h


@pytest.mark.parametrize("model", ["google/flan-t5-small", "google/flan-t5-large", "t5-tiny"])
def test_linear_part_is_6_n_d(model):
    """At s = t = n the FLOPs are 6*N*n + (attention scores, quadratic in n): the linear coefficient,
    taken by finite differences, is exactly 6 x the matmul parameters the planner counts."""
    a = architecture(model)
    f1, f2 = t5_train_flops(a, 1, 1), t5_train_flops(a, 2, 2)
    quad = (f2 - 2 * f1) / 2
    assert f1 - quad == 6 * _matmul_params(a)
    if model == "google/flan-t5-large":
        assert count_params(a)[0] == 783_150_080


def test_cross_attention_kv_runs_over_the_question():
    """f(s, t) = A*s + B*t + quadratic terms. A holds the encoder and the cross-attention K/V projections;
    B the rest of the decoder and the LM head."""
    a = architecture("google/flan-t5-large")
    d, ff, inner, V = a["d_model"], a["d_ff"], a["num_heads"] * a["d_kv"], a["vocab_size"]
    Le, Ld = a["num_layers"], a["num_decoder_layers"]
    f = t5_forward_flops
    lin_s = f(a, 1, 0) - (f(a, 2, 0) - 2 * f(a, 1, 0)) / 2  # f(s, 0) = A s + C s^2
    lin_t = f(a, 0, 1) - (f(a, 0, 2) - 2 * f(a, 0, 1)) / 2
    assert lin_s == 2 * (Le * (4 * d * inner + 3 * d * ff) + Ld * 2 * d * inner)
    assert lin_t == 2 * (Ld * (6 * d * inner + 3 * d * ff) + V * d)
    # At linear_1d's shapes, counting K/V over the answer instead (the old bench) is 5-15% low.
    s, t = 24, 4
    old = f(a, s, t) - 2 * Ld * 2 * d * inner * (s - t)
    assert 0.85 < old / f(a, s, t) < 0.95


def test_useful_and_padded_flops():
    a = architecture("google/flan-t5-large")
    useful, padded = batch_train_flops(a, [20, 31], [2, 4], 32, 4)
    assert useful == t5_train_flops(a, 20, 2) + t5_train_flops(a, 31, 4)
    assert padded == 2 * t5_train_flops(a, 32, 4) > useful
    assert batch_train_flops(a, [16, 16], [3, 3], 16, 3) == (2 * t5_train_flops(a, 16, 3),) * 2
    assert round_up(33, 8) == 40 and round_up(32, 8) == 32 and round_up(3, 1) == 3


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("Tesla T4", None), ("Tesla V100-SXM2-16GB", None),
    ("Some Future GPU", None),
])
def test_card_names(name, peak):
    assert peak_tflops(name) == peak


def test_measured_lengths():
    """Measured with the flan-t5 tokenizer (1,500 rows per regime): questions 18.1 / 21.5 / 25.0 tokens on average,
    answers at most 4. This embedded one (1,000 rows per regime) must agree."""
    for regime, want in [("train-easy", 18.1), ("train-medium", 21.5), ("train-hard", 25.0)]:
        assert abs(mean_length(regime, "question") - want) < 0.4, regime
        assert sum(LINEAR_1D_T5_LENGTHS[regime]["question"].values()) == 1000
    assert max(n for r in LINEAR_1D_T5_LENGTHS.values() for n in r["answer"]) == 4
    assert 21 < mean_length("train", "question") < 22.5
    rows = sample_lengths(3000, "train", seed=1)
    assert rows == sample_lengths(3000, "train", seed=1)
    assert all(13 <= q <= 38 and 2 <= t <= 4 for q, t in rows)
    assert abs(sum(q for q, _ in rows) / len(rows) - mean_length("train", "question")) < 0.5


def test_eval_bench_rows_have_t5_lengths():
    from bench.eval_bench import t5_length_ids

    ids, labels = t5_length_ids(500, seed=3)
    assert len(ids) == len(labels) == 500
    assert all(16 <= len(x) <= 35 and x[-1] == 1 and 1 not in x[:-1] for x in ids)
    assert all(2 <= len(y) <= 4 and y[-1] == 1 for y in labels)
    assert 22 < sum(map(len, ids)) / 500 < 27  # interpolate: like the hard regime's mean, ~24.7


def test_flan_t5_large_builds_untied_with_783m_parameters():
    from bench.train_gpu_bench import build_model

    model, _ = build_model("google/flan-t5-large", "meta")
    assert sum(p.numel() for p in model.parameters()) == 783_150_080
    assert model.lm_head.weight is not model.shared.weight


def test_train_bench_smoke_on_cpu(tmp_path):
    from bench.train_gpu_bench import main

    out = tmp_path / "r.jsonl"
    assert main(["--model", "t5-tiny", "--device", "cpu", "--precision", "fp32", "--micro-batch", "2", "4",
                 "--steps", "1", "--warmup", "1", "--distinct-batches", "2", "--profile", "2",
                 "--json-out", str(out)]) == 0
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["micro_batch"] for r in runs] == [2, 4]
    # --profile: where a step's time goes, per step (GPU fields only on a GPU)
    ops = dict(runs[0]["top_cpu_ops_ms_per_step"])
    assert runs[0]["profiled_steps"] == 2 and len(ops) == 8 and all(v >= 0 for v in ops.values())
    assert any(k.startswith("aten::") for k in ops) and "gpu_busy" not in runs[0]
    for r in runs:
        assert all(S % 8 == 0 and 2 <= T <= 4 for S, T in r["shapes"])
        assert 0 < r["useful_tokens_per_s"] < r["padded_tokens_per_s"]
        assert 0 < r["useful_tflops"] <= r["padded_tflops"] and r["mfu_useful"] is None  # no peak for a CPU


@pytest.mark.gpu
def test_train_bench_on_gpu(tmp_path):
    from bench.train_gpu_bench import main

    out = tmp_path / "r.jsonl"
    assert main(["--model", "t5-tiny", "--micro-batch", "16", "--steps", "2", "--profile", "2",
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["samples_per_s"] > 0 and r["max_memory_gib"] > 0 and r["device"]
    assert 0 < r["gpu_busy"] <= 1.5 and r["kernels_per_step"] > 100 and len(r["top_gpu_kernels_ms_per_step"]) == 8
