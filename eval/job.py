"""eval.run: predict with a Ray Data actor pool (or read given predictions), score, aggregate, report.

    read_parquet -> map_batches(Predictor, ActorPoolStrategy) -> map_batches(score_batch) -> materialize
        -> predictions.parquet, block partial sums -> metrics.json, report.md (+ PNGs)

Rows in = rows scored is checked on content (the multiset of (question, answer) pairs), not only on
counts, so a lost batch and a duplicated one cannot cancel out. metrics.json is written last and
atomically: cluster.run treats its presence as "eval done".
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cluster.config import RayConfig, to_dict
from cluster.core import write_json_atomic
from eval.config import EvalConfig
from eval.resolve import EvalError

log = logging.getLogger("mathtune.eval")

PREDICTION_FILE_COLUMNS = ("question", "answer", "regime", "prediction", "em", "f1")
# Also kept in predictions.parquet: useful when reading single failures.
EXTRA_COLUMNS = ("error_class", "tf_em", "gen_tokens", "truncated")


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
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise EvalError(f"output directory {out} is not writable: {e}") from e
    return out


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


def _collect(ds):
    """A materialized dataset -> one Arrow table, in block order (preserve_order keeps input order)."""
    import pyarrow as pa
    import ray

    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _aggregate(ds, teacher_forced: bool) -> dict[str, Any]:
    from eval.aggregate import block_partials, combine

    partials = ds.map_batches(block_partials, batch_size=None, batch_format="numpy").take_all()
    return combine(partials, teacher_forced)


def _finish(cfg: EvalConfig, out: Path, table, metrics: dict[str, Any], train_dir: Path | None) -> dict:
    import pyarrow.parquet as pq

    from eval.report import write_report

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
    return metrics


def _pool_size(cfg: EvalConfig, ray_cfg: RayConfig) -> tuple[int, float, float, int]:
    """(actors, cpus per actor, gpus per actor, torch threads), checked against the cluster.

    An autoscaling cluster may start with no GPU node: with gpus_per_actor set, require_resources waits
    up to ray.resource_timeout_s for the nodes, then fails clearly instead of waiting forever.
    """
    import ray

    from cluster.connect import ResourceError, require_resources

    total = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
    actors = cfg.num_actors or (max(1, int(total.get("GPU", 0) // gpus)) if gpus else 1)
    cpus = cfg.cpus_per_actor
    require_resources(
        f"eval ({actors} actor(s) x {cpus:g} CPU, {gpus:g} GPU)", cpus=actors * cpus, gpus=actors * gpus,
        per_bundle={"CPU": cpus, "GPU": gpus}, bundles=actors, timeout_s=ray_cfg.resource_timeout_s,
    )
    total = ray.cluster_resources()
    # The read tasks need a CPU slot beside the actors, or the pool waits forever for input.
    if actors * cpus + 1 > total.get("CPU", 0):
        raise ResourceError(
            f"eval's {actors} actor(s) x {cpus:g} CPU leave no CPU for the Parquet read tasks "
            f"(cluster has {total.get('CPU', 0):g} logical CPUs): lower --num-actors / --cpus-per-actor "
            f"(fractions such as 0.5 are fine) or raise ray.num_cpus"
        )
    threads = cfg.torch_threads or max(1, int(cpus))
    return actors, cpus, gpus, threads


def _fault_env() -> dict[str, str]:
    from eval.predict import FAULT_KILL_AT_BATCH, FAULT_MARKER_DIR

    return {k: os.environ[k] for k in (FAULT_KILL_AT_BATCH, FAULT_MARKER_DIR) if k in os.environ}


def evaluate_model(cfg: EvalConfig, ray_cfg: RayConfig) -> dict[str, Any]:
    import pyarrow.dataset as pads
    import ray

    from cluster.connect import init_ray
    from cluster.storage import require_shared_storage
    from eval.predict import Predictor
    from eval.resolve import (
        check_model_loads,
        check_tokenizers_agree,
        inspect_split,
        resolve_model,
        resolve_tokenizer,
    )

    out = _prepare_output(cfg.output)
    model = resolve_model(cfg.model)
    model_info = check_model_loads(model)
    tok_spec = resolve_tokenizer(cfg.tokenizer, model, cfg.data)
    check_tokenizers_agree(tok_spec, cfg.data)
    split = inspect_split(cfg.data, cfg.split, cfg.max_rows)
    if split.max_token_id >= model_info["vocab_size"]:
        raise EvalError(
            f"{split.path} holds token id {split.max_token_id} but {model.spec} has a vocabulary of "
            f"{model_info['vocab_size']}: the data was tokenized for another model"
        )
    max_new_tokens = cfg.max_new_tokens or split.max_label_len + cfg.max_new_tokens_slack
    # The rows we promise to score, as a multiset, from the files themselves (not through Ray).
    cols = ["question", "answer"]
    table = pads.dataset(split.files, format="parquet").to_table(columns=cols)
    if cfg.max_rows:
        table = table.slice(0, cfg.max_rows)
    expected = _row_keys(table["question"].to_pylist(), table["answer"].to_pylist())

    init_ray(ray_cfg)
    actors, cpus, gpus, threads = _pool_size(cfg, ray_cfg)
    # Actors on other nodes read the data and load the model (cluster/storage.py).
    local_model = cfg.model if os.path.isdir(cfg.model) else ""  # a hub id is downloaded on each node
    require_shared_storage({"eval.data": (cfg.data, False), "eval.model": (local_model, False)},
                           ray_cfg, {"CPU": cpus, "GPU": gpus}, actors)
    log.info(
        "eval: %s on %d rows of %s, %d actor(s) x (%g CPU, %g GPU), batch %d, max_new_tokens %d",
        model.spec, split.rows, split.path, actors, cpus, gpus, cfg.batch_size, max_new_tokens,
    )
    # At least ~8 blocks, so several actors share the work and reads overlap generation. Derived from
    # the config and row count only, never from the actor count: the same rows then share a generate()
    # batch whatever the pool size, and 1 or N actors give identical predictions.
    window = min(cfg.sort_window, max(cfg.batch_size, -(-split.rows // 8)))
    read_cols = [*cols, "input_ids", "labels"] + (["regime"] if split.has_regime else [])
    t0 = time.perf_counter()
    with _data_context(preserve_order=True):
        ds = ray.data.read_parquet(split.files, columns=read_cols)
        if cfg.max_rows:
            ds = ds.limit(cfg.max_rows)
        # A test split is often one file = one block = one actor task: cut it into blocks of `window` rows
        # so every actor of the pool gets work (a streaming split, no shuffle).
        ds = ds.repartition(target_num_rows_per_block=window)
        remote_args: dict[str, Any] = {
            "max_restarts": cfg.max_actor_restarts,
            "max_task_retries": cfg.max_actor_restarts,
        }
        if _fault_env():
            remote_args["runtime_env"] = {"env_vars": _fault_env()}
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
            },
            batch_size=window,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
            **remote_args,
        )
        ds = ds.materialize()
        wall = time.perf_counter() - t0
        scored = _collect(ds)
        rows = check_rows(expected, scored)
        metrics = _aggregate(ds, cfg.teacher_forced)
    metrics.update(
        rows,
        model=model.spec,
        model_type=model_info["model_type"],
        tokenizer=tok_spec,
        data=cfg.data,
        split=cfg.split,
        max_new_tokens=max_new_tokens,
        num_actors=actors,
        cpus_per_actor=cpus,
        gpus_per_actor=gpus,
        wall_s=wall,
        examples_per_s=rows["rows_scored"] / wall if wall > 0 else None,
        config=to_dict(cfg),
    )
    return _finish(cfg, out, scored, metrics, model.train_dir)


def score_predictions(cfg: EvalConfig, ray_cfg: RayConfig) -> dict[str, Any]:
    """`--predictions FILE`: the same scoring and aggregation over predictions made elsewhere."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cluster.connect import init_ray
    from eval.aggregate import score_batch

    out = _prepare_output(cfg.output)
    path = Path(cfg.predictions)
    if not path.is_file():
        raise EvalError(f"predictions file not found: {path}")
    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=[c for c in ("question", "answer") if c in schema.names])
    except (pa.ArrowInvalid, OSError) as e:
        raise EvalError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in ("answer", "prediction") if c not in schema.names]
    if missing:
        raise EvalError(f"{path}: missing column(s) {missing}; has {schema.names}. Needs answer and prediction.")
    for c in ("answer", "prediction"):
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise EvalError(f"{path}: column {c} must be a string column, got {t}")
    questions = table["question"].to_pylist() if "question" in schema.names else [""] * table.num_rows
    expected = _row_keys(questions, table["answer"].to_pylist())

    def fill(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["answer"])
        batch.setdefault("question", np.full(n, "", dtype=object))
        batch.setdefault("regime", np.full(n, "all", dtype=object))
        # Missing predictions (nulls) score as empty answers, never as a crash.
        batch["prediction"] = np.array(["" if p is None else p for p in batch["prediction"]], dtype=object)
        batch["answer"] = np.array(["" if a is None else a for a in batch["answer"]], dtype=object)
        return batch

    init_ray(ray_cfg)
    keep = [c for c in ("question", "answer", "regime", "prediction") if c in schema.names]
    t0 = time.perf_counter()
    with _data_context(preserve_order=True):
        ds = ray.data.read_parquet(str(path), columns=keep)
        ds = ds.map_batches(fill, batch_format="numpy").map_batches(score_batch, batch_format="numpy")
        ds = ds.materialize()
        wall = time.perf_counter() - t0
        scored = _collect(ds)
        rows = check_rows(expected, scored)
        metrics = _aggregate(ds, teacher_forced=False)
    metrics.update(rows, model=None, predictions=str(path), data=None, split=None, wall_s=wall,
                   config=to_dict(cfg))
    return _finish(cfg, out, scored, metrics, None)


def run(cfg: EvalConfig, ray_cfg: RayConfig | None = None) -> dict[str, Any]:
    """The stage API (cluster.run calls it with Ray up; it never shuts Ray down)."""
    ray_cfg = ray_cfg or RayConfig()
    if cfg.predictions:
        return score_predictions(cfg, ray_cfg)
    return evaluate_model(cfg, ray_cfg)
