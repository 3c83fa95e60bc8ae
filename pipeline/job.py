"""The pipeline stage end to end: plan the source, read + clean + validate in Ray tasks, tokenize in a
Ray Data actor pool, and stream the ordered result to Parquet on the driver.

    plan (driver)  ->  read_unit + prepare_text (tasks)  ->  TokenizeBatch (actors)  ->  write (driver)

Why the writes happen on the driver: it sees the rows in a deterministic order (preserve_order), so it
can cut files at fixed row counts (byte-identical output), count every row once (rows_in = kept +
rejected, asserted), and keep exact length histograms for the manifest. Writing Parquet is cheap next to
tokenizing; the heavy per-row work stays in the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cluster.config import ConfigError, RayConfig
from cluster.connect import init_ray
from cluster.storage import require_shared_storage
from pipeline.config import MAX_VALIDATION_SHARE, PipelineConfig, answer_regex
from pipeline.generate import WORKER_ENV
from pipeline.sources import SPLITS, ReadUnit, SourceError, plan, read_unit
from pipeline.tokenize_step import TokenizeBatch
from pipeline.tokenizer import load_tokenizer, tokenizer_identity
from pipeline.validate import REASONS, prepare_text
from pipeline.write import (
    DATA_SCHEMA,
    REJECT_SCHEMA,
    LengthStats,
    SplitWriter,
    content_hash,
    write_json_atomic,
)

log = logging.getLogger("mathtune.pipeline")

OUTPUT_PARTS = (*SPLITS, "rejects", "tokenizer")
MANIFEST_VERSION = 1


class OutputError(ValueError):
    """The output folder cannot be used; the message says why and what to do."""


class RejectError(ValueError):
    """--strict: the first class of rejected rows, with an example."""


def run(cfg: PipelineConfig, ray_cfg: RayConfig | None = None, *, _kill_worker_once: str | None = None) -> dict:
    """Run the pipeline; returns the manifest (also written to <output>/manifest.json, complete: true)."""
    t0 = time.time()
    # Everything that can be refused is refused before the old output is touched or Ray starts.
    if cfg.push_to_hub and not os.environ.get("HF_TOKEN"):
        raise ConfigError("--push-to-hub needs a Hugging Face token in the HF_TOKEN environment variable "
                          "(never as a flag or config key)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer!r} has no eos token; T5-style targets need one")
    units, source_info = plan(cfg)
    fraction = validation_fraction(cfg, units)
    out = prepare_output(Path(cfg.output))
    t_plan = time.time()
    init_ray(ray_cfg)
    # Ray Data tasks on other nodes write the shards: the output must be shared storage (cluster/storage.py).
    require_shared_storage({"pipeline.output": (str(out), False)}, ray_cfg, {"CPU": 1})
    t_ray = time.time()
    ds = build_dataset(cfg, units, tokenizer, fraction, _kill_worker_once)
    try:
        counts, files, stats = write_splits(ds, cfg, out)
    except Exception as e:  # a reader's SourceError arrives wrapped by Ray: surface the message itself
        raise _user_error(e) from e
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
        push_to_hub(out, cfg.push_to_hub)
    return manifest


def prepare_output(out: Path) -> Path:
    """Create or reuse the output folder; refuse one that holds something else; fail early if unwritable."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is a file; choose a folder with --output")
    if out.is_dir() and any(out.iterdir()) and not any((out / p).exists() for p in (*OUTPUT_PARTS, "manifest.json")):
        raise OutputError(f"output {out} is not empty and is not a pipeline output; refusing to overwrite it. "
                          f"Choose an empty or new folder with --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output {out} is not writable ({e.strerror or e}); choose another --output") from e
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


def build_dataset(cfg: PipelineConfig, units: list[ReadUnit], tokenizer, fraction: float, kill_once: str | None):
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic row order -> byte-identical output
    regex = answer_regex(cfg)

    def read_and_prepare(batch: dict):
        # One read unit per call (batch_size=1): a generator shard or one file, streamed in batches.
        for i in batch["unit"]:
            for raw in read_unit(units[int(i)], cfg.batch_size):
                yield prepare_text(raw, max_chars=cfg.max_text_chars, answer_regex=regex)

    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Half the CPUs tokenize, the rest read/generate; never the whole cluster (it would starve the reads).
    workers = cfg.tokenize_workers or max(1, min(cpus // 2, 16))
    if workers >= cpus:
        raise ConfigError(f"pipeline.tokenize_workers={workers} would hold all {cpus} CPUs of the cluster and "
                          f"leave none for reading; use at most {max(1, cpus - 1)}")
    return (
        ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
        # Same remote args on both steps, so Ray fuses them into one operator: each unit is read, cleaned
        # and tokenized in one worker, with no object-store hop between (the fastest layout measured on 2
        # cores, shared/NOTES.md). The generator's rows depend on the string-hash seed
        # (pipeline/generate.py): fix it in the workers.
        .map_batches(read_and_prepare, batch_size=1, batch_format="numpy", num_cpus=1,
                     runtime_env={"env_vars": dict(WORKER_ENV)})
        .map_batches(
            TokenizeBatch,
            fn_constructor_kwargs=dict(
                tokenizer_json=tokenizer.backend_tokenizer.to_str(), eos_id=tokenizer.eos_token_id,
                unk_id=tokenizer.unk_token_id, max_input_tokens=cfg.max_input_tokens,
                max_label_tokens=cfg.max_label_tokens, validation_fraction=fraction, seed=cfg.seed,
                kill_once_marker=kill_once,
            ),
            # batch_size=None: whole blocks, which the reader already cut at cfg.batch_size rows. A row count
            # here would make Ray bundle ~8k one-row *unit* blocks into a single fused task (no parallelism).
            batch_size=None, batch_format="pyarrow", compute=ActorPoolStrategy(size=workers), num_cpus=1,
            runtime_env={"env_vars": dict(WORKER_ENV)},
        )
    )


def write_splits(ds, cfg: PipelineConfig, out: Path) -> tuple[dict, dict, dict]:
    writers = {s: SplitWriter(out / s, DATA_SCHEMA, cfg.rows_per_file) for s in SPLITS}
    rejects = SplitWriter(out / "rejects", REJECT_SCHEMA, cfg.rows_per_file)
    stats = {s: LengthStats() for s in SPLITS}
    rows_in: Counter = Counter()  # by source split (validation rows count under train: carved from it)
    rejected: dict[str, Counter] = defaultdict(Counter)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        source_split = pc.if_else(pc.equal(batch["split"], "validation"), "train", batch["split"])
        rows_in.update(_value_counts(source_split))
        is_rejected = pc.is_valid(batch["reject"])
        if pc.any(is_rejected).as_py():
            bad = batch.filter(is_rejected)
            if cfg.strict:
                first = bad.slice(0, 1).to_pylist()[0]
                raise RejectError(
                    f"--strict: {bad.num_rows} row(s) in this batch rejected, first reason {first['reject']!r} "
                    f"({REASONS[first['reject']]}); e.g. question={first['question_raw']!r} "
                    f"answer={first['answer_raw']!r}. Fix the source or run without --strict to write rejects")
            bad_split = pc.if_else(pc.equal(bad["split"], "validation"), "train", bad["split"])
            for (split, reason), n in _pair_counts(bad_split, bad["reject"]).items():
                rejected[split][reason] += n
            rejects.write(pa.table({"split": bad_split, "regime": bad["regime"], "reason": bad["reject"],
                                    "question": bad["question_raw"], "answer": bad["answer_raw"]}))
            batch = batch.filter(pc.invert(is_rejected))
        present = pc.unique(batch["split"]).to_pylist()
        for split in present:  # usually one split per batch (a unit is one file or shard): no filter copy
            part = batch if len(present) == 1 else batch.filter(pc.equal(batch["split"], split))
            writers[split].write(part)
            stats[split].add(part)
    files = {s: w.close() for s, w in writers.items()}
    files["rejects"] = rejects.close()

    kept = {s: writers[s].rows for s in SPLITS}
    n_rejected = sum(sum(c.values()) for c in rejected.values())
    n_in = sum(rows_in.values())
    # The accounting invariant: every row read is written exactly once, as kept or as rejected.
    assert n_in == sum(kept.values()) + n_rejected == sum(kept.values()) + rejects.rows, (n_in, kept, n_rejected)
    counts = {
        "rows_in": n_in,
        "rows_kept": sum(kept.values()),
        "rows_rejected": n_rejected,
        "rows_in_by_split": dict(sorted(rows_in.items())),
        "rows_kept_by_split": kept,
        "rows_rejected_by_split": {s: dict(sorted(c.items())) for s, c in sorted(rejected.items())},
        "rows_rejected_by_reason": dict(sorted(sum(rejected.values(), Counter()).items())),
    }
    return counts, files, {s: st.to_dict() for s, st in stats.items()}


def _value_counts(x: pa.Array | pa.ChunkedArray) -> Counter:
    return Counter({v["values"]: v["counts"] for v in pc.value_counts(x).to_pylist()})


def _pair_counts(split: pa.Array, reason: pa.Array) -> Counter:
    t = pa.table({"s": split, "r": reason}).group_by(["s", "r"]).aggregate([([], "count_all")])
    return Counter({(r["s"], r["r"]): r["count_all"] for r in t.to_pylist()})


def _user_error(e: BaseException) -> BaseException:
    """Our own error (SourceError, OutputError, RejectError, ConfigError) found in an exception's chain,
    unwrapped from Ray's task error (whose str() adds a remote traceback and retry advice), else e."""
    ours = (SourceError, OutputError, RejectError, ConfigError)
    seen, todo, found = set(), [e], []
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ours):
            found.append(x)
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    if not found:
        return e
    # Prefer the original instance (Ray keeps it as .cause) over RayTaskError(SourceError); either way
    # keep the first line only: our messages are one line, Ray appends its retry advice below them.
    x = next((x for x in found if type(x) in ours), found[0])
    cls = next(c for c in ours if isinstance(x, c))
    return cls(str(x).strip().splitlines()[0])


def push_to_hub(out: Path, repo: str) -> None:
    """Upload the finished folder as a (private) hub dataset repo. The token is read from $HF_TOKEN only
    and handed to huggingface_hub; it is never logged or written anywhere."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, repo_type="dataset", private=True, exist_ok=True)
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(out))
    log.info("pushed %s to the hub dataset %s", out, repo)
    print(f"pipeline: pushed {out} to hf dataset {repo}", flush=True)


