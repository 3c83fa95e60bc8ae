"""The pipeline stage: DeepMind Mathematics rows -> cleaned, validated, tokenized Parquet + manifest.

    python -m pipeline --config configs/demo.yaml [--source SPEC] [--output DIR] [--tokenizer char|ID|PATH]

Python API: `pipeline.run(cfg, ray_cfg) -> manifest dict` (see pipeline/job.py).
"""

from pipeline.job import OutputError, RejectError, run
from pipeline.sources import SourceError

__all__ = ["run", "SourceError", "OutputError", "RejectError"]
