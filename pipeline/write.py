"""Writing: Parquet per split with a byte-stable layout, a seeded shuffle, token-length statistics.

Files and row groups are cut at fixed row counts of the split's row stream (the read units in order, each
unit's rows in source order), never at Ray's block boundaries, and each row group is written from one
contiguous buffer, so the same rows always give the same bytes: the content hash in the manifest is
reproducible across runs, worker counts and faults.

Train and validation are written in a seeded uniform random order, so that any reader streaming the files
front to back sees every regime and module mixed in its share, not the source's regime-by-regime order (an
accidental easy -> medium -> hard curriculum). The order is a two-pass bucket shuffle that keeps memory
bounded by one bucket, not by the split: each row goes to a bucket by a seeded hash of its position in the
split's stream (bucket_ids), and each bucket is permuted by its own seeded permutation (bucket_permutation).
A uniform random bucket followed by a uniform permutation within the bucket is a uniform permutation of the
whole split, and since every bucket is a uniform sample, every window of consecutive rows is mixed as well.
The pipeline computes that order spread over Ray workers, in three steps, none of them on the driver (the
same order on one process, the reference the tests compare against: tests/pipeline_fixtures.py):

    UnitWriter (each read unit, in the worker that tokenized it): rows by split into its own spill files,
        rejects too; returns a small summary (counts, length histograms).
    scatter_units (a task per run of consecutive units, once the driver has added up the units' row counts,
        so each row's position in the split's stream is known): train/validation rows into buckets by the
        seeded hash of their stream position, one file per (bucket, run of units).
    write_part (a task per output file): the buckets (or units, for test and rejects) the file's row range
        overlaps, read in order, each bucket permuted by its own seeded permutation, written as one part.

Every spill file is named by its unit (and bucket) and written to a temporary name, then renamed: a retried
unit or task overwrites its own files, never appends, so a worker killed mid-write leaves no duplicate or
missing rows.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.core import DATA_SCHEMA, REJECT_SCHEMA, RejectError
from pipeline.validate import REASONS

ROW_GROUP_ROWS = 65_536


class SplitWriter:
    """Streams one split to <dir>/part-NNNNN.parquet: fixed rows per file and per row group. first_part
    numbers the first file (write_part writes one file of a split from the middle of its stream)."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int, first_part: int = 0):
        self.dir, self.schema, self.rows_per_file = directory, schema, rows_per_file
        self.first_part = first_part
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
        # One contiguous buffer per row group: Parquet's page cuts depend on the input's chunk boundaries (at
        # 200k rows: three different files for the same rows batched three ways), so without this the bytes
        # would depend on how the stream was batched.
        self.writer.write_table(head.combine_chunks(), row_group_size=n)
        self.rows_in_file += n
        if self.rows_in_file == self.rows_per_file:
            self.writer.close()
            self.writer = None
            self.rows_in_file = 0

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"part-{self.first_part + len(self.files):05d}.parquet"
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
# lz4: spills are written and read once; compression cuts their disk use ~3x for a little CPU
SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


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


def bucket_permutation(key: int, bucket: int, n: int) -> np.ndarray:
    """The seeded order of one bucket's n rows (its rows taken in stream order)."""
    return np.random.default_rng([key & 0xFFFFFFFF, key >> 32, bucket]).permutation(n)


def group_by_bucket(table: pa.Table, ids: np.ndarray, buckets: int):
    """(bucket, rows of that bucket in stream order) for each non-empty bucket, in bucket order."""
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(buckets + 1))
    grouped = table.take(pa.array(order))
    for b in np.flatnonzero(np.diff(bounds)):
        yield int(b), grouped.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b]))


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

    def merge(self, inputs: list[int], labels: list[int]) -> None:
        """Add histograms counted elsewhere (a worker's summary)."""
        for name, hist in (("inputs", inputs), ("labels", labels)):
            acc, hist = getattr(self, name), np.asarray(hist, dtype=np.int64)
            if len(hist) > len(acc):
                acc = np.pad(acc, (0, len(hist) - len(acc)))
            acc[: len(hist)] += hist
            setattr(self, name, acc)

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


# ---- the workers' side: each read unit writes its own files ------------------------------------------------

def unit_spill(spill: Path, kind: str, unit: int) -> Path:
    """A unit's rows of one kind (a split, or rejects), in stream order."""
    return spill / kind / "units" / f"unit-{unit:06d}.arrow"


def bucket_spill(spill: Path, kind: str, bucket: int, unit: int) -> Path:
    """A unit's rows that fall into one shuffle bucket, in stream order."""
    return spill / kind / f"bucket-{bucket:05d}" / f"unit-{unit:06d}.arrow"


class IpcFile:
    """An Arrow IPC stream written to a temporary name in its folder and renamed when complete: a retried
    writer replaces the file whole (never appends), and a killed one leaves only a stray .tmp file."""

    def __init__(self, path: Path, schema: pa.Schema):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        self.writer = pa.ipc.new_stream(str(self.tmp), schema, options=SPILL_OPTIONS)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)


def read_ipc(paths: list[Path], schema: pa.Schema) -> pa.Table:
    tables = []
    for path in paths:
        with pa.OSFile(str(path)) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _value_counts(x: pa.Array | pa.ChunkedArray) -> Counter:
    return Counter({v["values"]: v["counts"] for v in pc.value_counts(x).to_pylist()})


def _group_sum(t: pa.Table, keys: list[str], column: str | None = None) -> Counter:
    """Rows (or the sum of `column`) per distinct combination of `keys`: {(k1, k2, ...): n}."""
    agg = (column, "sum") if column else ([], "count_all")
    name = f"{column}_sum" if column else "count_all"
    g = t.select(keys + ([column] if column else [])).group_by(keys).aggregate([agg])
    return Counter({tuple(r[k] for k in keys): r[name] for r in g.to_pylist()})


class UnitWriter:
    """One read unit's tokenized batches (in the worker that tokenized them) -> the unit's spill files, one
    per split and one for rejects, and a summary small enough to send to the driver: rows by source split,
    rejects by split and reason, kept and rejected rows by module x split x regime, token-length histograms
    by module and split, the generator's skipped samples, and the rows in each spill file.

    Rows are streamed to temporary files that close renames: a unit's files appear whole or not at all."""

    def __init__(self, spill: Path, unit: int, *, strict: bool):
        self.spill, self.unit, self.strict = spill, unit, strict
        self.files: dict[str, IpcFile] = {}
        self.rows: Counter = Counter()  # kind -> rows
        self.rows_in: Counter = Counter()  # by source split (validation rows count under train: carved from it)
        self.rejected: Counter = Counter()  # (source split, reason) -> rows
        self.kept_by_module: Counter = Counter()  # (module, split, regime) -> rows
        self.rejected_by_module: Counter = Counter()  # (module, source split, regime) -> rows
        self.skipped: Counter = Counter()  # module -> samples the generator skipped
        self.lengths: dict[tuple[str, str], LengthStats] = defaultdict(LengthStats)  # (module, split)

    def add(self, batch: pa.Table) -> None:
        source_split = pc.if_else(pc.equal(batch["split"], "validation"), "train", batch["split"])
        self.rows_in.update(_value_counts(source_split))
        if pc.max(batch["source_skipped"]).as_py():
            for (module,), n in _group_sum(batch, ["module"], "source_skipped").items():
                self.skipped[module] += n
        is_rejected = pc.is_valid(batch["reject"])
        if pc.any(is_rejected).as_py():
            bad = batch.filter(is_rejected)
            if self.strict:
                first = bad.slice(0, 1).to_pylist()[0]
                raise RejectError(
                    f"--strict: {bad.num_rows} row(s) in this batch rejected, first reason {first['reject']!r} "
                    f"({REASONS[first['reject']]}); e.g. question={first['question_raw']!r} "
                    f"answer={first['answer_raw']!r}. Fix the source or run without --strict to write rejects")
            bad_split = pc.if_else(pc.equal(bad["split"], "validation"), "train", bad["split"])
            bad = bad.set_column(bad.schema.get_field_index("split"), "split", bad_split)
            self.rejected.update(_group_sum(bad, ["split", "reject"]))
            self.rejected_by_module.update(_group_sum(bad, ["module", "split", "regime"]))
            self._keep("rejects", pa.table({"split": bad_split, "regime": bad["regime"], "module": bad["module"],
                                            "reason": bad["reject"], "question": bad["question_raw"],
                                            "answer": bad["answer_raw"]}))
            batch = batch.filter(pc.invert(is_rejected))
        if batch.num_rows == 0:
            return
        self.kept_by_module.update(_group_sum(batch, ["module", "split", "regime"]))
        present = pc.unique(batch["split"]).to_pylist()
        for split in present:  # usually one split and one module per batch (a unit is one file or shard)
            part = batch if len(present) == 1 else batch.filter(pc.equal(batch["split"], split))
            self._keep(split, part)
            modules = pc.unique(part["module"]).to_pylist()
            for module in modules:
                one = part if len(modules) == 1 else part.filter(pc.equal(part["module"], module))
                self.lengths[(module, split)].add(one)

    def _keep(self, kind: str, table: pa.Table) -> None:
        schema = REJECT_SCHEMA if kind == "rejects" else DATA_SCHEMA
        if kind not in self.files:
            self.files[kind] = IpcFile(unit_spill(self.spill, kind, self.unit), schema)
        self.files[kind].write(table.select(schema.names).cast(schema))
        self.rows[kind] += table.num_rows

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return {
            "unit": self.unit,
            "rows": dict(self.rows),
            "rows_in": dict(self.rows_in),
            "rejected": [[*k, n] for k, n in self.rejected.items()],
            "kept_by_module": [[*k, n] for k, n in self.kept_by_module.items()],
            "rejected_by_module": [[*k, n] for k, n in self.rejected_by_module.items()],
            "skipped": [[m, n] for m, n in self.skipped.items()],
            "lengths": [[m, s, st.inputs.tolist(), st.labels.tolist()] for (m, s), st in self.lengths.items()],
        }


# Rows one scatter task reads (consecutive units): fewer, larger bucket files than one task per unit (the
# full mixture: ~2,200 units x 200 buckets would be ~450k files of ~250 rows on shared storage; grouped,
# ~45k), at ~150 MB of tokenized rows in a task's memory.
SCATTER_ROWS = 500_000


def scatter_units(spill: Path, kind: str, units: tuple[int, ...], offset: int, buckets: int, key: int) -> dict[int, int]:
    """Consecutive units' train (or validation) rows -> one file per bucket, by the seeded hash of each row's
    position in the split's stream (offset: the split's rows in the units before these), named by the first
    unit. Returns {bucket: rows}."""
    table = read_ipc([unit_spill(spill, kind, u) for u in units], DATA_SCHEMA)
    ids = bucket_ids(offset, table.num_rows, buckets, key)
    counts = {}
    for b, rows in group_by_bucket(table, ids, buckets):
        f = IpcFile(bucket_spill(spill, kind, b, units[0]), DATA_SCHEMA)
        f.write(rows)
        f.close()
        counts[b] = rows.num_rows
    return counts


def scatter_groups(rows: list[int], max_rows: int) -> list[tuple[tuple[int, ...], int]]:
    """The units with rows, in runs of consecutive units of about max_rows rows: [(units, rows before them)]."""
    groups: list[tuple[tuple[int, ...], int]] = []
    current: list[int] = []
    before = start = in_group = 0
    for u, n in enumerate(rows):
        if not n:
            continue
        if current and in_group + n > max_rows:
            groups.append((tuple(current), start))
            current, in_group = [], 0
        if not current:
            start = before
        current.append(u)
        in_group += n
        before += n
    if current:
        groups.append((tuple(current), start))
    return groups


@dataclass(frozen=True)
class Segment:
    """A run of consecutive rows of a split's stream: the spill files that hold it, read in order, and for
    a shuffle bucket the (key, bucket) of its seeded permutation."""
    files: tuple[str, ...]
    rows: int
    permutation: tuple[int, int] | None = None


def part_pieces(segments: list[Segment], rows_per_file: int) -> list[list[tuple[Segment, int, int]]]:
    """Cut a split's segments into output files of rows_per_file rows: for each file, the (segment, first
    row, end row) pieces it holds. An empty split still gets one (empty) file: readers can glob it."""
    parts: list[list[tuple[Segment, int, int]]] = [[]]
    room = rows_per_file
    for seg in segments:
        lo = 0
        while lo < seg.rows:
            if room == 0:
                parts.append([])
                room = rows_per_file
            hi = min(seg.rows, lo + room)
            parts[-1].append((seg, lo, hi))
            room -= hi - lo
            lo = hi
    return parts


def load_segment(seg: Segment, schema: pa.Schema) -> pa.Table:
    table = read_ipc([Path(f) for f in seg.files], schema)
    if table.num_rows != seg.rows:
        raise RuntimeError(f"spill files {seg.files} hold {table.num_rows} rows, expected {seg.rows}")
    if seg.permutation is not None:
        key, bucket = seg.permutation
        table = table.take(pa.array(bucket_permutation(key, bucket, table.num_rows)))
    return table


def write_part(directory: Path, schema: pa.Schema, rows_per_file: int, part: int,
               pieces: list[tuple[Segment, int, int]]) -> tuple[Path, int]:
    """Write output file number `part` of a split from its pieces (part_pieces): the same bytes a SplitWriter
    fed the whole stream writes for that file. A segment that spans two files is read by both (at most ~2x
    reads with buckets of ~200k rows and 500k-row files)."""
    w = SplitWriter(directory, schema, rows_per_file, first_part=part)
    for seg, lo, hi in pieces:
        w.write(load_segment(seg, schema).slice(lo, hi - lo))
    files = w.close()
    if len(files) != 1:
        raise RuntimeError(f"part {part} of {directory} came out as {len(files)} files")
    return files[0], w.rows


def content_hash(output: Path, relpaths: list[str]) -> str:
    """sha256 over the data files (path + bytes, sorted): equal hash = byte-identical output."""
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        h.update(rel.encode() + b"\0")
        with open(output / rel, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
