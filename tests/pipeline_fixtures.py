"""The pipeline's writing on one process, as the driver did it before the workers wrote: the tokenized stream
of the read units, in unit order, through one ShuffleWriter per train/validation split and one SplitWriter
each for test and rejects. Tests compare the workers' output with it byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cluster.core import DATA_SCHEMA, REJECT_SCHEMA
from pipeline.write import (
    SPILL_OPTIONS,
    SplitWriter,
    bucket_ids,
    bucket_permutation,
    group_by_bucket,
    stream_key,
)


class ShuffleWriter:
    """A SplitWriter whose rows come out in pipeline/write.py's seeded uniform random order, memory bounded by
    one bucket: the shuffle on one process, the reference for the pipeline's workers (UnitWriter,
    scatter_units and write_part compute the same bytes).

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
        for b, rows in group_by_bucket(table, ids, self.buckets):
            self._spill(b).write_table(rows)

    def _spill(self, b: int) -> pa.ipc.RecordBatchStreamWriter:
        if b not in self.spills:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.spills[b] = pa.ipc.new_stream(str(self._path(b)), self.schema, options=SPILL_OPTIONS)
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
            self.out.write(bucket.take(pa.array(bucket_permutation(self.key, b, bucket.num_rows))))
            del bucket
            path.unlink()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        return self.out.close()


def driver_stream_write(out: Path, batches, *, rows_per_file: int, seed: int, buckets: int) -> dict[str, list[Path]]:
    writers = {s: ShuffleWriter(out / s, DATA_SCHEMA, rows_per_file, seed=seed, buckets=buckets,
                                spill_dir=out / ".spill" / s) for s in ("train", "validation")}
    writers["test"] = SplitWriter(out / "test", DATA_SCHEMA, rows_per_file)
    writers["rejects"] = SplitWriter(out / "rejects", REJECT_SCHEMA, rows_per_file)
    for batch in batches:
        bad = pc.is_valid(batch["reject"])
        rej = batch.filter(bad)
        source = pc.if_else(pc.equal(rej["split"], "validation"), "train", rej["split"])
        writers["rejects"].write(pa.table({"split": source, "regime": rej["regime"], "module": rej["module"],
                                           "reason": rej["reject"], "question": rej["question_raw"],
                                           "answer": rej["answer_raw"]}))
        kept = batch.filter(pc.invert(bad))
        for split in ("train", "validation", "test"):
            writers[split].write(kept.filter(pc.equal(kept["split"], split)))
    return {k: w.close() for k, w in writers.items()}
