"""One end-to-end job: pipeline -> eval (before) -> train -> eval (after), from one config.

    python -m cluster.run --config configs/demo.yaml                 # `make demo`
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python -m cluster.run --config configs/flan-t5-large.yaml     # `make submit`

Every stage's output lands under one run directory (`run.output_dir`, default `outputs/<config name>`).
A stage whose output is already complete and valid is skipped, so re-running the same command after a
crash resumes instead of redoing: the pipeline by its manifest, training by Ray Train's own checkpoints
(same run name and storage path), eval by its metrics file.

Every field of every section is a flag: `--<section>.<field> VALUE` (`--train.max-steps 20`,
`--pipeline.source DIR`, `--eval.max-rows 100`, `--ray.num-cpus 8`); flags win over the file. The paths
the job wires between stages (pipeline.output, train.data/output, eval.model/data/output) are set by the
job under run.output_dir and refused as flags. Everything checkable is checked before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from cluster.config import (
    DEBUG_HELP,
    ArgParser,
    ConfigError,
    RayConfig,
    add_dataclass_args,
    from_dict,
    read_yaml,
    run_cli,
    set_error_log_dir,
)
from cluster.core import ResourceError, append_jsonl, read_json, read_jsonl, write_json_atomic

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
    push_to_hub: str | None = None
    """After the final eval, upload <output_dir>/train/final (model, tokenizer, model card) to this hub
    model repo, e.g. user/math-t5 (private). Token from $HF_TOKEN only; refused before any work without."""


SECTIONS = ("run", "ray", "pipeline", "train", "eval")
# Paths the job sets between stages (every output under run.output_dir): not the user's to set here.
JOB_SET = {"pipeline": ("output",), "train": ("data", "output"), "eval": ("model", "data", "output")}


def section_classes() -> dict[str, type]:
    from eval.config import EvalConfig
    from pipeline.config import PipelineConfig
    from train.config import TrainConfig

    return {"run": RunConfig, "ray": RayConfig, "pipeline": PipelineConfig, "train": TrainConfig,
            "eval": EvalConfig}


@dataclasses.dataclass
class Job:
    run: RunConfig
    ray: RayConfig
    pipeline: Any
    train: Any
    eval_before: Any
    eval_after: Any
    root: Path


def build_job(config_path: str, overrides: dict[str, dict[str, Any]] | None = None) -> Job:
    """Validate every section up front, so a typo in `eval:` fails before an hour of training.

    `overrides`: {section: {field: value}} from the command line; they win over the file."""
    from eval.config import EvalConfig
    from pipeline.config import PipelineConfig
    from train.config import TrainConfig

    overrides = overrides or {}
    if set(overrides) - set(SECTIONS):
        raise ValueError(f"overrides are keyed by section ({', '.join(SECTIONS)}), got {sorted(overrides)}")
    data = read_yaml(config_path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{config_path}: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    for section, fields in JOB_SET.items():
        for f in fields:
            if f in overrides.get(section, {}):
                raise ConfigError(f"--{section}.{f.replace('_', '-')} is set by the job (every output lives under "
                                  "run.output_dir); choose the run's folder with --run.output-dir")

    def vals(section: str) -> dict[str, Any]:
        v = data.get(section) or {}
        if not isinstance(v, dict):
            raise ConfigError(f"section '{section}' must be a mapping, got {type(v).__name__}")
        return {**v, **overrides.get(section, {})}

    run = from_dict(RunConfig, vals("run"), "run")
    root = Path(run.output_dir or Path("outputs") / Path(config_path).stem)
    ray_cfg = from_dict(RayConfig, vals("ray"), "ray")

    pipe = from_dict(PipelineConfig, {**vals("pipeline"), "output": str(root / "data")}, "pipeline")
    train_vals = {**vals("train"), "data": str(root / "data"), "output": str(root / "train")}
    train = from_dict(TrainConfig, train_vals, "train")
    eval_vals = vals("eval")
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
    return Job(run, ray_cfg, pipe, train, before, after, root)


def _local_ray(ray_cfg: RayConfig) -> bool:
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    return not address or address == "local"


def preflight(job: Job) -> None:
    """Every check that needs no Ray, for every stage, before the first one starts (and with it Ray):
    the outputs are writable, the model and tokenizers resolve, a push has its token, and a local Ray
    can hold what training and eval ask for. The pipeline's own checks (source, tokenizer, output) run
    first thing in its stage, also before Ray starts."""
    from cluster.connect import local_num_cpus
    from cluster.core import check_model_dir, check_push, check_writable, is_local_spec, load_tokenizer
    from train.model import TINY_CONFIGS

    check_push(job.run.push_to_hub)
    check_writable(job.root, "run.output_dir")
    t = job.train
    if t.model not in TINY_CONFIGS and is_local_spec(t.model):
        check_model_dir(t.model)
    for spec in {t.tokenizer, job.eval_after.tokenizer} - {None}:
        load_tokenizer(spec)
    check_writable(t.output, "train.output")
    check_writable(t.resolved_storage_path(), "train.storage_path")
    for e in (job.eval_before, job.eval_after) if job.run.eval_before else (job.eval_after,):
        check_writable(e.output, "eval output")
    if not _local_ray(job.ray):
        return  # a cluster's resources are checked when connected (train: require_resources)
    cpus = job.ray.num_cpus or local_num_cpus()
    need = t.num_workers * t.cpus_per_worker
    if need > cpus:
        raise ResourceError(f"training needs {t.num_workers} workers x {t.cpus_per_worker:g} CPUs = {need:g} CPUs, "
                            f"but the local Ray has {cpus}; lower --train.num-workers / --train.cpus-per-worker "
                            "or raise --ray.num-cpus")
    e = job.eval_after
    actors = e.num_actors or 1  # eval's default without GPUs
    if actors * e.cpus_per_actor > cpus:  # the rule eval applies once Ray is up (eval/job.py: _pool)
        raise ResourceError(f"eval needs {actors} actor(s) x {e.cpus_per_actor:g} CPUs, "
                            f"but the local Ray has {cpus}; lower --eval.num-actors / --eval.cpus-per-actor "
                            "or raise --ray.num-cpus")
    gpus_wanted = t.num_workers if t.use_gpu else 0
    if gpus_wanted or (e.gpus_per_actor or 0) > 0:
        gpus = job.ray.num_gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if gpus < gpus_wanted or (gpus == 0 and (e.gpus_per_actor or 0) > 0):
            raise ResourceError(f"--train.use-gpu / eval.gpus_per_actor ask for GPUs ({gpus_wanted} for training) "
                                f"but this machine has {gpus}; drop them or run on a GPU node")


def pipeline_done(job: Job) -> bool:
    """Complete and made from the same pipeline config (a changed row count or tokenizer redoes it)."""
    from cluster.config import to_dict

    m = read_json(Path(job.pipeline.output) / "manifest.json")
    return bool(m and m.get("complete") and m.get("config") == json.loads(json.dumps(to_dict(job.pipeline))))


def train_done(job: Job) -> bool:
    """Finished for this model and step budget. A larger max_steps re-enters training, which resumes from
    the run's latest checkpoint (same run_name + storage_path) rather than starting over."""
    s = read_json(Path(job.train.output) / "summary.json")
    if not s or not (Path(job.train.output) / "final" / "config.json").is_file():
        return False
    same_budget = job.train.max_steps is None or s.get("max_steps") == job.train.max_steps
    return s.get("model") == job.train.model and same_budget and s.get("steps") == s.get("max_steps")


def eval_done(cfg) -> bool:
    return (Path(cfg.output) / "metrics.json").is_file()


def base_model(job: Job):
    """The eval-before config: a checkpoint (hub id / path) is scored as is; a from-scratch tiny model is
    built with the run's seed and saved like any model dir, so eval has one code path."""
    from train.model import TINY_CONFIGS

    spec = job.train.model
    if spec not in TINY_CONFIGS:
        return dataclasses.replace(job.eval_before, model=spec)
    import torch

    from cluster.core import load_tokenizer
    from train.model import build_model, save_model

    dest = Path(job.eval_before.model)
    tok = load_tokenizer(job.train.tokenizer or str(Path(job.pipeline.output) / "tokenizer"))
    torch.manual_seed(job.train.seed)
    model = build_model(spec, len(tok), tok.pad_token_id, tok.eos_token_id)
    save_model(model, dest)
    tok.save_pretrained(dest)
    return job.eval_before


def run(job: Job) -> dict[str, Any]:
    import eval as eval_stage
    import pipeline as pipeline_stage
    import train as train_stage

    # No init_ray here: each stage checks its own inputs first and starts (or reuses) Ray itself, so a bad
    # source fails before Ray starts; preflight has already checked what later stages need.
    preflight(job)
    force = job.run.force
    timings: dict[str, float] = {}

    def stage(name: str, done: bool, fn, outputs: str):
        if done and not force:
            print(f"[run] {name}: already complete, skipped ({outputs})", flush=True)
            return None
        print(f"[run] {name}: starting", flush=True)
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        log_stage(job.root, name, timings[name])
        print(f"[run] {name}: done in {timings[name]:.1f}s -> {outputs}", flush=True)
        return out

    stage("pipeline", pipeline_done(job), lambda: pipeline_stage.run(job.pipeline, job.ray), job.pipeline.output)
    if job.run.eval_before:
        # The untrained model, saved like any other model dir, so eval has one code path.
        stage("eval-before", eval_done(job.eval_before), lambda: eval_stage.run(base_model(job), job.ray),
              job.eval_before.output)
    trained = stage("train", train_done(job), lambda: train_stage.run(job.train, job.ray),
                    str(Path(job.train.output) / "final")) is not None
    # A model trained (or trained further) in this invocation makes any earlier eval-after stale.
    stage("eval-after", eval_done(job.eval_after) and not trained, lambda: eval_stage.run(job.eval_after, job.ray),
          job.eval_after.output)
    before, after = eval_metrics(job)
    if "eval-after" in timings:  # scored in this invocation: put the test metrics beside training's curves
        track_eval_metrics(job, before, after)
    card = write_model_card(job, before, after)
    summary = collect_summary(job, before, after)
    summary["outputs"]["model_card"] = str(card)
    write_json_atomic(job.root / "run_summary.json", summary)
    print(format_summary(summary), flush=True)
    if job.run.push_to_hub:
        from cluster.card import push_model

        push_model(Path(job.train.output) / "final", job.run.push_to_hub)
    return summary


def log_stage(root: Path, name: str, seconds: float) -> None:
    """<run>/logs/stages.jsonl: one line per stage finished, whichever invocation ran it (a rerun after a
    crash skips the stages done before, and run_summary.json still says how long each took)."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    append_jsonl(root / "logs" / "stages.jsonl", {"stage": name, "seconds": round(seconds, 1),
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def stage_seconds(root: Path) -> dict[str, float]:
    """Each stage's seconds from its latest run (stages.jsonl: later lines win), in the job's stage order."""
    seconds: dict[str, float] = {}
    for rec in read_jsonl(root / "logs" / "stages.jsonl"):
        seconds[rec["stage"]] = rec["seconds"]
    return seconds


def eval_metrics(job: Job) -> tuple[dict | None, dict | None]:
    """eval-before's and eval-after's metrics.json (None where not run or not there), read once per run."""
    before = read_json(Path(job.eval_before.output) / "metrics.json") if job.run.eval_before else None
    return before, read_json(Path(job.eval_after.output) / "metrics.json")


def track_eval_metrics(job: Job, before: dict | None, after: dict | None) -> None:
    """The test-set metrics of eval-before (at step 0) and eval-after (at the final step) into the training
    run's trackers (TensorBoard under <train>/tensorboard, MLflow when configured), overall and per regime."""
    from train.tracking import make_tracker

    final_step = (read_json(Path(job.train.output) / "summary.json") or {}).get("steps", 0)
    tracker = make_tracker(job.train, rank=0)
    try:
        for name, m, step in (("eval_before", before, 0), ("eval_after", after, final_step)):
            if not m:
                continue
            values = {f"{name}/exact_match": m["exact_match"], f"{name}/f1": m["f1"]}
            for regime, r in (m.get("by_regime") or {}).items():
                values[f"{name}/exact_match/{regime}"] = r["exact_match"]
            tracker.log_metrics(values, step)
    finally:
        tracker.close()


def write_model_card(job: Job, before: dict | None, after: dict | None) -> Path:
    """<train>/final/README.md with the before/after test metrics of this run (when measured)."""
    from cluster.card import write_card
    from cluster.config import to_dict

    return write_card(Path(job.train.output) / "final", to_dict(job.train), before, after, name=job.root.name)


def collect_summary(job: Job, before: dict | None, after: dict | None) -> dict[str, Any]:
    manifest = read_json(Path(job.pipeline.output) / "manifest.json") or {}
    train = read_json(Path(job.train.output) / "summary.json") or {}
    return {
        "root": str(job.root),
        "stage_seconds": stage_seconds(job.root),
        "rows": {k: manifest.get(k) for k in ("rows_in", "rows_kept", "rows_rejected")},
        "train": {k: train.get(k) for k in ("steps", "samples", "wall_time_s", "samples_per_s")},
        "eval_before": before,
        "eval_after": after or {},
        "outputs": {
            "logs": str(job.root / "logs"),
            "data": job.pipeline.output,
            "model": str(Path(job.train.output) / "final"),
            "train_summary": str(Path(job.train.output) / "summary.json"),
            "eval_before": job.eval_before.output if job.run.eval_before else None,
            "eval_after": job.eval_after.output,
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


def build_parser() -> ArgParser:
    parser = ArgParser(
        prog="python -m cluster.run", description=__doc__.split("\n")[0],
        usage="python -m cluster.run --config FILE [--<section>.<field> VALUE ...] [--push-to-hub REPO] [--debug]",
        epilog="Every field of every section is a flag --<section>.<field> (dashes or underscores); flags win "
        "over the file. Set by the job, not flags: pipeline.output, train.data, train.output, eval.model, "
        "eval.data, eval.output (all under run.output_dir).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="YAML with sections run, ray, pipeline, train, eval")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for section, cls in section_classes().items():
        add_dataclass_args(parser, cls, f"{section} options (override the '{section}:' section)", prefix=section,
                           hidden=JOB_SET.get(section, ()), aliases=section == "run")  # --force, --push-to-hub
    return parser


def parse_overrides(args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"train.max_steps": "20", ...} -> {"train": {"max_steps": "20"}} (typed later by from_dict)."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in args.items():
        if "." in key:
            section, field = key.split(".", 1)
            out.setdefault(section, {})[field] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    overrides = parse_overrides(args)
    # Until the job is built (it may be the error), tracebacks go where its root will most likely be.
    set_error_log_dir(Path(overrides.get("run", {}).get("output_dir") or Path("outputs") / Path(config).stem) / "logs")
    job = build_job(config, overrides)
    set_error_log_dir(job.root / "logs")  # tracebacks of any later error: <run>/logs/error-*.log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    run(job)
    return 0


if __name__ == "__main__":
    run_cli(main)
