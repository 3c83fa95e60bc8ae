"""python -m train --config FILE --data DIR --output DIR [--<field> VALUE ...]
python -m train plan --config FILE [--<field> VALUE ...]    # memory planner, loads no weights"""

from __future__ import annotations

import json
import logging
import sys

from cluster.config import parse_stage_args, run_cli
from train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["plan"]:
        from train import plan

        cfg, _, _ = parse_stage_args(TrainConfig, "train", argv[1:], plan.__doc__ or "", "python -m train plan")
        print(plan.format_plan(plan.estimate(cfg)))
        return 0
    cfg, ray_cfg, _ = parse_stage_args(
        TrainConfig, "train", argv,
        "Finetune a T5-family model on the pipeline's Parquet output with Ray Train. Re-running the same "
        "command (same run_name and storage_path) resumes from the latest checkpoint.",
        "python -m train",
    )
    from cluster.connect import ResourceError
    from train.checkpoint import CheckpointError
    from train.model import ModelError
    from train.trainer import DataError, run

    try:
        summary = run(cfg, ray_cfg)
    except (DataError, ModelError, CheckpointError, ResourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("steps", "samples", "wall_time_s", "samples_per_s", "best")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
