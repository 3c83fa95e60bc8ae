"""The training data order (a new seeded order every epoch, every row once per epoch, resumable), the
stratified validation subset, the resume checks on the data order, and the trackers. Ray only in the
streamed-shard test."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from cluster.core import CheckpointError, DataError
from train.config import TrainConfig
from train.data import (
    InMemoryShard,
    ShardIterator,
    StreamedShard,
    split_bytes,
    stratified_take,
    validation_subset,
)
from train.loop import check_data_order, data_order, fsdp_policy

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import read_scalars  # noqa: E402


def write_ids(path: Path, n: int, files: int = 2) -> list[str]:
    """n rows whose input_ids encode the row number (row i: [i + 3, 1]), split over `files` files."""
    path.mkdir(parents=True, exist_ok=True)
    out, per = [], -(-n // files)
    for f in range(files):
        rows = range(f * per, min(n, (f + 1) * per))
        t = pa.table({"input_ids": pa.array([[i + 3, 1] for i in rows], type=pa.list_(pa.int32())),
                      "labels": pa.array([[5, 1]] * len(rows), type=pa.list_(pa.int32()))})
        pq.write_table(t, path / f"part-{f}.parquet")
        out.append(str(path / f"part-{f}.parquet"))
    return out


def row_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return (batch["input_ids"][:, 0] - 3).tolist()


def epoch_rows(source, epoch: int) -> list[int]:
    return [i for b in source.epoch(epoch, 0) for i in row_ids(b)]


def test_in_memory_every_row_once_per_epoch_in_a_new_order(tmp_path):
    files = write_ids(tmp_path, 96)
    shards = [InMemoryShard(files, r, 2, micro_batch=8, seed=3, pad_id=0, pad_to_multiple_of=8) for r in range(2)]
    assert shards[0].batches_per_epoch == 6
    orders = []
    for epoch in range(3):
        per_rank = [epoch_rows(s, epoch) for s in shards]
        assert sorted(per_rank[0] + per_rank[1]) == list(range(96))  # every row exactly once, over both ranks
        orders.append(per_rank[0])
    assert orders[0] != orders[1] != orders[2] and set(orders[0]) != set(orders[1])  # new order and new mix
    again = InMemoryShard(files, 0, 2, micro_batch=8, seed=3, pad_id=0, pad_to_multiple_of=8)
    assert epoch_rows(again, 1) == orders[1]  # deterministic for a seed and worker count
    other = InMemoryShard(files, 0, 2, micro_batch=8, seed=4, pad_id=0, pad_to_multiple_of=8)
    assert epoch_rows(other, 0) != orders[0]


def test_in_memory_drops_a_different_remainder_each_epoch(tmp_path):
    files = write_ids(tmp_path, 50, files=1)
    s = InMemoryShard(files, 0, 1, micro_batch=8, seed=0, pad_id=0, pad_to_multiple_of=8)
    seen = [set(epoch_rows(s, e)) for e in range(4)]
    assert all(len(x) == 48 for x in seen) and len(set.union(*seen)) == 50


def test_shard_iterator_resumes_with_the_next_batch(tmp_path):
    files = write_ids(tmp_path, 40, files=1)

    def make():
        return InMemoryShard(files, 0, 1, micro_batch=8, seed=1, pad_id=0, pad_to_multiple_of=8)

    full = ShardIterator(make())
    reference = [row_ids(next(full)) for _ in range(13)]  # 5 batches per epoch: crosses two epoch ends
    assert (full.epoch, full.position) == (2, 3)
    it = ShardIterator(make())
    for _ in range(5):  # exactly at the end of epoch 0: the resume starts epoch 1
        next(it)
    resumed = ShardIterator(make(), it.epoch, it.position)
    assert [row_ids(next(resumed)) for _ in range(8)] == reference[5:]


def test_shard_iterator_refuses_a_shard_without_a_full_batch(tmp_path):
    files = write_ids(tmp_path, 10, files=1)
    it = ShardIterator(InMemoryShard(files, 0, 2, micro_batch=8, seed=0, pad_id=0, pad_to_multiple_of=8))
    with pytest.raises(DataError, match="no full micro batch: 10 rows over 2 worker"):
        next(it)


def test_labels_are_padded_to_the_longest_answer_only(tmp_path):
    files = write_ids(tmp_path, 16, files=1)
    b = next(iter(InMemoryShard(files, 0, 1, micro_batch=8, seed=0, pad_id=0, pad_to_multiple_of=8).epoch(0, 0)))
    assert b["input_ids"].shape == (8, 8) and b["labels"].shape == (8, 2)


@pytest.mark.parametrize("multiple, window", [(8, 0), (1, 4)])
def test_in_memory_batches_are_exactly_the_collators(tmp_path, multiple, window):
    """The in-memory path pads straight from the flat token columns (FlatTokens.take -> pad_2d): the same tensors,
    dtype and shape as collate_seq2seq of the same rows, the pad id inside a row and the last row of the
    flat array (whose padding reads past the end) included."""
    from train.collate import collate_seq2seq

    rng = np.random.default_rng(0)
    q = [rng.integers(0, 90, rng.integers(1, 30)).tolist() + [1] for _ in range(96)]  # 0 = pad, inside rows too
    a = [rng.integers(3, 90, rng.integers(0, 5)).tolist() + [1] for _ in range(96)]
    pq.write_table(pa.table({"input_ids": q, "labels": a}), tmp_path / "t.parquet")
    shard = InMemoryShard([str(tmp_path / "t.parquet")], 0, 1, micro_batch=16, seed=2, pad_id=0,
                          pad_to_multiple_of=multiple, bucket_window=window)
    idx = shard.epoch_indices(0).reshape(-1, 16)
    batches = list(shard.epoch(0, 0))
    assert len(batches) == 6 and 95 in idx  # the flat array's last row is in a batch
    for sel, b in zip(idx, batches, strict=True):
        want = collate_seq2seq({"input_ids": [q[i] for i in sel], "labels": [a[i] for i in sel]}, 0, multiple)
        assert b.keys() == want.keys()
        for k in want:
            assert b[k].dtype == want[k].dtype and torch.equal(b[k], want[k]), k


def test_split_bytes_counts_token_columns_from_the_footers(tmp_path):
    files = write_ids(tmp_path, 1000, files=2)
    n = split_bytes(files)
    assert n == 2 * 1000 * (2 * 4 + 8)  # 2 columns x 1000 rows x (2 int32 ids + an int64 offset)
    assert split_bytes(files, ["labels"]) < n


def test_streamed_shard_every_row_once_per_epoch_in_a_new_order(ray_local):
    import ray.data

    ds = ray.data.from_items([{"input_ids": np.array([i + 3, 1], dtype=np.int32),
                               "labels": np.array([5, 1], dtype=np.int32)} for i in range(64)], override_num_blocks=4)
    src = StreamedShard(ds.iterator(), rank=0, micro_batch=8, seed=0, shuffle_buffer=4, pad_id=0,
                        pad_to_multiple_of=8)
    e0, e1 = epoch_rows(src, 0), epoch_rows(src, 1)
    assert sorted(e0) == sorted(e1) == list(range(64))
    assert e0 != e1
    assert epoch_rows(src, 0) == e0  # the same seed replays the same order (what resume relies on)
    resumed = [i for b in src.epoch(1, 3) for i in row_ids(b)]
    assert resumed == e1[24:]


def test_stratified_take_keeps_each_groups_share():
    groups = ["easy"] * 600 + ["medium"] * 300 + ["hard"] * 100
    idx = stratified_take(groups, 100, seed=0)
    assert Counter(groups[i] for i in idx) == {"easy": 60, "medium": 30, "hard": 10}
    assert list(idx) == sorted(set(idx)) and list(stratified_take(groups, 100, seed=0)) == list(idx)
    assert list(stratified_take(groups, 100, seed=1)) != list(idx)
    small = ["a"] * 5 + ["b"] * 3 + ["c"] * 2  # shares 2.5 / 1.5 / 1: the one left over by rounding down
    assert Counter(small[i] for i in stratified_take(small, 5, seed=0)) == {"a": 3, "b": 1, "c": 1}
    assert list(stratified_take(groups, 5000, seed=0)) == list(range(1000))


def test_validation_subset_is_stratified_by_regime_and_module(tmp_path):
    # the split in regime order, as the pipeline used to write it: the head would be all easy
    regimes = ["train-easy"] * 400 + ["train-medium"] * 400 + ["train-hard"] * 200
    modules = (["algebra__linear_1d", "arithmetic__add_or_sub"] * 500)
    t = pa.table({"input_ids": [[3, 1]] * 1000, "labels": [[4, 5, 1]] * 999 + [[4, 5, 6, 7, 1]],
                  "answer": [str(i) for i in range(1000)], "regime": regimes, "module": modules})
    pq.write_table(t, tmp_path / "v.parquet")
    sub = validation_subset(pads.dataset(str(tmp_path / "v.parquet")), 101, world=2, seed=0)
    assert len(sub["answer"]) == 100  # trimmed to a multiple of the worker count
    shares = Counter(sub["regime"])
    assert abs(shares["train-easy"] - 40) <= 1 and abs(shares["train-medium"] - 40) <= 1
    assert abs(shares["train-hard"] - 20) <= 1
    assert abs(Counter(sub["module"])["algebra__linear_1d"] - 50) <= 2
    no_strata = pa.table({k: t[k] for k in ("input_ids", "labels", "answer")})
    pq.write_table(no_strata, tmp_path / "v.parquet")
    assert len(validation_subset(pads.dataset(str(tmp_path / "v.parquet")), 10, world=3, seed=0)["answer"]) == 9


def test_resume_with_another_seed_or_worker_count_is_refused():
    cfg = TrainConfig(data="d", num_workers=2, global_batch_size=16)
    saved = data_order(cfg, 2, in_memory=True)
    check_data_order(saved, data_order(cfg, 2, in_memory=True), "ck")  # same: fine
    check_data_order(None, data_order(cfg, 2, in_memory=True), "ck")  # older checkpoint: nothing to check
    with pytest.raises(CheckpointError, match=r"world_size=2 \(this run: 4\)"):
        check_data_order(saved, data_order(TrainConfig(data="d", num_workers=4, global_batch_size=16), 4, True), "ck")
    with pytest.raises(CheckpointError, match=r"seed=0 \(this run: 1\)"):
        check_data_order(saved, data_order(TrainConfig(data="d", num_workers=2, global_batch_size=16, seed=1), 2,
                                           True), "ck")
    with pytest.raises(CheckpointError, match="data_loading='memory'"):
        check_data_order(saved, data_order(cfg, 2, in_memory=False), "ck")


def test_fsdp_bf16_mixed_gets_a_bf16_policy_with_fp32_reduction():
    p = fsdp_policy(TrainConfig(data="d", strategy="fsdp", precision="bf16-mixed"))
    assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
    assert fsdp_policy(TrainConfig(data="d", strategy="fsdp", precision="fp32")) is None


# ---- trackers ----
def test_tensorboard_tracker_writes_readable_scalars(tmp_path):
    from train.tracking import TensorBoardTracker

    t = TensorBoardTracker(tmp_path)
    t.log_params({"lr": 0.1})
    for step in (1, 2, 3):
        t.log_metrics({"train/loss": 1.0 / step}, step)
    t.close()
    assert read_scalars(tmp_path / "tensorboard") == {"train/loss": {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}}


def test_mlflow_file_store_holds_params_and_metrics(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from train.tracking import MLflowTracker, mlflow_uri

    uri = mlflow_uri(str(tmp_path / "mlruns"), tmp_path)
    t = MLflowTracker(uri, "mathtune-test", "run-a", tmp_path)
    t.log_params({"lr": 0.003, "model": "t5-tiny"})
    t.log_metrics({"train/loss": 2.0}, 1)
    t.log_metrics({"train/loss": 1.5, "val/exact_match": 0.25}, 2)
    t.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((tmp_path / "mlflow_run_id").read_text().strip())
    assert run.data.params == {"lr": "0.003", "model": "t5-tiny"}
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 2.0), (2, 1.5)]
    assert run.data.metrics["val/exact_match"] == 0.25
    # A resume continues that run; a fresh start into the same output opens a new one.
    first = run.info.run_id
    MLflowTracker(uri, "mathtune-test", "run-a", tmp_path).close()
    assert (tmp_path / "mlflow_run_id").read_text().strip() == first
    MLflowTracker(uri, "mathtune-test", "run-a", tmp_path, fresh=True).close()
    assert (tmp_path / "mlflow_run_id").read_text().strip() != first


def test_mlflow_tracker_never_blocks_on_an_unreachable_server(tmp_path):
    pytest.importorskip("mlflow")
    import time

    from train.tracking import MLflowTracker

    t = MLflowTracker("http://127.0.0.1:9", "x", "r", tmp_path, queue_size=4)
    t0 = time.perf_counter()
    for step in range(100):
        t.log_metrics({"loss": 1.0}, step)
    assert time.perf_counter() - t0 < 0.5  # queued or dropped, never waited on
    t.close(timeout_s=1.0)


def test_early_stopping_counts_validations_without_a_clear_improvement():
    from train.loop import RunState, early_stopping_update

    cfg = TrainConfig(data="d", early_stopping_patience=2, early_stopping_min_delta=0.01)
    state, seen = RunState(), []
    for score in (0.10, 0.20, 0.205, 0.15, 0.30, 0.30, 0.29):
        state.last_val = {"score": score}
        seen.append(early_stopping_update(state, cfg))
    # 0.205 is a new best (kept) but not a clear gain; 0.15 then makes two without one: stop
    assert seen[:4] == [(True, False), (True, False), (True, False), (False, True)]
    assert seen[4:] == [(True, False), (False, False), (False, True)] and state.best_score == 0.30
    no_patience = TrainConfig(data="d")
    state = RunState(best_score=0.5, since_best=10, last_val={"score": 0.1})
    assert early_stopping_update(state, no_patience) == (False, False)
