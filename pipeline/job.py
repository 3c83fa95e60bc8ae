"""The pipeline stage end to end: find the source's read units, read + clean + validate in Ray tasks, tokenize in a
Ray Data actor pool, and stream the ordered result to Parquet on the driver.

    find_units (driver)  ->  read_unit + prepare_text (tasks)  ->  TokenizeBatch (actors)  ->  write (driver)

Why the writes happen on the driver: it sees the rows in a deterministic order (preserve_order), so it
can shuffle train/validation with a seeded bucket shuffle and cut files at fixed row counts
(byte-identical output), count every row once (rows_in = kept + rejected, checked), and keep exact length
histograms for the manifest. Writing Parquet is cheap next to tokenizing (bench/RESULTS.md measures the
driver's ceiling); the heavy per-row work stays in the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cluster.config import RayConfig
from cluster.connect import init_ray
from cluster.core import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    SPLITS,
    ConfigError,
    OutputError,
    RejectError,
    SourceError,
    check_push,
    check_writable,
    find_user_error,
    load_tokenizer,
    push_folder,
    tokenizer_identity,
    write_json_atomic,
)
from cluster.storage import require_shared_storage
from pipeline.config import MAX_VALIDATION_SHARE, PipelineConfig
from pipeline.generate import WORKER_ENV
from pipeline.sources import ReadUnit, find_units, read_unit
from pipeline.tokenize_step import TokenizeBatch
from pipeline.validate import REASONS, prepare_text
from pipeline.write import (
    MAX_SHUFFLE_BUCKETS,
    SHUFFLE_BUCKET_ROWS,
    LengthStats,
    ShuffleWriter,
    SplitWriter,
    content_hash,
)

log = logging.getLogger("mathtune.pipeline")

OUTPUT_PARTS = (*SPLITS, "rejects", "tokenizer", ".shuffle")
MANIFEST_VERSION = 1


def run(cfg: PipelineConfig, ray_cfg: RayConfig | None = None) -> dict:
    """Run the pipeline; returns the manifest (also written to <output>/manifest.json, complete: true)."""
    t0 = time.time()
    # Everything that can be refused is refused before the old output is touched or Ray starts.
    check_push(cfg.push_to_hub)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} has no eos token; T5-style targets need one")
    units, source_info = find_units(cfg)
    fraction = validation_fraction(cfg, units)
    buckets = shuffle_buckets(units)
    out = prepare_output(Path(cfg.output))
    t_plan = time.time()
    init_ray(ray_cfg)
    # Ray Data tasks on other nodes write the shards: the output must be shared storage (cluster/storage.py).
    require_shared_storage({"pipeline.output": (str(out), False)}, ray_cfg, {"CPU": 1})
    t_ray = time.time()
    try:
        with ordered_execution():
            ds = build_dataset(cfg, units, tokenizer, fraction)
            counts, files, stats = write_splits(ds, cfg, out, buckets)
    except Exception as e:  # a reader's SourceError arrives wrapped by Ray: surface the message itself
        raise (find_user_error(e) or e) from e
    if counts["rows_in"] == 0:
        raise SourceError(f"source {cfg.source} has no rows (empty files?); nothing to write")

    t_rows = time.time()
    tokenizer.save_pretrained(out / "tokenizer")
    elapsed = time.time() - t0
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source_info,
        "config": dataclasses.asdict(cfg),
        **counts,
        "validation_fraction": fraction,
        "shuffle": {"order": "seeded uniform random (train, validation); source order (test)",
                    "seed": cfg.seed, "buckets": buckets},
        "token_lengths": stats,
        "tokenizer": tokenizer_identity(tokenizer, cfg.tokenizer),
        "files": {k: [str(p.relative_to(out)) for p in v] for k, v in files.items()},
        "content_sha256": content_hash(out, [str(p.relative_to(out)) for v in files.values() for p in v]),
        "reject_reasons": REASONS,
        "elapsed_s": round(elapsed, 3),
        "timings_s": {"plan": round(t_plan - t0, 3), "ray_init": round(t_ray - t_plan, 3),
                      "read_clean_tokenize_write": round(t_rows - t_ray, 3), "finish": round(elapsed - (t_rows - t0), 3)},
        "rows_per_s": round(counts["rows_in"] / elapsed, 1) if elapsed > 0 else None,
        "complete": True,  # written last: the manifest file appears atomically, only when all is done
    }
    write_json_atomic(out / "manifest.json", manifest)
    kept = counts["rows_kept_by_split"]
    print(f"pipeline: {counts['rows_in']} rows in -> train {kept['train']}, validation {kept['validation']}, "
          f"test {kept['test']}, rejected {counts['rows_rejected']} in {elapsed:.1f}s "
          f"({manifest['rows_per_s']} rows/s) -> {out}", flush=True)
    if cfg.push_to_hub:
        push_folder(out, cfg.push_to_hub, "dataset", "mathtune: pipeline output")
    return manifest


def prepare_output(out: Path) -> Path:
    """Create or reuse the output folder; refuse one that holds something else; fail early if unwritable."""
    if out.is_dir() and any(out.iterdir()) and not any((out / p).exists() for p in (*OUTPUT_PARTS, "manifest.json")):
        raise OutputError(f"output {out} is not empty and is not a pipeline output; refusing to overwrite it. "
                          f"Choose an empty or new folder with --output")
    check_writable(out, "pipeline.output")  # also refuses a file
    # The old manifest goes first: from here until the new one is written, the folder reads as incomplete.
    (out / "manifest.json").unlink(missing_ok=True)
    for part in OUTPUT_PARTS:
        shutil.rmtree(out / part, ignore_errors=True)
    return out.resolve()


def validation_fraction(cfg: PipelineConfig, units: list[ReadUnit]) -> float:
    """validation_size as a fraction of train rows (a count is divided by the source's train rows)."""
    if cfg.validation_size < 1:
        return cfg.validation_size
    train_rows = sum(u.rows or _count_rows(u) for u in units if u.split in ("train", None))
    if train_rows == 0:
        return 0.0
    if cfg.validation_size > MAX_VALIDATION_SHARE * train_rows:
        raise ConfigError(f"pipeline.validation_size={int(cfg.validation_size)} is more than "
                          f"{MAX_VALIDATION_SHARE:.0%} of the source's {train_rows} train rows")
    return cfg.validation_size / train_rows


def _count_rows(unit: ReadUnit) -> int:
    """Rows of a line-based file without parsing it (JSONL: lines; v1.0: line pairs)."""
    from pipeline.sources import resolve_filesystem

    fs, _ = resolve_filesystem(unit.fs_spec)
    lines = 0
    with fs.open_input_stream(unit.path) as f:
        while chunk := f.read(16 << 20):
            lines += chunk.count(b"\n")
    return lines // 2 if unit.kind == "v1txt" else lines


@contextlib.contextmanager
def ordered_execution():
    """Ray Data's preserve_order (deterministic row order -> byte-identical output) for this job only:
    DataContext is process-global, so the caller's setting is restored afterwards."""
    from ray.data import DataContext

    opts = DataContext.get_current().execution_options
    old = opts.preserve_order
    opts.preserve_order = True
    try:
        yield
    finally:
        opts.preserve_order = old


def shuffle_buckets(units: list[ReadUnit]) -> int:
    """Spill buckets of the train/validation shuffle: enough that one bucket (read back whole at close)
    holds about SHUFFLE_BUCKET_ROWS rows (at most MAX_SHUFFLE_BUCKETS). Counted from the read units (files without a cheap row count are
    estimated from their size), so it is part of the config's identity like rows_per_file."""
    rows = 0
    for u in units:
        if u.split == "test":
            continue
        if u.rows:
            rows += u.rows
        else:
            from pipeline.sources import resolve_filesystem

            fs, _ = resolve_filesystem(u.fs_spec)
            rows += fs.get_file_info(u.path).size // 48  # a DeepMind row is > 48 bytes in any text format
    return min(MAX_SHUFFLE_BUCKETS, max(1, math.ceil(rows / SHUFFLE_BUCKET_ROWS)))


def pool_size(configured: int, cpus: int) -> int:
    """Actors of the fused read -> clean -> tokenize pool: all CPUs but the driver's (0 = auto)."""
    workers = configured or max(1, cpus - 1)
    if workers >= cpus > 1:
        raise ConfigError(f"pipeline.tokenize_workers={workers} would hold all {cpus} CPUs of the cluster and "
                          f"leave none for the driver, which writes the output; use at most {cpus - 1}")
    return workers


def build_dataset(cfg: PipelineConfig, units: list[ReadUnit], tokenizer, fraction: float):
    import ray
    from ray.data import ActorPoolStrategy


    def read_and_prepare(batch: dict):
        # One read unit per call (batch_size=1): a generator shard or one file, streamed in batches.
        for i in batch["unit"]:
            for raw in read_unit(units[int(i)], cfg.batch_size):
                yield prepare_text(raw, max_chars=cfg.max_text_chars, answer_pattern=cfg.answer_pattern)

    workers = pool_size(cfg.tokenize_workers, int(ray.cluster_resources().get("CPU", 1)))
    return (
        ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
        # Same remote args on both steps, so Ray fuses them into one operator: each unit is read, cleaned
        # and tokenized in one worker, with no object-store hop between (the fastest layout measured on 2
        # cores, bench/RESULTS.md). The generator's rows depend on the string-hash seed
        # (pipeline/generate.py): fix it in the workers.
        .map_batches(read_and_prepare, batch_size=1, batch_format="numpy", num_cpus=1,
                     runtime_env={"env_vars": dict(WORKER_ENV)})
        .map_batches(
            TokenizeBatch,
            fn_constructor_kwargs=dict(
                tokenizer_json=tokenizer.backend_tokenizer.to_str(), eos_id=tokenizer.eos_token_id,
                unk_id=tokenizer.unk_token_id, max_input_tokens=cfg.max_input_tokens,
                max_label_tokens=cfg.max_label_tokens, validation_fraction=fraction, seed=cfg.seed,
            ),
            # batch_size=None: whole blocks, which the reader already cut at cfg.batch_size rows. A row count
            # here would make Ray bundle ~8k one-row *unit* blocks into a single fused task (no parallelism).
            batch_size=None, batch_format="pyarrow", compute=ActorPoolStrategy(size=workers), num_cpus=1,
            runtime_env={"env_vars": dict(WORKER_ENV)},
        )
    )


def write_splits(ds, cfg: PipelineConfig, out: Path, buckets: int) -> tuple[dict, dict, dict]:
    writer = OutputWriter(cfg, out, buckets)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        writer.add(batch)
    return writer.close()


class OutputWriter:
    """The driver's side of the job: takes the tokenized stream batch by batch (in its deterministic order)
    and writes kept rows to their split (train/validation shuffled, test in order), rejects to rejects/,
    while counting every row by split, module, regime and reason, and token lengths by split and module."""

    def __init__(self, cfg: PipelineConfig, out: Path, buckets: int):
        self.cfg, self.out = cfg, out
        # train and validation in a seeded random order (readers stream mixed rows); test in source order
        self.writers = {s: ShuffleWriter(out / s, DATA_SCHEMA, cfg.rows_per_file, seed=cfg.seed, buckets=buckets,
                                         spill_dir=out / ".shuffle" / s) for s in ("train", "validation")}
        self.writers["test"] = SplitWriter(out / "test", DATA_SCHEMA, cfg.rows_per_file)
        self.rejects = SplitWriter(out / "rejects", REJECT_SCHEMA, cfg.rows_per_file)
        self.stats = {s: LengthStats() for s in SPLITS}
        self.module_stats: dict[tuple[str, str], LengthStats] = defaultdict(LengthStats)
        self.rows_in: Counter = Counter()  # by source split (validation rows count under train: carved from it)
        self.rejected: dict[str, Counter] = defaultdict(Counter)
        self.kept_by_module: Counter = Counter()  # (module, split, regime) -> rows
        self.rejected_by_module: Counter = Counter()  # (module, source split, regime) -> rows
        self.skipped: Counter = Counter()  # module -> samples the generator skipped

    def add(self, batch: pa.Table) -> None:
        source_split = pc.if_else(pc.equal(batch["split"], "validation"), "train", batch["split"])
        self.rows_in.update(_value_counts(source_split))
        if pc.max(batch["source_skipped"]).as_py():
            for (module,), n in _group_sum(batch, ["module"], "source_skipped").items():
                self.skipped[module] += n
        is_rejected = pc.is_valid(batch["reject"])
        if pc.any(is_rejected).as_py():
            bad = batch.filter(is_rejected)
            if self.cfg.strict:
                first = bad.slice(0, 1).to_pylist()[0]
                raise RejectError(
                    f"--strict: {bad.num_rows} row(s) in this batch rejected, first reason {first['reject']!r} "
                    f"({REASONS[first['reject']]}); e.g. question={first['question_raw']!r} "
                    f"answer={first['answer_raw']!r}. Fix the source or run without --strict to write rejects")
            bad_split = pc.if_else(pc.equal(bad["split"], "validation"), "train", bad["split"])
            bad = bad.set_column(bad.schema.get_field_index("split"), "split", bad_split)
            for (split, reason), n in _group_sum(bad, ["split", "reject"]).items():
                self.rejected[split][reason] += n
            self.rejected_by_module.update(_group_sum(bad, ["module", "split", "regime"]))
            self.rejects.write(pa.table({"split": bad_split, "regime": bad["regime"], "module": bad["module"],
                                         "reason": bad["reject"], "question": bad["question_raw"],
                                         "answer": bad["answer_raw"]}))
            batch = batch.filter(pc.invert(is_rejected))
        if batch.num_rows == 0:
            return
        self.kept_by_module.update(_group_sum(batch, ["module", "split", "regime"]))
        present = pc.unique(batch["split"]).to_pylist()
        for split in present:  # usually one split and one module per batch (a unit is one file or shard)
            part = batch if len(present) == 1 else batch.filter(pc.equal(batch["split"], split))
            self.writers[split].write(part)
            self.stats[split].add(part)
            modules = pc.unique(part["module"]).to_pylist()
            for module in modules:
                one = part if len(modules) == 1 else part.filter(pc.equal(part["module"], module))
                self.module_stats[(module, split)].add(one)

    def close(self) -> tuple[dict, dict, dict]:
        files = {s: self.writers[s].close() for s in SPLITS}
        files["rejects"] = self.rejects.close()
        shutil.rmtree(self.out / ".shuffle", ignore_errors=True)
        kept = {s: self.writers[s].rows for s in SPLITS}
        n_rejected = sum(sum(c.values()) for c in self.rejected.values())
        n_in = sum(self.rows_in.values())
        # The accounting invariant: every row read is written exactly once, as kept or as rejected. A real
        # check (not an assert, which python -O removes): a broken invariant must never write a manifest.
        if not n_in == sum(kept.values()) + n_rejected == sum(kept.values()) + self.rejects.rows:
            raise RuntimeError(f"row accounting broken: {n_in} rows in, kept {kept}, rejected {n_rejected} "
                               f"(rejects file {self.rejects.rows}); refusing to write a manifest")
        counts = {
            "rows_in": n_in,
            "rows_kept": sum(kept.values()),
            "rows_rejected": n_rejected,
            "rows_in_by_split": dict(sorted(self.rows_in.items())),
            "rows_kept_by_split": kept,
            "rows_rejected_by_split": {s: dict(sorted(c.items())) for s, c in sorted(self.rejected.items())},
            "rows_rejected_by_reason": dict(sorted(sum(self.rejected.values(), Counter()).items())),
            "modules": sorted({m for m, _, _ in self.kept_by_module} | {m for m, _, _ in self.rejected_by_module},
                              key=str),
            "rows_kept_by_module": _nest(self.kept_by_module),
            "rows_rejected_by_module": _nest(self.rejected_by_module),
            "generator_skipped_samples": dict(sorted(self.skipped.items(), key=lambda kv: str(kv[0]))),
        }
        stats = {s: st.to_dict() for s, st in self.stats.items()}
        by_module: dict = defaultdict(dict)
        for (module, split), st in sorted(self.module_stats.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            by_module[str(module)][split] = st.to_dict()
        counts["token_lengths_by_module"] = dict(by_module)
        return counts, files, stats


def _value_counts(x: pa.Array | pa.ChunkedArray) -> Counter:
    return Counter({v["values"]: v["counts"] for v in pc.value_counts(x).to_pylist()})


def _group_sum(t: pa.Table, keys: list[str], column: str | None = None) -> Counter:
    """Rows (or the sum of `column`) per distinct combination of `keys`: {(k1, k2, ...): n}."""
    agg = (column, "sum") if column else ([], "count_all")
    name = f"{column}_sum" if column else "count_all"
    g = t.select(keys + ([column] if column else [])).group_by(keys).aggregate([agg])
    return Counter({tuple(r[k] for k in keys): r[name] for r in g.to_pylist()})


def _nest(counts: Counter) -> dict:
    """{(module, split, regime): n} -> {module: {split: {regime: n}}} (JSON keys: a null module is "None")."""
    out: dict = {}
    for (module, split, regime), n in sorted(counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
        out.setdefault(str(module), {}).setdefault(split, {})[regime] = n
    return out
