"""Training data on the worker side, and the validation subset on the driver side.

A worker sees its micro batches through `ShardIterator`: epoch after epoch, each epoch in a new order
seeded by (seed, epoch), with its position (epoch, batch in epoch) as checkpointable state. Where the
batches of one epoch come from is a *source* with one method, `epoch(epoch, start)`:

- `InMemoryShard`: a split small enough to hold (`train.in_memory_max_mb`) is read once per worker
  straight from Parquet (no Ray Data job, so a new epoch costs nothing) and permuted globally each epoch:
  every rank draws the same permutation of all rows and takes its own slice, so an epoch trains on every
  row exactly once (up to the remainder of a global batch), in a new mix every epoch. Resume jumps to the
  position; nothing is replayed.
- `StreamedShard`: a larger split streams through this worker's Ray Data shard, with a local shuffle
  buffer seeded by (seed, epoch, rank) (and the splitter's preserve_order, so the same seed and worker
  count replay the same batches). Resume replays the epoch's order and skips what was trained on.

Length bucketing (`train.length_bucketing`, a window in micro batches; 0 = off), on both sources: each
window of that many micro batches of the epoch's order is sorted by padded question length (the shape the
step computes on), cut into micro batches, and the window's micro batches are shuffled (`bucket_order`).
A micro batch is then a random sample of one padded-length class of its window, so padding falls (with
the flan-t5 tokenizer's 18-37-token questions: ~2 distinct shapes instead of every batch padded to its
longest row), while the order of batches stays random: regimes and modules keep alternating step after
step instead of running easy -> hard. The window and the shuffle are seeded like the rest of the order,
so resume replays the same batches.

Both are deterministic for a given seed and worker count, which is what makes a resumed run train on
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from cluster.core import IGNORE_INDEX, DataError, FlatRows
from train.collate import collate_seq2seq

TRAIN_COLUMNS = ("input_ids", "labels")
VAL_COLUMNS = ("input_ids", "labels", "answer")
STRATA_COLUMNS = ("regime", "module")  # the validation subset keeps each one's share (those present)


class Collator(NumpyBatchCollateFn):
    """Ray Data's collate-fn class for `iter_torch_batches(collate_fn=...)` (a plain function is deprecated
    there); also called directly on the in-memory path. The padding itself is train/collate.py's pure
    function, which stays free of Ray."""

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_seq2seq(batch, self.pad_id, self.pad_to_multiple_of)


def epoch_rng(seed: int, epoch: int, *more: int) -> np.random.Generator:
    """The one generator behind an epoch's order: a pure function of (seed, epoch[, rank])."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *more]))


def bucket_order(order: np.ndarray, lengths: np.ndarray, micro: int, window: int, multiple: int,
                 rng: np.random.Generator) -> np.ndarray:
    """`order` (row indices, len a multiple of `micro`) regrouped for length bucketing: every `window`
    micro batches of it (the last window may be shorter) are stably sorted by padded length class
    ceil(length / multiple), so rows of one class keep their random order and each micro batch is a random
    sample of its class; the window's micro batches are then shuffled by `rng`. Same rows, same count."""
    classes = -(-np.asarray(lengths) // max(1, multiple))
    out = []
    for start in range(0, len(order), micro * window):
        w = order[start:start + micro * window]
        w = w[np.argsort(classes[w], kind="stable")].reshape(-1, micro)
        out.append(w[rng.permutation(len(w))].reshape(-1))
    return np.concatenate(out) if out else order


def host_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(samples, real input + label tokens) of a collated batch still on the host: no device sync."""
    return batch["input_ids"].size(0), int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":  # pinned pages (pin_memory() returns an already pinned tensor as is): async copy
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------
# The iterator with its own state


class ShardIterator:
    """Micro batches from `source`, epoch after epoch. Its state is (epoch, position = batches of this
    epoch already handed out); saved with a checkpoint, a new iterator built with it continues with
    exactly the next batch."""

    def __init__(self, source, epoch: int = 0, position: int = 0) -> None:
        self.source, self.epoch, self.position = source, epoch, position
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> ShardIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._it is None:
                self._it = iter(self.source.epoch(self.epoch, self.position))
                self._fresh = self.position == 0
            batch = next(self._it, None)
            if batch is not None:
                self.position += 1
                self._fresh = False
                return batch
            if self._fresh:
                raise DataError(f"this worker's train shard yields no full micro batch: {self.source.describe()}")
            self.epoch, self.position, self._it = self.epoch + 1, 0, None


# ---------------------------------------------------------------------------------------------------
# Sources


class FlatTokens:
    """A column of token lists as one flat int32 array + offsets: the data's own size in memory (a
    Python list of arrays would add ~100 bytes per row), rows sliced out as views."""

    def __init__(self, column) -> None:
        import pyarrow as pa

        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if isinstance(arr, pa.ExtensionArray):  # Ray Data's tensor columns (a dataset made from numpy arrays)
            arr = pa.array([np.asarray(r).ravel() for r in arr.to_numpy(zero_copy_only=False)])
        arr = arr.cast(pa.large_list(pa.int32()))
        self.offsets = arr.offsets.to_numpy().astype(np.int64)
        self.values = arr.values.to_numpy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Every row's length (computed, not held: the offsets already say it; length bucketing reads it
        once per epoch or window)."""
        return np.diff(self.offsets)

    def take(self, idx: np.ndarray) -> FlatRows:
        """Rows `idx`, without copying them: what pad_2d pads (a 2048-row micro batch on the training
        thread in ~1.5 ms, against ~8.5 ms as a list of per-row arrays on the dev VM)."""
        starts = self.offsets[idx]
        return FlatRows(self.values, starts, self.offsets[np.asarray(idx) + 1] - starts)


class InMemoryShard:
    """The whole split read once from Parquet; each epoch, every rank draws the same seeded permutation
    of all rows and takes its own contiguous slice of `rows // world` rows (the rest of the permutation is
    this epoch's dropped remainder, a different set each epoch)."""

    def __init__(self, files: Sequence[str], rank: int, world: int, micro_batch: int, seed: int,
                 pad_id: int, pad_to_multiple_of: int, bucket_window: int = 0) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(list(files), columns=list(TRAIN_COLUMNS))
        self.input_ids, self.labels = FlatTokens(table["input_ids"]), FlatTokens(table["labels"])
        self.rank, self.world, self.micro, self.seed = rank, world, micro_batch, seed
        self.collate = Collator(pad_id, pad_to_multiple_of)
        self.rows = len(self.input_ids)
        self.batches_per_epoch = (self.rows // world) // micro_batch
        self.window, self.multiple = bucket_window, pad_to_multiple_of

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's rows for `epoch`, in training order (batches_per_epoch x micro_batch of them)."""
        perm = epoch_rng(self.seed, epoch).permutation(self.rows)
        per_rank = self.rows // self.world
        idx = perm[self.rank * per_rank:(self.rank + 1) * per_rank][:self.batches_per_epoch * self.micro]
        if self.window:
            idx = bucket_order(idx, self.input_ids.lengths, self.micro, self.window, self.multiple,
                               epoch_rng(self.seed, epoch, self.rank))
        return idx

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        idx = self.epoch_indices(epoch)
        for b in range(start, self.batches_per_epoch):
            sel = idx[b * self.micro:(b + 1) * self.micro]
            yield self.collate({"input_ids": self.input_ids.take(sel), "labels": self.labels.take(sel)})

    def describe(self) -> str:
        return f"{self.rows} rows over {self.world} worker(s) in micro batches of {self.micro}"

    def padded_tokens(self, epoch: int) -> tuple[int, int]:
        """(real, padded) question tokens of this rank's epoch: what bucketing saves, without collating."""
        idx = self.epoch_indices(epoch).reshape(-1, self.micro)
        lens = self.input_ids.lengths[idx]
        padded = -(-lens.max(axis=1) // self.multiple) * self.multiple
        return int(lens.sum()), int((padded * self.micro).sum())


class StreamedShard:
    """This worker's Ray Data shard, read anew each epoch through a local shuffle buffer whose seed
    varies with (seed, epoch, rank). With length bucketing it reads windows of `bucket_window` micro
    batches and regroups each (`bucket_order`) before collating them."""

    def __init__(self, shard, rank: int, micro_batch: int, seed: int, shuffle_buffer: int,
                 pad_id: int, pad_to_multiple_of: int, pin_memory: bool = False, bucket_window: int = 0) -> None:
        self.shard, self.rank, self.micro, self.seed = shard, rank, micro_batch, seed
        self.buffer = shuffle_buffer * micro_batch or None
        self.collate, self.pin_memory = Collator(pad_id, pad_to_multiple_of), pin_memory
        self.window, self.multiple = bucket_window, pad_to_multiple_of

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        seed = int(epoch_rng(self.seed, epoch, self.rank).integers(2**31))
        if self.window:
            yield from self._bucketed(epoch, start, seed)
            return
        # Collation runs in Ray's prefetch threads; tensors stay on the host (device="cpu") so the loop
        # counts tokens there and copies them itself (pinned on GPU).
        batches = self.shard.iter_torch_batches(
            batch_size=self.micro, collate_fn=self.collate, device="cpu", pin_memory=self.pin_memory,
            drop_last=True, local_shuffle_buffer_size=self.buffer, local_shuffle_seed=seed)
        for i, b in enumerate(batches):
            if i >= start:  # resume: the same order is replayed, what was trained on is skipped
                yield b

    def _bucketed(self, epoch: int, start: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Windows of micro x window rows (the same shuffled stream as unbucketed), each regrouped by
        `bucket_order` with a generator seeded by (seed, epoch, rank, window number); a last partial window
        keeps its full micro batches (drop_last, as unbucketed). Collated here, in the loop's thread, from
        each window's Arrow columns held as flat arrays (`FlatTokens`, as the in-memory path): no Python
        object per row (a numpy-format window made an array per row, and each micro batch a list of them)."""
        rows = self.micro * self.window
        windows = self.shard.iter_batches(batch_size=rows, batch_format="pyarrow", drop_last=False,
                                          local_shuffle_buffer_size=self.buffer, local_shuffle_seed=seed)
        i = 0
        for w, batch in enumerate(windows):
            n = batch.num_rows // self.micro * self.micro
            if i + n // self.micro <= start:  # resume: a whole window already trained on
                i += n // self.micro
                continue
            cols = {k: FlatTokens(batch[k]) for k in TRAIN_COLUMNS}
            order = bucket_order(np.arange(n), cols["input_ids"].lengths, self.micro, self.window, self.multiple,
                                 epoch_rng(self.seed, epoch, self.rank, w))
            for b in order.reshape(-1, self.micro):
                if i >= start:
                    yield self.collate({k: c.take(b) for k, c in cols.items()})
                i += 1

    def describe(self) -> str:
        return f"streamed shard of worker {self.rank}, micro batches of {self.micro}"


def split_bytes(files: Sequence[str], columns: Sequence[str] = TRAIN_COLUMNS) -> int:
    """Bytes `columns` take in a worker's memory as `FlatTokens` (4 per token id + 8 per row offset),
    counted from the Parquet footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in columns:
                    total += 4 * col.num_values + 8 * rg.num_rows
    return total


# ---------------------------------------------------------------------------------------------------
# The validation subset (driver side)


def stratified_take(groups: Sequence[Any], n: int, seed: int) -> np.ndarray:
    """Indices of n rows (sorted) in which every group holds its share of the whole (largest remainder
    rounding), picked at random within each group by `seed`. Deterministic; n >= len(groups) -> all rows."""
    total = len(groups)
    if n >= total:
        return np.arange(total)
    keys, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(keys))
    exact = counts * n / total
    take = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - take), kind="stable")[: n - take.sum()]:
        take[k] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(inverse == k))[:take[k]] for k in range(len(keys))]
    return np.sort(np.concatenate(picked))


def validation_subset(files_ds, n: int, world: int, seed: int) -> dict[str, list]:
    """The rows validated during training: n rows stratified by regime (and module, where the split has
    that column), trimmed to a multiple of the worker count so every rank scores as many rows (FSDP runs
    its forwards in lockstep). Read on the driver with pyarrow: no Ray Data job."""
    names = set(files_ds.schema.names)
    strata = [c for c in STRATA_COLUMNS if c in names]
    rows = files_ds.count_rows()
    if strata:  # only the strata columns are read in full; the token columns only for the rows taken
        labels = files_ds.to_table(columns=strata)
        groups = ["\x1f".join(map(str, vals)) for vals in zip(*(labels[c].to_pylist() for c in strata), strict=True)]
    else:
        groups = [""] * rows
    idx = stratified_take(groups, n, seed)
    idx = idx[: len(idx) - len(idx) % world]
    if len(idx) == 0:
        raise DataError(f"the validation split has {rows} rows: fewer than one per worker ({world})")
    sub = files_ds.take(idx, columns=[*VAL_COLUMNS, *strata])
    return {"input_ids": sub["input_ids"].to_pylist(), "labels": sub["labels"].to_pylist(),
            "answer": sub["answer"].to_pylist(), **{c: sub[c].to_pylist() for c in strata}}
