"""The pipeline stage end to end: find the source's read units, then in Ray workers read + clean + validate +
tokenize each unit and write its rows, shuffle train/validation into their final order, and write Parquet.

    find_units (driver) -> ProcessUnit (actor pool: read_unit, prepare_text, TokenizeBatch, UnitWriter)
        -> scatter_units (a task per ~500k rows of units) -> write_part (a task per output file)
        -> manifest (driver)

Why the workers write: the driver's write ceiling (counting, histograms, spilling and permuting every row)
measured ~87k rows/s of driver CPU, below what a 100-CPU cluster generates (bench/RESULTS.md, "Pipeline:
shuffle and the driver's write ceiling"). Now the driver does no per-row work: each unit returns a summary
(counts by split, module, regime and reject reason; exact token-length histograms; rows per spill file),
the driver adds them up (rows_in = kept + rejected, checked, also against the rows the parts hold) and
hands out the row ranges. The output is the one a single process writes from the stream of units in order
(pipeline/write.py's seeded bucket shuffle, fixed rows per file; tests/pipeline_fixtures.py): byte-identical
for a seed and config, whatever the worker count, the order units finish in, or a worker killed and retried.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from cluster.config import RayConfig
from cluster.connect import init_ray
from cluster.core import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    SPLITS,
    ConfigError,
    OutputError,
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
    SCATTER_ROWS,
    SHUFFLE_BUCKET_ROWS,
    LengthStats,
    Segment,
    UnitWriter,
    bucket_spill,
    content_hash,
    part_pieces,
    scatter_groups,
    scatter_units,
    stream_key,
    unit_spill,
    write_part,
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
    # Workers on other nodes write the spill files and the parts: the output must be shared storage
    # (cluster/storage.py).
    require_shared_storage({"pipeline.output": (str(out), False)}, ray_cfg, {"CPU": 1})
    t_ray = time.time()
    try:
        totals = process_units(cfg, units, tokenizer, fraction, out)
        t_units = time.time()
        files = write_splits(totals, cfg, out, buckets)
    except Exception as e:  # a reader's SourceError arrives wrapped by Ray: surface the message itself
        raise (find_user_error(e) or e) from e
    counts, stats = totals.counts(), totals.length_stats()
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
                      "read_clean_tokenize_write": round(t_units - t_ray, 3), "shuffle_write": round(t_rows - t_units, 3),
                      "finish": round(elapsed - (t_rows - t0), 3)},
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


def pool_size(configured: int, cpus: int, cores: int | None = None, units: int | None = None) -> int:
    """Actors of the read -> clean -> tokenize -> write pool: all CPUs but the driver's (0 = auto), and on a
    one-node Ray no more than the machine's cores (`cores`): a small machine's local Ray has more logical
    CPUs than cores (cluster/connect.py), and a third generator on 2 cores only slowed the demo (82 -> 119 s).
    Never more than there are read units (`units`): an actor without a unit would only start (import the
    tokenizer and the generator: seconds of CPU each) and stop. The output does not depend on the count."""
    workers = configured or max(1, min(cpus - 1, cores or cpus))
    if workers >= cpus > 1:
        raise ConfigError(f"pipeline.tokenize_workers={workers} would hold all {cpus} CPUs of the cluster and "
                          f"leave none for the driver, which runs Ray Data's executor; use at most {cpus - 1}")
    return max(1, min(workers, units)) if units is not None else workers


class ProcessUnit:
    """The actor pool's UDF: one read unit per call, read, cleaned, tokenized and written by this worker
    (UnitWriter); only the unit's summary (JSON, a few hundred bytes) goes back to the driver. One step, so
    a unit's rows never cross the object store; the tokenizer is built once per actor."""

    def __init__(self, units: list[ReadUnit], cfg: PipelineConfig, spill: str, tokenize: dict):
        self.units, self.cfg, self.spill = units, cfg, Path(spill)
        self.tokenize = TokenizeBatch(**tokenize)

    def __call__(self, batch: dict):
        # A generator, not a return: Ray Data wraps an exception raised by the call itself in a
        # UserCodeException that reaches the driver without its cause, while one raised as the generator runs
        # arrives as itself, so a reader's SourceError (or --strict's RejectError) stays a one-line error.
        for i in batch["unit"]:
            writer = UnitWriter(self.spill, int(i), strict=self.cfg.strict)
            for raw in read_unit(self.units[int(i)], self.cfg.batch_size):
                writer.add(self.tokenize(prepare_text(raw, max_chars=self.cfg.max_text_chars,
                                                      answer_pattern=self.cfg.answer_pattern)))
            yield {"unit": np.array([i]), "summary": np.array([json.dumps(writer.close())], dtype=object)}


def process_units(cfg: PipelineConfig, units: list[ReadUnit], tokenizer, fraction: float, out: Path) -> Totals:
    """Every unit through the actor pool; returns the added-up summaries (the driver's only per-unit work)."""
    import ray
    from ray.data import ActorPoolStrategy

    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1  # then it is this machine (the driver's)
    workers = pool_size(cfg.tokenize_workers, int(ray.cluster_resources().get("CPU", 1)),
                        os.cpu_count() if one_node else None, len(units))
    tokenize = dict(tokenizer_json=tokenizer.backend_tokenizer.to_str(), eos_id=tokenizer.eos_token_id,
                    unk_id=tokenizer.unk_token_id, max_input_tokens=cfg.max_input_tokens,
                    max_label_tokens=cfg.max_label_tokens, validation_fraction=fraction, seed=cfg.seed)
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units)).map_batches(
        ProcessUnit, fn_constructor_kwargs=dict(units=units, cfg=cfg, spill=str(out / ".shuffle"), tokenize=tokenize),
        batch_size=1, batch_format="numpy", compute=ActorPoolStrategy(size=workers), num_cpus=1,
        # The generator's rows depend on the string-hash seed (pipeline/generate.py): fix it in the workers.
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    totals = Totals(len(units))
    # Units finish in any order (no preserve_order needed): the totals and the row ranges are by unit index.
    from cluster.console import counting

    with counting("read units"):  # one summary row per unit: Ray's progress counts units here
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for summary in batch["summary"].to_pylist():
                totals.add(json.loads(summary))
    totals.check_complete()
    return totals


def ray_tasks(fn, calls: list[tuple]) -> list:
    """fn(*args) for each call, as Ray tasks of one CPU each (retried if their worker dies); results in order."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*args) for args in calls])


def write_splits(totals: Totals, cfg: PipelineConfig, out: Path, buckets: int, run_tasks=ray_tasks,
                 scatter_rows: int = SCATTER_ROWS) -> dict[str, list[Path]]:
    """The units' spill files -> the final parts, in tasks (run_tasks: Ray's by default): train/validation rows
    scattered into shuffle buckets (a task per run of consecutive units, its stream offset from the counts),
    then a task per output file. Returns the files by split (and rejects), after checking they hold exactly
    the rows the units wrote."""
    spill = out / ".shuffle"
    keys = {kind: stream_key(cfg.seed, kind) for kind in ("train", "validation")}
    # (spill, kind, units, the split's rows before them, buckets, key): train's and validation's at once
    calls = [(spill, kind, units, before, buckets, key) for kind, key in keys.items()
             for units, before in scatter_groups(totals.unit_rows(kind), scatter_rows)]
    by_bucket: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # (kind, bucket) -> [(unit, rows)]
    for (_, kind, units, *_), counts in zip(calls, run_tasks(scatter_units, calls), strict=True):
        for b, n in counts.items():
            by_bucket[(kind, b)].append((units[0], n))
    segments: dict[str, list[Segment]] = {}
    for kind, key in keys.items():
        segments[kind] = [Segment(tuple(str(bucket_spill(spill, kind, b, u)) for u, _ in sorted(by_bucket[(k, b)])),
                                  sum(n for _, n in by_bucket[(k, b)]), (key, b)) for k, b in sorted(by_bucket) if k == kind]
        shutil.rmtree(spill / kind / "units", ignore_errors=True)  # scattered: the unit files are no longer read
    for kind in ("test", "rejects"):  # source order: each unit's rows in turn
        segments[kind] = [Segment((str(unit_spill(spill, kind, u)),), n) for u, n in enumerate(totals.unit_rows(kind))
                          if n]
    calls = [(out / kind, REJECT_SCHEMA if kind == "rejects" else DATA_SCHEMA, cfg.rows_per_file, i, pieces)
             for kind in (*SPLITS, "rejects") for i, pieces in enumerate(part_pieces(segments[kind], cfg.rows_per_file))]
    files: dict[str, list[Path]] = {kind: [] for kind in (*SPLITS, "rejects")}
    written: Counter = Counter()
    for (directory, *_), (path, n) in zip(calls, run_tasks(write_part, calls), strict=True):
        files[directory.name].append(path)
        written[directory.name] += n
    for kind in files:
        if written[kind] != sum(totals.unit_rows(kind)):
            raise RuntimeError(f"row accounting broken: {kind} parts hold {written[kind]} rows, the units wrote "
                               f"{sum(totals.unit_rows(kind))}; refusing to write a manifest")
    shutil.rmtree(spill, ignore_errors=True)
    return files


class Totals:
    """The driver's side of the job: the units' summaries added up (no per-row work), into the manifest's
    counts by split, module, regime and reason and its token-length histograms by split and module."""

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.units: set[int] = set()
        self.rows: dict[str, np.ndarray] = {k: np.zeros(n_units, dtype=np.int64) for k in (*SPLITS, "rejects")}
        self.rows_in: Counter = Counter()  # by source split (validation rows count under train: carved from it)
        self.rejected: dict[str, Counter] = defaultdict(Counter)
        self.kept_by_module: Counter = Counter()  # (module, split, regime) -> rows
        self.rejected_by_module: Counter = Counter()  # (module, source split, regime) -> rows
        self.skipped: Counter = Counter()  # module -> samples the generator skipped
        self.module_stats: dict[tuple[str, str], LengthStats] = defaultdict(LengthStats)

    def add(self, summary: dict) -> None:
        u = summary["unit"]
        if u in self.units:  # Ray Data delivers each unit's output once, also when a worker died and it was retried
            raise RuntimeError(f"read unit {u} reported twice; refusing to count its rows again")
        self.units.add(u)
        for kind, n in summary["rows"].items():
            self.rows[kind][u] = n
        self.rows_in.update(summary["rows_in"])
        for split, reason, n in summary["rejected"]:
            self.rejected[split][reason] += n
        self.kept_by_module.update({tuple(k): n for *k, n in summary["kept_by_module"]})
        self.rejected_by_module.update({tuple(k): n for *k, n in summary["rejected_by_module"]})
        self.skipped.update(dict(summary["skipped"]))
        for module, split, inputs, labels in summary["lengths"]:
            self.module_stats[(module, split)].merge(inputs, labels)

    def check_complete(self) -> None:
        if len(self.units) != self.n_units:
            missing = sorted(set(range(self.n_units)) - self.units)
            raise RuntimeError(f"{len(missing)} of {self.n_units} read units never reported (first: {missing[:5]})")

    def unit_rows(self, kind: str) -> list[int]:
        return self.rows[kind].tolist()

    def counts(self) -> dict:
        kept = {s: int(self.rows[s].sum()) for s in SPLITS}
        n_rejected = sum(sum(c.values()) for c in self.rejected.values())
        n_in = sum(self.rows_in.values())
        # The accounting invariant: every row read is written exactly once, as kept or as rejected. A real
        # check (not an assert, which python -O removes): a broken invariant must never write a manifest.
        if not n_in == sum(kept.values()) + n_rejected == sum(kept.values()) + int(self.rows["rejects"].sum()):
            raise RuntimeError(f"row accounting broken: {n_in} rows in, kept {kept}, rejected {n_rejected} "
                               f"(rejects file {int(self.rows['rejects'].sum())}); refusing to write a manifest")
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
        by_module: dict = defaultdict(dict)
        for (module, split), st in sorted(self.module_stats.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
            by_module[str(module)][split] = st.to_dict()
        counts["token_lengths_by_module"] = dict(by_module)
        return counts

    def length_stats(self) -> dict:
        """Token lengths by split: the modules' histograms added up."""
        stats = {s: LengthStats() for s in SPLITS}
        for (_, split), st in self.module_stats.items():
            stats[split].merge(st.inputs, st.labels)
        return {s: st.to_dict() for s, st in stats.items()}


def _nest(counts: Counter) -> dict:
    """{(module, split, regime): n} -> {module: {split: {regime: n}}} (JSON keys: a null module is "None")."""
    out: dict = {}
    for (module, split, regime), n in sorted(counts.items(), key=lambda kv: tuple(map(str, kv[0]))):
        out.setdefault(str(module), {}).setdefault(split, {})[regime] = n
    return out
