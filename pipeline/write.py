"""Writing: Parquet per split with a byte-stable layout, a seeded shuffle, token-length statistics.

Files and row groups are cut at fixed row counts of the (ordered) row stream, never at Ray's block
boundaries, so the same rows always give the same bytes: the content hash in the manifest is
reproducible across runs, worker counts and faults.

Train and validation are written in a seeded uniform random order (ShuffleWriter), so that any reader
streaming the files front to back sees every regime and module mixed in its share, not the source's
regime-by-regime order (an accidental easy -> medium -> hard curriculum). The shuffle is a two-pass
bucket shuffle that keeps memory bounded by one bucket, not by the split.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 65_536


class SplitWriter:
    """Streams one split to <dir>/part-NNNNN.parquet: fixed rows per file and per row group."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int):
        self.dir, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self.group = min(ROW_GROUP_ROWS, rows_per_file)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.files: list[Path] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        while self.pending_rows >= self._next_group():
            self._flush(self._next_group())

    def _next_group(self) -> int:
        return min(self.group, self.rows_per_file - self.rows_in_file)

    def _flush(self, n: int) -> None:
        buf = pa.concat_tables(self.pending)
        head, rest = buf.slice(0, n), buf.slice(n)
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self.writer is None:
            self._open()
        self.writer.write_table(head, row_group_size=n)
        self.rows_in_file += n
        if self.rows_in_file == self.rows_per_file:
            self.writer.close()
            self.writer = None
            self.rows_in_file = 0

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.rows_in_file = 0

    def close(self) -> list[Path]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        if self.writer is None and not self.files:
            self._open()  # an empty split still gets one (empty) file: readers can glob it
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.files


# Rows per shuffle bucket the writer aims for: one bucket is read back into memory at close (~50 MB of
# tokenized rows at 200k), so memory stays bounded whatever the split's size.
SHUFFLE_BUCKET_ROWS = 200_000
# At most this many spill files per split are open at once (a file descriptor each): past it buckets grow
# instead (the full 112M-row mixture: 200 buckets of ~560k rows, ~300 MB each at close).
MAX_SHUFFLE_BUCKETS = 200
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based 64-bit mix (SplitMix64's finalizer): the same input always gives the same output,
    so a row's bucket depends on its position in the stream only, never on how the stream was batched."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stream_key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"shuffle/{seed}/{name}".encode()).digest()[:8], "little")


def bucket_ids(start: int, n: int, buckets: int, key: int) -> np.ndarray:
    """Bucket of the rows at stream positions start..start+n-1: uniform over [0, buckets), seeded by key."""
    pos = np.arange(start, start + n, dtype=np.uint64) ^ np.uint64(key)
    return (splitmix64(pos) % np.uint64(buckets)).astype(np.int64)


class ShuffleWriter:
    """A SplitWriter whose rows come out in a seeded uniform random order, memory bounded by one bucket.

    Pass 1 (write): each row goes to one of `buckets` spill files (Arrow IPC) by a seeded hash of its
    position in the deterministic stream. Pass 2 (close): each bucket is read back, permuted by its own
    seeded permutation and written through a SplitWriter, bucket after bucket. A uniform random bucket
    followed by a uniform permutation within the bucket is a uniform permutation of the whole split, and
    since every bucket is a uniform sample, every window of consecutive rows is mixed as well.
    Same rows in the same stream order + same seed -> the same bytes.
    """

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int, *, seed: int, buckets: int,
                 spill_dir: Path):
        self.out = SplitWriter(directory, schema, rows_per_file)
        self.schema, self.buckets = schema, max(1, buckets)
        self.key = stream_key(seed, directory.name)
        self.spill_dir = spill_dir
        self.spills: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        ids = bucket_ids(self.rows, n, self.buckets, self.key)
        self.rows += n
        order = np.argsort(ids, kind="stable")  # group rows by bucket, keeping stream order within each
        bounds = np.searchsorted(ids[order], np.arange(self.buckets + 1))
        grouped = table.take(pa.array(order))
        for b in np.flatnonzero(np.diff(bounds)):
            self._spill(int(b)).write_table(grouped.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])))

    def _spill(self, b: int) -> pa.ipc.RecordBatchStreamWriter:
        if b not in self.spills:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            # lz4: spills are written and read once; compression cuts their disk use ~3x for a little CPU
            self.spills[b] = pa.ipc.new_stream(str(self._path(b)), self.schema,
                                               options=pa.ipc.IpcWriteOptions(compression="lz4"))
        return self.spills[b]

    def _path(self, b: int) -> Path:
        return self.spill_dir / f"bucket-{b:05d}.arrow"

    def close(self) -> list[Path]:
        for w in self.spills.values():
            w.close()
        for b in sorted(self.spills):
            path = self._path(b)
            with pa.OSFile(str(path)) as src:
                bucket = pa.ipc.open_stream(src).read_all()
            perm = np.random.default_rng([self.key & 0xFFFFFFFF, self.key >> 32, b]).permutation(bucket.num_rows)
            self.out.write(bucket.take(pa.array(perm)))
            del bucket
            path.unlink()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        return self.out.close()


class LengthStats:
    """Token-length histograms of one split (exact counts, so the manifest can be checked row by row)."""

    def __init__(self):
        self.inputs = np.zeros(0, dtype=np.int64)
        self.labels = np.zeros(0, dtype=np.int64)

    @staticmethod
    def _add(acc: np.ndarray, lists: pa.ChunkedArray) -> np.ndarray:
        counts = np.bincount(pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64))
        if len(counts) > len(acc):
            acc = np.pad(acc, (0, len(counts) - len(acc)))
        acc[: len(counts)] += counts
        return acc

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.inputs = self._add(self.inputs, table["input_ids"])
            self.labels = self._add(self.labels, table["labels"])

    @staticmethod
    def summary(hist: np.ndarray) -> dict:
        n = int(hist.sum())
        if n == 0:
            return {"rows": 0, "max": 0, "mean": 0.0, "histogram": {}}
        lengths = np.arange(len(hist))
        return {
            "rows": n,
            "min": int(lengths[hist > 0].min()),
            "max": int(lengths[hist > 0].max()),
            "mean": round(float((lengths * hist).sum() / n), 4),
            "histogram": {str(i): int(c) for i, c in enumerate(hist) if c},
        }

    def to_dict(self) -> dict:
        return {"input_tokens": self.summary(self.inputs), "label_tokens": self.summary(self.labels)}


def content_hash(output: Path, relpaths: list[str]) -> str:
    """sha256 over the data files (path + bytes, sorted): equal hash = byte-identical output."""
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        h.update(rel.encode() + b"\0")
        with open(output / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
