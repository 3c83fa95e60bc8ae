"""python -m eval --model MODEL --data DIR --output DIR [--split test] | --predictions FILE --output DIR
   python -m eval --model MODEL --ask "QUESTION" | --ask - (one question per line on stdin)"""

from __future__ import annotations

import logging
import sys

from cluster.config import run_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--ask" or a.startswith("--ask=") for a in argv):
        from eval.ask import main as ask

        return ask(argv)

    from cluster.config import parse_stage_args
    from eval.config import EvalConfig

    cfg, ray_cfg, _ = parse_stage_args(
        EvalConfig, "eval", argv,
        description="Evaluate a seq2seq model on a pipeline split with Ray Data (exact match, F1, per module "
        "and regime, report), or score an existing predictions file. "
        'To ask a model questions: python -m eval --model DIR --ask "QUESTION" (or --ask - for stdin).',
        prog="python -m eval",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from eval.job import run

    if cfg.predictions:  # scored in-process: no Ray
        run(cfg, ray_cfg)
        return 0
    import ray

    ray_was_up = ray.is_initialized()  # only shut down a Ray this command started
    try:
        run(cfg, ray_cfg)  # a user error (model, data, output, resources) -> run_cli: one line, exit 2
    finally:
        if ray.is_initialized() and not ray_was_up:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    run_cli(main)
