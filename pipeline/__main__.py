"""python -m pipeline --config FILE [--source SPEC] [--output DIR] [--tokenizer char|ID|PATH] [--strict] ..."""

from __future__ import annotations

import logging

from cluster.config import parse_stage_args, run_cli
from pipeline.config import PipelineConfig


def main(argv: list[str] | None = None) -> int:
    cfg, ray_cfg, _ = parse_stage_args(
        PipelineConfig, "pipeline", argv,
        description="DeepMind Mathematics -> cleaned, validated, tokenized Parquet (+ manifest) with Ray Data.",
        prog="python -m pipeline",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import ray

    from pipeline import run

    try:
        run(cfg, ray_cfg)  # a user error (source, output, rejects, config) -> run_cli: one line, exit 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
