"""Writing: Parquet per split with a byte-stable layout, token-length statistics, the manifest.

Files and row groups are cut at fixed row counts of the (ordered) row stream, never at Ray's block
boundaries, so the same rows always give the same bytes: the content hash in the manifest is
reproducible across runs, worker counts and faults.
"""

from __future__ import annotations

import hashlib
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
