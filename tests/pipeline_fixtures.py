"""The pipeline's writing as the driver did it before the workers wrote (main until the workers-write change):
the tokenized stream of the read units, in unit order, through one ShuffleWriter per train/validation split
and one SplitWriter each for test and rejects. Tests compare the workers' output with it byte for byte."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cluster.core import DATA_SCHEMA, REJECT_SCHEMA
from pipeline.write import ShuffleWriter, SplitWriter


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
