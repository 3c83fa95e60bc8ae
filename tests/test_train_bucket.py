"""Length bucketing (train.length_bucketing) and the micro batch chosen by the memory planner
(train.micro_batch_size auto): padding falls on real generated rows, every row is still seen once per
epoch, batches stay mixed, resume replays the same batches; the planner's estimate against peaks measured
on a GPU, and its choice per card. Ray only in the streamed-shard test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.config import ConfigError, from_dict
from cluster.core import CheckpointError
from train.config import TrainConfig
from train.data import InMemoryShard, ShardIterator, StreamedShard, bucket_order
from train.loop import check_data_order, data_order, resolve_micro_batch

GIB = 2**30


def write_rows(path: Path, ids: list[list[int]], regimes: list[str] | None = None) -> list[str]:
    """Rows whose first input token is the row number + 3 (row_ids reads it back), then `ids[i]`."""
    path.mkdir(parents=True, exist_ok=True)
    t = pa.table({"input_ids": pa.array([[i + 3, *x] for i, x in enumerate(ids)], type=pa.list_(pa.int32())),
                  "labels": pa.array([[5, 1]] * len(ids), type=pa.list_(pa.int32())),
                  "regime": regimes or ["train-easy"] * len(ids)})
    pq.write_table(t, path / "part-0.parquet")
    return [str(path / "part-0.parquet")]


def row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] - 3).tolist()


def varied_lengths(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[7] * int(k) + [1] for k in rng.integers(1, 40, n)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """algebra__linear_1d from DeepMind's generator, 300 rows per train regime, interleaved at random as the
    pipeline writes them, tokenized with the built-in char tokenizer."""
    pytest.importorskip("mathematics_dataset")
    from cluster.core import load_tokenizer
    from pipeline.generate import generate_rows

    tok = load_tokenizer("char")
    rows = []
    for regime in ("train-easy", "train-medium", "train-hard"):
        q, a, _ = generate_rows("algebra__linear_1d", regime, 300, seed=1)
        rows += [(tok(x)["input_ids"], tok(y)["input_ids"], regime) for x, y in zip(q, a, strict=True)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    path = tmp_path_factory.mktemp("generated")
    pq.write_table(pa.table({"input_ids": pa.array([r[0] for r in rows], type=pa.list_(pa.int32())),
                             "labels": pa.array([r[1] for r in rows], type=pa.list_(pa.int32())),
                             "regime": [r[2] for r in rows]}), path / "part-0.parquet")
    return [str(path / "part-0.parquet")], [r[2] for r in rows]


# ---- bucket_order (pure) ----

def test_bucket_order_keeps_the_rows_and_each_window_sorted_into_shuffled_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 1000)
    order = rng.permutation(1000)[:960]  # 60 micro batches of 16
    out = bucket_order(order, lengths, micro=16, window=8, multiple=8, rng=np.random.default_rng(1))
    assert sorted(out) == sorted(order)  # the same rows, once each
    batches = out.reshape(-1, 16)
    for w in range(0, 60, 8):  # a window's batches hold exactly the window's rows (nothing crosses windows)
        assert sorted(batches[w:w + 8].reshape(-1)) == sorted(order[w * 16:(w + 8) * 16])
    classes = -(-lengths // 8)
    spread = sum(np.ptp(classes[b]) for b in batches)  # classes a batch spans beyond its first
    assert spread < 0.25 * sum(np.ptp(classes[b]) for b in order.reshape(-1, 16))
    padded = sum(classes[b].max() for b in batches) * 16 * 8
    plain = sum(classes[b].max() for b in order.reshape(-1, 16)) * 16 * 8
    assert padded < 0.7 * plain
    first = [classes[b].max() for b in batches[:8]]
    assert first != sorted(first)  # the window's batches are shuffled, not short -> long
    again = bucket_order(order, lengths, micro=16, window=8, multiple=8, rng=np.random.default_rng(1))
    assert list(again) == list(out)  # a pure function of its generator: resume replays it


def test_bucket_order_keeps_the_random_order_within_a_length_class():
    """Rows of one padded class keep the epoch's random order (stable sort): a batch is a random sample of
    its class, not the rows that happened to be shortest."""
    lengths = np.full(64, 20)  # all one class
    order = np.random.default_rng(0).permutation(64)
    out = bucket_order(order, lengths, micro=8, window=8, multiple=8, rng=np.random.default_rng(0))
    assert sorted(map(tuple, out.reshape(-1, 8))) == sorted(map(tuple, order.reshape(-1, 8)))


# ---- the in-memory source ----

def test_bucketing_cuts_padding_on_generated_linear_1d(generated):
    """Measured on DeepMind's generator + the char tokenizer (questions ~20-60 characters), micro batches
    of 32 padded to multiples of 8: 55% padding on top of the real question tokens without bucketing,
    10% with it (what is left is mostly the rounding up to 8)."""
    files, _ = generated
    plain = InMemoryShard(files, 0, 1, micro_batch=32, seed=0, pad_id=0, pad_to_multiple_of=8)
    bucketed = InMemoryShard(files, 0, 1, micro_batch=32, seed=0, pad_id=0, pad_to_multiple_of=8, bucket_window=64)
    (real, pad_plain), (real_b, pad_bucket) = plain.padded_tokens(0), bucketed.padded_tokens(0)
    assert real == real_b  # the same rows
    assert pad_plain / real > 1.4 and pad_bucket / real < 1.15
    assert pad_bucket - real < 0.25 * (pad_plain - real)  # padding tokens cut by more than 4x
    # ... and the collated batches agree with that count
    assert sum(b["input_ids"].numel() for b in bucketed.epoch(0, 0)) == pad_bucket


def test_bucketed_batches_stay_mixed_across_regimes(generated):
    """The order the model trains on: consecutive batches alternate between regimes (no easy -> hard run),
    and every regime appears in the first quarter of the epoch in about its share."""
    files, regimes = generated
    s = InMemoryShard(files, 0, 1, micro_batch=32, seed=0, pad_id=0, pad_to_multiple_of=8, bucket_window=64)
    batches = s.epoch_indices(0).reshape(-1, 32)  # the rows of each batch, in training order
    majority = [Counter(regimes[i] for i in b).most_common(1)[0][0] for b in batches]
    changes = sum(a != b for a, b in zip(majority, majority[1:], strict=False))
    assert changes >= len(majority) // 3, majority
    first = Counter(regimes[i] for b in batches[: len(batches) // 4] for i in b)
    assert all(first[r] >= 0.15 * sum(first.values()) for r in ("train-easy", "train-medium", "train-hard")), first


def test_bucketed_in_memory_every_row_once_per_epoch_and_resume(tmp_path):
    files = write_rows(tmp_path, varied_lengths(200))
    shards = [InMemoryShard(files, r, 2, micro_batch=8, seed=3, pad_id=0, pad_to_multiple_of=8, bucket_window=4)
              for r in range(2)]
    for epoch in range(2):
        rows = [i for s in shards for b in s.epoch(epoch, 0) for i in row_ids(b)]
        assert len(rows) == len(set(rows)) == 2 * 12 * 8  # 100 per rank -> 12 full batches; no row twice
    plain = InMemoryShard(files, 0, 2, micro_batch=8, seed=3, pad_id=0, pad_to_multiple_of=8)
    assert set(shards[0].epoch_indices(0)) == set(plain.epoch_indices(0))  # bucketing reorders, never reselects

    def make():
        return InMemoryShard(files, 0, 2, micro_batch=8, seed=3, pad_id=0, pad_to_multiple_of=8, bucket_window=4)

    full = ShardIterator(make())
    reference = [row_ids(next(full)) for _ in range(30)]  # 12 batches per epoch: crosses two epoch ends
    for stop in (5, 12, 17):  # mid-window, at an epoch end, mid-window of the next epoch
        it = ShardIterator(make())
        for _ in range(stop):
            next(it)
        resumed = ShardIterator(make(), it.epoch, it.position)
        assert [row_ids(next(resumed)) for _ in range(30 - stop)] == reference[stop:]


@pytest.mark.parametrize("columns", ["parquet lists", "numpy tensors"])
def test_streamed_bucketed_shard_every_row_once_and_resume(ray_local, columns):
    """Both column forms a shard can hold: list<int32> as the pipeline's Parquet is read, and Ray Data's
    tensor columns (a dataset made from numpy arrays)."""
    import pyarrow as pa
    import ray.data

    lengths = varied_lengths(96, seed=1)
    rows = [[i + 3, *x] for i, x in enumerate(lengths)]
    if columns == "numpy tensors":
        ds = ray.data.from_items([{"input_ids": np.array(r, dtype=np.int32), "labels": np.array([5, 1], dtype=np.int32)}
                                  for r in rows], override_num_blocks=4)
    else:
        table = pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())),
                          "labels": pa.array([[5, 1]] * len(rows), pa.list_(pa.int32()))})
        ds = ray.data.from_arrow([table.slice(i, 24) for i in range(0, len(rows), 24)])
    src = StreamedShard(ds.iterator(), rank=0, micro_batch=8, seed=0, shuffle_buffer=4, pad_id=0,
                        pad_to_multiple_of=8, bucket_window=4)
    e0 = [row_ids(b) for b in src.epoch(0, 0)]
    assert sorted(i for b in e0 for i in b) == list(range(96))  # 3 windows of 4 batches: every row once
    assert [row_ids(b) for b in src.epoch(0, 0)] == e0  # replayed identically
    assert [row_ids(b) for b in src.epoch(0, 6)] == e0[6:]  # resume mid-window
    for b in src.epoch(0, 0):  # each row's own tokens, then padding; labels padded to the longest answer
        for i, ids, mask in zip(row_ids(b), b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True):
            assert ids[:sum(mask)] == rows[i] and set(ids[sum(mask):]) <= {0} and sum(mask) == len(rows[i])
        assert b["labels"].tolist() == [[5, 1]] * 8
    plain = StreamedShard(ds.iterator(), rank=0, micro_batch=8, seed=0, shuffle_buffer=4, pad_id=0,
                          pad_to_multiple_of=8)
    pad = [sum(b["input_ids"].numel() for b in s.epoch(0, 0)) for s in (plain, src)]
    assert pad[1] < 0.85 * pad[0]  # windows of only 32 rows here, and still


def test_resume_with_another_bucketing_window_is_refused():
    cfg = TrainConfig(data="d", global_batch_size=16, num_workers=2)
    saved = data_order(cfg, 2, in_memory=True)
    assert saved["length_bucketing"] == 64  # on by default
    check_data_order(saved, data_order(cfg, 2, in_memory=True), "c")
    with pytest.raises(CheckpointError, match="length_bucketing=64 \\(this run: 0\\)"):
        check_data_order(saved, data_order(TrainConfig(data="d", global_batch_size=16, length_bucketing=0), 2, True), "c")


# ---- the micro batch: config, planner, run time ----

def test_auto_micro_batch_config():
    cfg = from_dict(TrainConfig, {"micro_batch_size": "auto", "global_batch_size": 2048, "num_workers": 8}, "train")
    assert cfg.micro_batch_size == 0 and cfg.auto_micro_batch
    with pytest.raises(RuntimeError, match="resolve it first"):
        _ = cfg.micro_batch
    fixed = cfg.with_micro_batch(128)
    assert (fixed.micro_batch, fixed.grad_accum) == (128, 2)
    with pytest.raises(ConfigError, match="must divide the per-worker batch"):
        cfg.with_micro_batch(96)
    with pytest.raises(ConfigError, match="length_bucketing must be >= 0|length_bucketing"):
        TrainConfig(data="d", length_bucketing=-1)
    assert "micro_batch" not in data_order(cfg, 8, in_memory=False)  # the driver cannot know it yet


# Peaks measured 2026-11-27 on one H200 (bench/train_gpu_bench.py): flan-t5-large untied, bf16-mixed,
# fused AdamW, dropout 0.1, one worker, questions padded to 40 tokens, answers 4; max_memory_allocated.
H200_PEAKS_GIB = {128: 25.82, 256: 41.43, 512: 72.65}


@pytest.mark.parametrize("micro,peak", sorted(H200_PEAKS_GIB.items()))
def test_plan_estimate_is_just_above_the_measured_gpu_peaks(micro, peak):
    from train.plan import estimate

    cfg = TrainConfig(data="d", model="google/flan-t5-large", num_workers=1, global_batch_size=512,
                      micro_batch_size=micro, plan_source_len=40, plan_target_len=4)
    total = estimate(cfg).total / GIB
    assert peak <= total <= 1.2 * peak, (micro, total, peak)  # safe, and not so safe it wastes the card


def test_plan_estimate_under_train_compile_is_just_above_its_measured_peak():
    """train.compile keeps fewer activations: 23.22 GiB at micro batch 256 on the same H200 and shapes (41.43
    eager), so the planner lets a compiled run take twice the micro batch on a 40 GB card."""
    from train.plan import estimate

    kw = dict(data="d", model="google/flan-t5-large", num_workers=1, global_batch_size=512, micro_batch_size=256,
              plan_source_len=40, plan_target_len=4)
    compiled = estimate(TrainConfig(**kw, compile=True))
    assert 23.22 <= compiled.total / GIB <= 1.2 * 23.22
    assert compiled.total < 0.7 * estimate(TrainConfig(**kw)).total
    auto = dict(kw, num_workers=8, global_batch_size=2048, micro_batch_size="auto")
    assert estimate(TrainConfig(**auto)).choices["A100 40GB"] == 128
    assert estimate(TrainConfig(**auto, compile=True)).choices["A100 40GB"] == 256


def test_plan_estimate_of_the_speedrun_model_is_just_above_its_measured_peak():
    """A second architecture on the same card: t5-small-scratch (char vocabulary), micro batch 512 x (64
    source, 5 target) characters, measured 14.18 GiB."""
    from train.plan import estimate

    cfg = TrainConfig(data="d", model="t5-small-scratch", num_workers=1, global_batch_size=512,
                      plan_source_len=64, plan_target_len=5)
    assert 14.18 <= estimate(cfg).total / GIB <= 1.2 * 14.18


def test_plan_activations_grow_with_rows_and_lengths_as_measured():
    """Per row the measured peaks grow by 0.1220 GiB (128 -> 256 -> 512 rows: exactly linear)."""
    from train.plan import activation_bytes, architecture

    a = architecture("google/flan-t5-large")
    per_row = (activation_bytes(a, "bf16-mixed", 512, 40, 4) - activation_bytes(a, "bf16-mixed", 256, 40, 4)) / 256
    measured = (H200_PEAKS_GIB[512] - H200_PEAKS_GIB[256]) / 256 * GIB
    assert per_row == pytest.approx(measured, rel=0.03)
    assert activation_bytes(a, "bf16-mixed", 64, 80, 4) > 1.9 * activation_bytes(a, "bf16-mixed", 64, 40, 4)
    assert activation_bytes(a, "fp32", 64, 40, 4) > activation_bytes(a, "bf16-mixed", 64, 40, 4)


def test_planner_chooses_the_largest_fitting_divisor_per_card():
    from train.plan import GPUS, choose_micro_batch, estimate, micro_batch_candidates

    assert micro_batch_candidates(96) == [1, 2, 4, 8, 16, 24, 32, 48, 96]
    cfg = TrainConfig(data="d", model="google/flan-t5-large", num_workers=8, global_batch_size=2048,
                      micro_batch_size="auto", plan_source_len=40, plan_target_len=4)
    plan = estimate(cfg)
    assert plan.choices["A100 80GB"] == plan.choices["H100 80GB"] == 256 and plan.choices["A100 40GB"] == 128
    for name, gb in GPUS.items():  # the choice fits with the margin; the next candidate would not
        m = plan.choices[name]
        assert estimate(cfg, m).total <= 0.9 * gb * 1e9
        bigger = [c for c in micro_batch_candidates(256) if c > m]
        assert not bigger or estimate(cfg, bigger[0]).total > 0.9 * gb * 1e9
    assert choose_micro_batch(cfg, None) == 32  # CPU: a small default
    assert choose_micro_batch(cfg, 8e9) is None  # the model alone does not fit
    xl = TrainConfig(data="d", model="google/flan-t5-xl", num_workers=8, global_batch_size=2048,
                     micro_batch_size="auto")
    assert not estimate(xl).fits()["A100 40GB"] and estimate(xl).fits()["H200 141GB"]


def test_flan_t5_large_config_gets_at_least_256_on_80gb_cards(capsys):
    from train.__main__ import main

    assert main(["plan", "--config", "configs/flan-t5-large.yaml"]) == 0
    out = capsys.readouterr().out
    assert "fits H100 80GB    yes  micro batch   256" in out and "fits A100 80GB    yes  micro batch   256" in out
    assert "fits A100 40GB    yes  micro batch   128" in out and "used at run time" in out


def test_resolve_micro_batch_on_cpu_and_on_resume():
    cfg = TrainConfig(data="d", global_batch_size=128, num_workers=1, micro_batch_size="auto")
    assert resolve_micro_batch(cfg, torch.device("cpu"), None).micro_batch == 32
    saved = {"data_order": {"micro_batch": 64}}  # a resume keeps the micro batch its data position counts
    assert resolve_micro_batch(cfg, torch.device("cpu"), saved).micro_batch == 64
    fixed = TrainConfig(data="d", global_batch_size=128, num_workers=1, micro_batch_size=16)
    assert resolve_micro_batch(fixed, torch.device("cpu"), saved) is fixed

