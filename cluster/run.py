"""One end-to-end job: pipeline -> eval (before) -> train -> eval (after), from one config.

    python -m cluster.run --config configs/demo.yaml                 # `make demo`
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python -m cluster.run --config configs/flan-t5-large.yaml     # `make submit`

Every stage's output lands under one run directory (`run.output_dir`, default `outputs/<config name>`).
A stage whose output is already complete and valid is skipped, so re-running the same command after a
crash resumes instead of redoing: the pipeline by its manifest, training by Ray Train's own checkpoints
(same run name and storage path), eval by its metrics file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, RayConfig, add_dataclass_args, from_dict, read_yaml, run_cli

log = logging.getLogger("mathtune.run")


@dataclasses.dataclass
class RunConfig:
    output_dir: str | None = None
    """Root of every output of this run (data/, train/, eval-before/, eval-after/). Default
    outputs/<config file stem>. On a multi-node cluster use shared storage (NFS/EFS/Filestore) or
    set train.storage_path to s3:// / gs:// for checkpoints."""
    eval_before: bool = True
    """Evaluate the untrained model first (the seed's benchmarking step), for a before/after table."""
    force: bool = False
    """Redo every stage even when its output is already complete."""


@dataclasses.dataclass
class Plan:
    run: RunConfig
    ray: RayConfig
    pipeline: Any
    train: Any
    eval_before: Any
    eval_after: Any
    root: Path


def build_plan(config_path: str, overrides: dict[str, Any]) -> Plan:
    """Validate every section up front, so a typo in `eval:` fails before an hour of training."""
    from eval.config import EvalConfig
    from pipeline.config import PipelineConfig
    from train.config import TrainConfig

    data = read_yaml(config_path)
    unknown = sorted(set(data) - {"run", "ray", "pipeline", "train", "eval"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown section(s) {unknown}; known: run, ray, pipeline, train, eval")
    run_vals = {**(data.get("run") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    run = from_dict(RunConfig, run_vals, "run")
    root = Path(run.output_dir or Path("outputs") / Path(config_path).stem)
    ray_cfg = from_dict(RayConfig, dict(data.get("ray") or {}), "ray")

    pipe = from_dict(PipelineConfig, {**(data.get("pipeline") or {}), "output": str(root / "data")}, "pipeline")
    train_vals = {**(data.get("train") or {}), "data": str(root / "data"), "output": str(root / "train")}
    train = from_dict(TrainConfig, train_vals, "train")
    eval_vals = dict(data.get("eval") or {})
    eval_vals.pop("model", None)
    before = from_dict(
        EvalConfig,
        {**eval_vals, "model": str(root / "base_model"), "data": str(root / "data"), "output": str(root / "eval-before")},
        "eval",
    )
    after = from_dict(
        EvalConfig,
        {**eval_vals, "model": str(root / "train" / "final"), "data": str(root / "data"),
         "output": str(root / "eval-after")},
        "eval",
    )
    return Plan(run, ray_cfg, pipe, train, before, after, root)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pipeline_done(plan: Plan) -> bool:
    """Complete and made from the same pipeline config (a changed row count or tokenizer redoes it)."""
    from cluster.config import to_dict

    m = _read_json(Path(plan.pipeline.output) / "manifest.json")
    return bool(m and m.get("complete") and m.get("config") == json.loads(json.dumps(to_dict(plan.pipeline))))


def train_done(plan: Plan) -> bool:
    """Finished for this model and step budget. A larger max_steps re-enters training, which resumes from
    the run's latest checkpoint (same run_name + storage_path) rather than starting over."""
    s = _read_json(Path(plan.train.output) / "summary.json")
    if not s or not (Path(plan.train.output) / "final" / "config.json").is_file():
        return False
    same_budget = plan.train.max_steps is None or s.get("max_steps") == plan.train.max_steps
    return s.get("model") == plan.train.model and same_budget and s.get("steps") == s.get("max_steps")


def eval_done(cfg) -> bool:
    return (Path(cfg.output) / "metrics.json").is_file()


def base_model(plan: Plan):
    """The eval-before config: a checkpoint (hub id / path) is scored as is; a from-scratch tiny model is
    built with the run's seed and saved like any model dir, so eval has one code path."""
    from train.model import TINY_CONFIGS

    spec = plan.train.model
    if spec not in TINY_CONFIGS:
        return dataclasses.replace(plan.eval_before, model=spec)
    import torch
    from transformers import AutoTokenizer

    from train.model import build_model

    dest = Path(plan.eval_before.model)
    tok = AutoTokenizer.from_pretrained(plan.train.tokenizer or str(Path(plan.pipeline.output) / "tokenizer"))
    torch.manual_seed(plan.train.seed)
    model = build_model(spec, len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return plan.eval_before


def run(plan: Plan) -> dict[str, Any]:
    import eval as eval_stage
    import pipeline as pipeline_stage
    import train as train_stage
    from cluster.connect import init_ray

    init_ray(plan.ray)
    force = plan.run.force
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn):
        if done and not force:
            print(f"[run] {name}: already complete, skipped", flush=True)
            return None
        print(f"[run] {name}: starting", flush=True)
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        print(f"[run] {name}: done in {timings[name]:.1f}s", flush=True)
        return out

    stage("pipeline", pipeline_done(plan), lambda: pipeline_stage.run(plan.pipeline, plan.ray))
    if plan.run.eval_before:
        # The untrained model, saved like any other model dir, so eval has one code path.
        stage(
            "eval-before",
            eval_done(plan.eval_before),
            lambda: eval_stage.run(base_model(plan), plan.ray),
        )
    trained = stage("train", train_done(plan), lambda: train_stage.run(plan.train, plan.ray)) is not None
    # A model trained (or trained further) in this invocation makes any earlier eval-after stale.
    stage("eval-after", eval_done(plan.eval_after) and not trained, lambda: eval_stage.run(plan.eval_after, plan.ray))
    summary = collect_summary(plan, timings)
    (plan.root / "run_summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return summary


def collect_summary(plan: Plan, timings: dict[str, float]) -> dict[str, Any]:
    manifest = _read_json(Path(plan.pipeline.output) / "manifest.json") or {}
    train = _read_json(Path(plan.train.output) / "summary.json") or {}
    before = _read_json(Path(plan.eval_before.output) / "metrics.json") if plan.run.eval_before else None
    after = _read_json(Path(plan.eval_after.output) / "metrics.json") or {}
    return {
        "root": str(plan.root),
        "stage_seconds": timings,
        "rows": {k: manifest.get(k) for k in ("rows_in", "rows_kept", "rows_rejected")},
        "train": {k: train.get(k) for k in ("steps", "samples", "wall_time_s", "samples_per_s")},
        "eval_before": before,
        "eval_after": after,
        "outputs": {
            "data": plan.pipeline.output,
            "model": str(Path(plan.train.output) / "final"),
            "train_summary": str(Path(plan.train.output) / "summary.json"),
            "eval_before": plan.eval_before.output if plan.run.eval_before else None,
            "eval_after": plan.eval_after.output,
        },
    }


def _metric(m: dict | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "-"
    return f"{100 * m[key]:.2f}%"


def format_summary(s: dict[str, Any]) -> str:
    r, t = s["rows"], s["train"]
    sps = t.get("samples_per_s")
    lines = [
        "",
        "== mathtune run ==",
        f"rows           in {r.get('rows_in')}  kept {r.get('rows_kept')}  rejected {r.get('rows_rejected')}",
        f"train          {t.get('steps')} steps, {t.get('samples')} samples in {t.get('wall_time_s') or 0:.0f}s"
        f" ({sps or 0:.0f} samples/s)",
        f"{'':14} {'exact match':>12} {'F1':>8}",
        f"{'before':14} {_metric(s['eval_before'], 'exact_match'):>12} {_metric(s['eval_before'], 'f1'):>8}",
        f"{'after':14} {_metric(s['eval_after'], 'exact_match'):>12} {_metric(s['eval_after'], 'f1'):>8}",
        "outputs:",
        *(f"  {k:13} {v}" for k, v in s["outputs"].items() if v),
        f"  {'summary':13} {s['root']}/run_summary.json",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster.run", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML with sections run, ray, pipeline, train, eval")
    add_dataclass_args(parser, RunConfig, "run options (override the 'run:' section)")
    args = vars(parser.parse_args(argv))
    plan = build_plan(args.pop("config"), args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    run(plan)
    return 0


if __name__ == "__main__":
    run_cli(main)
