"""The pipeline stage: DeepMind Mathematics rows -> cleaned, validated, tokenized Parquet + manifest.

    python -m pipeline --config configs/demo.yaml [--source SPEC] [--output DIR] [--tokenizer char|ID|PATH]

Python API: `pipeline.run(cfg, ray_cfg) -> manifest dict` (see pipeline/job.py).
"""

from cluster.core import RejectError
from pipeline.job import OutputError, run
from pipeline.sources import SourceError

__all__ = ["run", "SourceError", "OutputError", "RejectError"]
