"""python -m train --config FILE --data DIR --output DIR [--<field> VALUE ...] [--push-to-hub USER/NAME]
python -m train plan --config FILE [--<field> VALUE ...]    # memory planner, loads no weights
python -m train export CHECKPOINT_DIR DEST                  # a kept checkpoint as a from_pretrained folder"""

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
    if argv[:1] == ["export"]:
        if len(argv) != 3:
            raise SystemExit("usage: python -m train export CHECKPOINT_DIR DEST")
        from train.checkpoint import export_model_dir

        print(export_model_dir(argv[1], argv[2]))  # a bad checkpoint: CheckpointError -> run_cli: one line
        return 0
    # --push-to-hub is a command option, not a train: field: what to do with the result, not how to train.
    cfg, ray_cfg, args = parse_stage_args(
        TrainConfig, "train", argv,
        "Finetune a T5-family model on the pipeline's Parquet output with Ray Train. Re-running the same "
        "command (same run_name and storage_path) resumes from the latest checkpoint.",
        "python -m train",
        extra=lambda p: p.add_argument(
            "--push-to-hub", metavar="USER/NAME", default=None,
            help="after training, upload <output>/final with its model card to this (private) hub model repo; "
            "token from $HF_TOKEN only, refused before any work without one"),
    )
    push_to = args.push_to_hub
    from cluster.card import push_model, write_card
    from cluster.config import to_dict
    from cluster.core import check_push
    from train.trainer import run

    check_push(push_to)  # before any work: no token, no training
    summary = run(cfg, ray_cfg)  # a user error (data, model, checkpoints, resources) -> run_cli: one line, exit 2
    card = write_card(summary["final_dir"], to_dict(cfg))
    print(f"model card: {card}")
    if push_to:
        push_model(summary["final_dir"], push_to)
    print(json.dumps({k: summary[k] for k in ("steps", "samples", "wall_time_s", "samples_per_s", "best")}))
    return 0


if __name__ == "__main__":
    run_cli(main)
