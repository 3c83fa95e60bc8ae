"""eval.run: read the split once, predict and score in a Ray Data actor pool, aggregate once, report.

    driver: read the split (Parquet, once) -> checks -> blocks of `window` rows
        -> from_arrow -> map_batches(Predictor: generate + score, ActorPoolStrategy) -> scored rows
    driver: row accounting -> metrics.aggregate -> predictions.parquet, report.md (+ PNGs), metrics.json

Rows in = rows scored is checked on content (the multiset of (question, answer) pairs), not only on
counts, so a lost batch and a duplicated one cannot cancel out. metrics.json is written last and
atomically: cluster.run treats its presence as "eval done". `--predictions FILE` is scored in-process:
scoring costs microseconds a row, less than starting Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cluster.config import RayConfig
from cluster.core import DataError, check_writable, write_json_atomic
from eval.config import EvalConfig
from eval.metrics import aggregate
from eval.resolve import EvalError

log = logging.getLogger("mathtune.eval")

PREDICTION_FILE_COLUMNS = ("question", "answer", "regime", "module", "prediction", "em", "f1")
# Also kept in predictions.parquet: useful when reading single failures.
EXTRA_COLUMNS = ("error_class", "prediction_norm", "answer_norm", "tf_em", "gen_tokens", "truncated")


@contextlib.contextmanager
def _data_context(preserve_order: bool):
    """Ray Data's context is process-global and cluster.run runs other stages after us: restore it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = preserve_order
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order = old


def _prepare_output(path: str) -> Path:
    return Path(check_writable(path, "eval output directory"))


def _row_keys(questions, answers) -> Counter:
    def text(x: Any) -> str:
        return "" if x is None else str(x)

    return Counter(zip(map(text, questions), map(text, answers), strict=True))


def check_rows(expected: Counter, table) -> dict[str, int]:
    """Compare the scored rows with the input rows as multisets; raise if any row is lost or doubled."""
    got = _row_keys(table["question"].to_pylist(), table["answer"].to_pylist())
    missing = sum((expected - got).values())
    duplicated = sum((got - expected).values())
    counts = {"rows_in": sum(expected.values()), "rows_scored": table.num_rows, "missing": missing,
              "duplicated": duplicated}
    if missing or duplicated or counts["rows_in"] != counts["rows_scored"]:
        raise EvalError(f"row accounting failed: {counts} (every input row must get exactly one prediction)")
    return counts


def _aggregate(table, teacher_forced: bool, collapse_share: float) -> dict[str, Any]:
    from eval.metrics import SCORE_COLUMNS

    names = [*SCORE_COLUMNS, "regime", "module", "tf_em", "truncated"]
    cols = {c: table[c].to_pylist() for c in names if c in table.column_names}
    return aggregate(cols, teacher_forced=teacher_forced, collapse_share=collapse_share)


def _finish(cfg: EvalConfig, out: Path, table, metrics: dict[str, Any], train_dir: Path | None) -> dict:
    import pyarrow.parquet as pq

    from eval.report import warning_lines, write_report

    cols = [c for c in (*PREDICTION_FILE_COLUMNS, *EXTRA_COLUMNS) if c in table.column_names]
    tmp = out / "predictions.parquet.tmp"
    pq.write_table(table.select(cols), tmp)
    os.replace(tmp, out / "predictions.parquet")
    write_report(metrics, out, train_dir)
    write_json_atomic(out / "metrics.json", metrics)
    tf = metrics.get("teacher_forced_exact_match")
    print(
        f"[eval] {metrics['rows_scored']}/{metrics['rows_in']} rows scored: exact match "
        f"{100 * metrics['exact_match']:.2f}%, F1 {100 * metrics['f1']:.2f}% (micro "
        f"{100 * metrics['f1_micro']:.2f}%)"
        + (f", teacher-forced EM {100 * tf:.2f}%" if tf is not None else "")
        + (f", {metrics['examples_per_s']:.1f} examples/s" if metrics.get("examples_per_s") else "")
        + f" -> {out}",
        flush=True,
    )
    if len(metrics["by_module"]) > 1:
        for m, v in metrics["by_module"].items():
            print(f"[eval]   {m}: exact match {100 * v['exact_match']:.2f}%, F1 {100 * v['f1']:.2f}% "
                  f"(n={v['n']})", flush=True)
    for warning in warning_lines(metrics):
        print(f"[eval] {warning}", flush=True)
    return metrics


def _pool(cfg: EvalConfig, ray_cfg: RayConfig, blocks: int) -> tuple[int, int, float, float, int]:
    """(min actors, max actors, cpus per actor, gpus per actor, torch threads), checked against the cluster.

    num_actors set: a fixed pool of that size. Otherwise an autoscaling pool of 1..max_actors (never more
    than there are blocks): Ray Data adds actors as nodes join, so a cluster scaling up from zero still
    spreads the work. Only the minimum must fit now; with gpus_per_actor set, require_resources waits up
    to ray.resource_timeout_s for a GPU node, then fails clearly instead of waiting forever.
    """
    import ray

    from cluster.connect import require_resources

    total = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
    lo = hi = cfg.num_actors
    if lo is None:
        lo, hi = 1, max(1, min(cfg.max_actors, blocks))
    cpus = cfg.cpus_per_actor
    require_resources(
        f"eval ({lo} actor(s) x {cpus:g} CPU, {gpus:g} GPU)", cpus=lo * cpus, gpus=lo * gpus,
        per_bundle={"CPU": cpus, "GPU": gpus}, bundles=lo, timeout_s=ray_cfg.resource_timeout_s,
    )
    threads = cfg.torch_threads or max(1, int(cpus))
    return lo, hi, cpus, gpus, threads


def evaluate_model(cfg: EvalConfig, ray_cfg: RayConfig) -> dict[str, Any]:
    import pyarrow as pa
    import ray

    from cluster.connect import init_ray, wait_until_free
    from cluster.console import counting
    from cluster.storage import require_shared_storage
    from eval.predict import Predictor, process_age_s
    from eval.resolve import (
        check_model_loads,
        check_tokenizers_agree,
        load_split,
        resolve_model,
        resolve_tokenizer,
    )

    out = _prepare_output(cfg.output)
    model = resolve_model(cfg.model)
    model_info = check_model_loads(model)
    tok_spec = resolve_tokenizer(cfg.tokenizer, model, cfg.data)
    check_tokenizers_agree(tok_spec, cfg.data)
    split = load_split(cfg.data, cfg.split, cfg.max_rows)
    if split.max_token_id >= model_info["vocab_size"]:
        raise DataError(
            f"{split.path} holds token id {split.max_token_id} but {model.spec} has a vocabulary of "
            f"{model_info['vocab_size']}: the data was tokenized for another model"
        )
    # Never decode far past the longest gold answer: a longer prediction is wrong either way, and every
    # extra step costs a decoder pass for the whole batch.
    bound = split.max_label_len + cfg.max_new_tokens_slack
    max_new_tokens = min(cfg.max_new_tokens, bound) if cfg.max_new_tokens else bound
    expected = _row_keys(split.table["question"].to_pylist(), split.table["answer"].to_pylist())
    # Blocks of `window` rows, at least ~8, so several actors share the work. Derived from the config and
    # row count only, never from the actor count: the same rows then share a generate() batch whatever
    # the pool size, and 1 or N actors give identical predictions.
    window = min(cfg.sort_window, max(cfg.batch_size, -(-split.rows // 8)))
    blocks = [split.table.slice(i, window) for i in range(0, split.rows, window)]

    t_ray = time.perf_counter()
    # Only where this call starts Ray (`python -m eval`): inside a job the process also ran earlier stages.
    before_ray = None if ray.is_initialized() else round(process_age_s(), 2)
    init_ray(ray_cfg)
    lo, hi, cpus, gpus, threads = _pool(cfg, ray_cfg, len(blocks))
    ray_start = time.perf_counter() - t_ray
    # Actors on other nodes load the model (cluster/storage.py); the rows travel from the driver.
    local_model = cfg.model if os.path.isdir(cfg.model) else ""  # a hub id is downloaded on each node
    require_shared_storage({"eval.model": (local_model, False)}, ray_cfg, {"CPU": cpus, "GPU": gpus}, hi)
    log.info(
        "eval: %s on %d rows of %s, %s actor(s) x (%g CPU, %g GPU), batch %d, max_new_tokens %d",
        model.spec, split.rows, split.path, lo if lo == hi else f"{lo}-{hi}", cpus, gpus, cfg.batch_size,
        max_new_tokens,
    )
    t0 = time.perf_counter()
    with _data_context(preserve_order=True):
        # The driver already holds the rows: hand them over instead of reading the files again.
        ds = ray.data.from_arrow(blocks)
        # Ray Data restarts a dead actor and retries its batch (its default for actor pools), so a
        # killed actor loses no row and doubles none.
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "model": model.spec,
                "tokenizer": tok_spec,
                "batch_size": cfg.batch_size,
                "max_new_tokens": max_new_tokens,
                "teacher_forced": cfg.teacher_forced,
                "use_gpu": gpus > 0,
                "torch_threads": threads,
                "announce": True,
            },
            batch_size=window,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        # Here, not earlier: from_arrow ran a metadata task per block, whose CPUs come back a moment later
        # (as do training's workers' after fit() returns). Ray Data warns "will hang" if none is free.
        wait_until_free(cpus * lo, gpus * lo)
        with counting("rows", total=split.rows):
            parts = ray.get(ds.to_arrow_refs())  # blocks in input order (preserve_order)
        scored = pa.concat_tables(parts, promote_options="default")
        wall = time.perf_counter() - t0
    rows = check_rows(expected, scored)
    metrics = _aggregate(scored, cfg.teacher_forced, cfg.collapse_share)
    metrics.update(
        rows,
        model=model.spec,
        model_type=model_info["model_type"],
        tokenizer=tok_spec,
        data=cfg.data,
        split=cfg.split,
        max_new_tokens=max_new_tokens,
        num_actors=hi,
        min_actors=lo,
        cpus_per_actor=cpus,
        gpus_per_actor=gpus,
        wall_s=wall,
        examples_per_s=rows["rows_scored"] / wall if wall > 0 else None,
        # Where the time went: from this process's start to starting Ray (`python -m eval`: its imports and
        # checks; None when Ray was already up), connecting to (or starting) Ray, and the Ray Data job
        # (`wall_s`: the actors' start and model load included; each actor logs its own split as "[eval]
        # actor ready ...").
        timing_s={"process_start_to_ray": before_ray, "ray_start": round(ray_start, 2),
                  "ray_data": round(wall, 2)},
        config=dataclasses.asdict(cfg),
    )
    return _finish(cfg, out, scored, metrics, model.train_dir)


def score_predictions(cfg: EvalConfig) -> dict[str, Any]:
    """`--predictions FILE`: the same scoring and aggregation over predictions made elsewhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.predict import score_batch

    out = _prepare_output(cfg.output)
    path = Path(cfg.predictions)
    if not path.is_file():
        raise EvalError(f"predictions file not found: {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise EvalError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in ("answer", "prediction") if c not in schema.names]
    if missing:
        raise EvalError(f"{path}: missing column(s) {missing}; has {schema.names}. Needs answer and prediction.")
    for c in ("answer", "prediction"):
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise EvalError(f"{path}: column {c} must be a string column, got {t}")
    keep = [c for c in ("question", "answer", "regime", "module", "prediction") if c in schema.names]
    try:
        table = pq.read_table(path, columns=keep)
    except (pa.ArrowInvalid, OSError) as e:
        raise EvalError(f"{path}: not a readable Parquet file: {e}") from e
    n = table.num_rows
    t0 = time.perf_counter()
    batch = {c: table[c].to_pylist() for c in keep}
    batch.setdefault("question", [""] * n)
    batch.setdefault("regime", ["all"] * n)
    batch.setdefault("module", ["unknown"] * n)
    # Missing predictions (nulls) score as empty answers, never as a crash.
    for c in ("answer", "prediction"):
        batch[c] = ["" if x is None else x for x in batch[c]]
    scored = pa.table(score_batch(batch))
    rows = check_rows(_row_keys(batch["question"], batch["answer"]), scored)
    metrics = _aggregate(scored, teacher_forced=False, collapse_share=cfg.collapse_share)
    metrics.update(rows, model=None, predictions=str(path), data=None, split=None,
                   wall_s=time.perf_counter() - t0, config=dataclasses.asdict(cfg))
    return _finish(cfg, out, scored, metrics, None)


def run(cfg: EvalConfig, ray_cfg: RayConfig | None = None) -> dict[str, Any]:
    """The stage API (cluster.run calls it with Ray up; it never shuts Ray down)."""
    if cfg.predictions:
        return score_predictions(cfg)
    return evaluate_model(cfg, ray_cfg or RayConfig())
