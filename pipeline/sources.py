"""Where rows come from, as a list of independent *read units* (a generator shard or one file), each
turned into Arrow tables by `read_unit` inside a Ray task.

Raw tables have the columns: question, answer (string or binary, as read: cleaning and decoding come
next), regime, split (strings), source_reject (string, null unless the reader itself must reject a row).

Problems that can be seen from the driver (no files, a corrupt Parquet footer, a missing or mistyped
column, an unknown split, the hub offline) raise SourceError there, before any Ray work, with a message
that says what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from cluster.core import SPLITS, SourceError
from pipeline.answers import module_of_name
from pipeline.config import TEST_REGIMES, TRAIN_REGIMES, PipelineConfig

FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
    ".txt": "v1txt",
}
LABEL_COLUMNS = ("regime", "split", "module")  # optional columns a file may have beside question/answer
TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
OFFLINE_ALTERNATIVES = (
    "offline alternatives: --source generate (DeepMind's generator, the default), or a local copy: a "
    "Parquet / JSON Lines / Arrow file or folder, or the DeepMind v1.0 release layout <regime>/<module>.txt"
)


@dataclass(frozen=True)
class ReadUnit:
    kind: str  # generate | parquet | jsonl | arrow | v1txt
    split: str | None = None  # None: the file has a `split` column
    regime: str | None = None
    path: str = ""
    rows: int = 0  # generate: rows to sample; files: row count where cheaply known (else 0)
    shard: int = 0
    seed: int = 0
    module: str = ""  # the rows' module ("": a file with a `module` column)
    source_module: str = ""  # generate: the generator's module (an extrapolation module for extrapolate)
    fs_spec: str = ""  # how to reopen the filesystem inside a worker (the source spec)
    row_groups: tuple[int, ...] = ()  # parquet: the row groups this unit's row range overlaps (empty = all)
    skip: int = 0  # parquet: rows of the first of those row groups before this unit's range


# ----------------------------------------------------------------------------------------------------
# Splits from names (v1.0 regime folders, the hub's train/ test/ files)

def split_of_name(name: str) -> tuple[str, str] | None:
    """'train-easy' -> ('train', 'train-easy'); 'test-00000-of-00001' -> ('test', 'test'); else None."""
    n = name.lower()
    for regime in TRAIN_REGIMES:
        if n.startswith(regime):
            return "train", regime
    for regime in (*TEST_REGIMES, "extrapolate"):
        if n.startswith(regime):
            return "test", regime
    # The hub's names: train, train-00000-of-00002, test-00000... Not train_foo / test_bar: a folder such
    # as test_outputs/ is not a split.
    for split, names in (("train", "train"), ("test", "test"), ("validation", "validation|valid|dev")):
        if re.match(rf"^(?:{names})(?:-\d.*)?$", n):
            return split, split
    return None


def split_of_path(rel_parts: list[str]) -> tuple[str, str] | None:
    """Nearest path component first: .../train-easy/algebra__linear_1d.txt -> train-easy;
    .../algebra__linear_1d/train/0000.parquet -> train."""
    for part in reversed(rel_parts):
        stem = part.split(".")[0] if "." in part else part
        found = split_of_name(stem)
        if found:
            return found
    return None


# ----------------------------------------------------------------------------------------------------
# Filesystems

def resolve_filesystem(spec: str) -> tuple[pafs.FileSystem, str]:
    """Local path, any URI pyarrow knows (s3://, gs://, hdfs://), or hf:// through huggingface_hub."""
    if spec.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), spec[len("hf://"):]
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(f"cannot open {spec}: {e}") from e
    return pafs.LocalFileSystem(), os.path.abspath(spec)


def list_files(fs: pafs.FileSystem, root: str) -> list[tuple[str, list[str]]]:
    """[(path, path parts from the root's own name on)] of data files under root (or root itself)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source not found: {root}")
    root_name = root.rstrip("/").split("/")[-1]
    if info.type == pafs.FileType.File:
        parent = root.rstrip("/").split("/")[-2:-1]
        return [(root, [*parent, root_name])]
    out = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(root.rstrip("/")) + 1:].split("/")
        if any(p.startswith(".") for p in rel):  # .git, .cache, hidden files
            continue
        out.append((f.path, [root_name, *rel]))
    return sorted(out)


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


# ----------------------------------------------------------------------------------------------------
# Planning: source spec -> read units

def find_units(cfg: PipelineConfig) -> tuple[list[ReadUnit], dict]:
    """The read units of cfg.source, and facts about the source for the manifest."""
    if cfg.source == "generate":
        return generate_units(cfg), {"kind": "generate", "modules": cfg.module_list()}
    wanted = None if cfg.modules == ["all"] else set(cfg.modules)
    specs = [cfg.source]
    if cfg.source.startswith("hf:") and not cfg.source.startswith("hf://"):
        # hf:<id>:<config> names one config; hf:<id> reads one config per module
        ref = cfg.source[3:]
        specs = [resolve_hub(ref, "")] if ref.count(":") else [resolve_hub(ref, m) for m in cfg.module_list()]
    units, ignored = [], []
    for spec in specs:
        fs, root = resolve_filesystem(spec)
        for path, parts in list_files(fs, root):
            kind = FORMATS.get(_ext(path))
            named = _module_in_path(parts, kind)
            if kind is None or (named and wanted is not None and named not in wanted):
                ignored.append(path)  # e.g. the v1.0 release holds every module in each regime folder
                continue
            units.extend(_file_units(fs, path, parts, kind, spec, named, wanted))
    if not units:
        names = "<module>" if wanted is None else "|".join(sorted(wanted))
        raise SourceError(
            f"no data files under {cfg.source}: expected .parquet, .jsonl, .arrow files or the v1.0 layout "
            f"<regime>/{names}.txt" + (f" (ignored: {', '.join(ignored[:5])})" if ignored else "")
        )
    modules = sorted({u.module for u in units if u.module})
    return units, {"kind": "files", "spec": cfg.source, "files": len(units), "ignored_files": len(ignored),
                   "modules": modules}


def _module_in_path(parts: list[str], kind: str | None) -> str | None:
    """The module a file holds by its name: the nearest path component that is a generator module (an
    extrapolation module's name gives its base module); a v1.0 text file is named after its module."""
    for part in reversed(parts):
        stem = part.split(".")[0]
        found = module_of_name(stem)
        if found:
            return found
    if kind == "v1txt":
        return os.path.splitext(parts[-1])[0]
    return None


def generate_units(cfg: PipelineConfig) -> list[ReadUnit]:
    """Shards of every (module, regime): the train regimes at the module's weight, then its test sets
    (interpolate; extrapolate where the generator has one, sampled from the extrapolation module)."""
    units = []
    for module in cfg.module_list():
        sets = [(regime, "train", module, cfg.train_rows(module)) for regime in TRAIN_REGIMES]
        sets += [(regime, "test", source, rows) for regime, source, rows in cfg.test_units(module)]
        for regime, split, source, rows in sets:
            for shard in range(math.ceil(rows / cfg.rows_per_shard)):
                n = min(cfg.rows_per_shard, rows - shard * cfg.rows_per_shard)
                units.append(ReadUnit("generate", split, regime, rows=n, shard=shard, seed=cfg.seed,
                                      module=module, source_module=source))
    return units


# A Parquet file is read in row ranges of this many rows, one range per read unit: the hub ships all 1.98M
# train rows in one file, and one unit per file would leave every worker but one idle. A range reads the
# row groups it overlaps and keeps its slice (decoding a row group costs little next to tokenizing it).
PARQUET_ROWS_PER_UNIT = 50_000


def _file_units(fs: pafs.FileSystem, path: str, parts: list[str], kind: str, spec: str, module: str | None,
                wanted: set[str] | None) -> list[ReadUnit]:
    columns, rows, groups = inspect_file(fs, path, kind)
    if module is None and "module" not in columns:
        if wanted is None or len(wanted) != 1:
            raise SourceError(f"{path}: cannot tell which module it holds: name the file or a folder above it "
                              f"after the module (e.g. algebra__linear_1d/train/0000.parquet), add a `module` "
                              f"column, or select one module with --modules")
        (module,) = wanted
    module = module or ""
    found = split_of_path(parts)
    if kind == "v1txt" and (found is None or found[1] in ("train", "test", "validation")):
        raise SourceError(f"{path}: a v1.0 text file must sit in a regime folder (train-easy, train-medium, "
                          f"train-hard, interpolate, extrapolate), not {parts[-2] if len(parts) > 1 else '/'}")
    if "split" not in columns and found is None:
        raise SourceError(f"{path}: cannot tell its split: name the file or its folder train*/test*/validation* "
                          f"(or a v1.0 regime), or add a `split` column")
    split, regime = found if found else (None, None)
    if kind != "parquet" or rows <= PARQUET_ROWS_PER_UNIT:
        return [ReadUnit(kind, split, regime, path=path, rows=rows, fs_spec=spec, module=module)]
    group_start = [sum(groups[:i]) for i in range(len(groups))]
    units = []
    for start in range(0, rows, PARQUET_ROWS_PER_UNIT):
        stop = min(rows, start + PARQUET_ROWS_PER_UNIT)
        overlap = tuple(i for i, g in enumerate(groups) if group_start[i] < stop and group_start[i] + g > start)
        units.append(ReadUnit(kind, split, regime, path=path, rows=stop - start, fs_spec=spec, module=module,
                              row_groups=overlap, skip=start - group_start[overlap[0]]))
    return units


def _check_columns(path: str, schema: pa.Schema) -> None:
    names = schema.names
    missing = [c for c in ("question", "answer") if c not in names]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; it has {names}. The pipeline reads `question` "
                          f"and `answer` (strings): rename the columns")
    for c in ("question", "answer", *LABEL_COLUMNS):
        if c in names and schema.field(c).type not in TEXT_TYPES:
            raise SourceError(f"{path}: column `{c}` has type {schema.field(c).type}; expected strings")


def inspect_file(fs: pafs.FileSystem, path: str, kind: str) -> tuple[list[str], int, list[int]]:
    """Driver-side check of a file's readability and columns (metadata only where the format allows).
    Returns (column names, row count or 0 when not cheaply known, rows per Parquet row group)."""
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
            _check_columns(path, schema)
            return schema.names, meta.num_rows, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if kind == "arrow":
            with fs.open_input_file(path) as f:
                schema, rows = _arrow_schema_rows(f)
            _check_columns(path, schema)
            return schema.names, rows, []
        if kind == "jsonl":
            with fs.open_input_stream(path) as f:
                head = f.read(1 << 20).split(b"\n")
            first = next((line for line in head if line.strip()), None)
            if first is None:
                return ["question", "answer"], 0, []  # empty file: 0 rows, nothing to check
            try:
                obj = json.loads(first)
            except ValueError as e:
                raise SourceError(f"{path}: first line is not JSON ({e}); expected one object per line") from e
            if not isinstance(obj, dict):
                raise SourceError(f"{path}: expected one JSON object per line, got {type(obj).__name__}")
            missing = [c for c in ("question", "answer") if c not in obj]
            if missing:
                raise SourceError(f"{path}: missing field(s) {missing}; it has {sorted(obj)}. Rename them to "
                                  f"`question` and `answer`")
            for c in ("question", "answer", *LABEL_COLUMNS):
                if c in obj and obj[c] is not None and not isinstance(obj[c], str):
                    raise SourceError(f"{path}: field `{c}` holds {type(obj[c]).__name__} values; expected strings")
            return sorted(obj), 0, []
        return ["question", "answer"], 0, []  # v1txt: lines, checked while reading
    except SourceError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: not a readable {kind} file ({e}); is it truncated or corrupt?") from e


def _arrow_schema_rows(f) -> tuple[pa.Schema, int]:
    import pyarrow.ipc as ipc

    try:
        reader = ipc.open_file(f)
        return reader.schema, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        f.seek(0)
        return ipc.open_stream(f).schema, 0


def resolve_hub(ref: str, module: str) -> str:
    """hf:<id>[:config] -> an hf:// path of its Parquet files (the refs/convert/parquet branch when the
    repo is a loading script, as deepmind/math_dataset is); without a config, `module`'s. Fails fast when
    the hub is unreachable."""
    repo, _, config = ref.partition(":")
    config = config or module
    if not repo or "/" not in repo:
        raise SourceError(f"hf:{ref}: expected hf:<owner>/<dataset>[:config]")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable():
        raise SourceError(f"hf:{ref}: the Hugging Face hub is not reachable from here (offline or "
                          f"HF_HUB_OFFLINE=1); {OFFLINE_ALTERNATIVES}")
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    for rev in ("refs%2Fconvert%2Fparquet", "main"):
        base = f"datasets/{repo}@{rev}/{config}"
        try:
            if fs.glob(f"{base}/**/*.parquet"):
                return f"hf://{base}"
        except (OSError, ValueError):
            continue
    raise SourceError(f"hf:{ref}: found no Parquet files for config {config!r} (never runs loading scripts)")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Reading (runs inside Ray tasks)

def read_unit(unit: ReadUnit, batch_rows: int) -> Iterator[pa.Table]:
    try:
        if unit.kind == "generate":
            yield from _read_generate(unit)
            return
        fs, _ = resolve_filesystem(unit.fs_spec)
        reader = {"parquet": _read_parquet, "jsonl": _read_jsonl, "arrow": _read_arrow, "v1txt": _read_v1txt}
        for table in reader[unit.kind](fs, unit, batch_rows):
            yield _with_split_regime(table, unit)
    except SourceError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{unit.path}: could not read it as {unit.kind} ({e}); is it truncated or corrupt?") from e


def _raw_table(question: pa.Array, answer: pa.Array, reject: pa.Array | None = None) -> pa.Table:
    n = len(question)
    return pa.table({"question": question, "answer": answer,
                     "source_reject": reject if reject is not None else pa.nulls(n, pa.string())})


def _read_generate(unit: ReadUnit) -> Iterator[pa.Table]:
    import numpy as np

    from pipeline.generate import generate_rows, shard_seed

    source = unit.source_module or unit.module
    q, a, skipped = generate_rows(source, unit.regime, unit.rows, shard_seed(unit.seed, source, unit.regime, unit.shard))
    t = _raw_table(pa.array(q, pa.string()), pa.array(a, pa.string()))
    n = len(q)
    # The samples the generator itself skipped (over its length caps) ride on the shard's first row, so
    # the unit's summary counts them for the manifest (they never become rows).
    counts = np.zeros(n, dtype=np.int64)
    if n:
        counts[0] = skipped
    yield t.append_column("regime", pa.array([unit.regime] * n, pa.string())).append_column(
        "split", pa.array([unit.split] * n, pa.string())).append_column(
        "module", pa.array([unit.module] * n, pa.string())).append_column("source_skipped", pa.array(counts))


def _with_split_regime(t: pa.Table, unit: ReadUnit) -> pa.Table:
    n = t.num_rows
    if "split" not in t.column_names:
        t = t.append_column("split", pa.array([unit.split] * n, pa.string()))
    else:
        import pyarrow.compute as pc

        split = pc.utf8_lower(pc.utf8_trim_whitespace(t["split"].cast(pa.string())))
        bad = pc.invert(pc.is_in(split, value_set=pa.array(SPLITS)))
        if pc.any(pc.fill_null(bad, True)).as_py():
            values = sorted({str(v) for v in pc.filter(split, pc.fill_null(bad, True)).to_pylist()})[:5]
            raise SourceError(f"{unit.path}: `split` column holds {values}; expected one of {list(SPLITS)}")
        t = t.set_column(t.schema.get_field_index("split"), "split", split)
    if "regime" not in t.column_names:
        t = t.append_column("regime", pa.array([unit.regime or unit.split] * n, pa.string()))
    else:
        import pyarrow.compute as pc

        regime = t["regime"].cast(pa.string())
        t = t.set_column(t.schema.get_field_index("regime"), "regime", pc.coalesce(regime, t["split"]))
    own = pa.array([unit.module or None] * n, pa.string())
    if "module" not in t.column_names:
        t = t.append_column("module", own)
    else:
        import pyarrow.compute as pc

        t = t.set_column(t.schema.get_field_index("module"), "module",
                         pc.coalesce(t["module"].cast(pa.string()), own))
    return t.select(["question", "answer", "source_reject", "regime", "split", "module"])


def _pick(t: pa.Table | pa.RecordBatch, path: str) -> pa.Table:
    if isinstance(t, pa.RecordBatch):
        t = pa.Table.from_batches([t])
    for c in ("question", "answer", *LABEL_COLUMNS):
        if c in t.column_names and t.schema.field(c).type not in TEXT_TYPES and t.schema.field(c).type != pa.null():
            raise SourceError(f"{path}: column `{c}` has type {t.schema.field(c).type}; expected strings")
    missing = [c for c in ("question", "answer") if c not in t.column_names]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; it has {t.column_names}")
    out = _raw_table(t["question"].combine_chunks(), t["answer"].combine_chunks())
    for c in LABEL_COLUMNS:
        if c in t.column_names:
            out = out.append_column(c, t[c].cast(pa.string()))
    return out


def _read_parquet(fs, unit: ReadUnit, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    with fs.open_input_file(unit.path) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in ("question", "answer", *LABEL_COLUMNS) if c in pf.schema_arrow.names]
        if not unit.row_groups:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                yield _pick(batch, unit.path)
            return
        skip, left = unit.skip, unit.rows
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols, row_groups=list(unit.row_groups)):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip, left)
            skip, left = 0, left - batch.num_rows
            yield _pick(batch, unit.path)
            if left == 0:
                return


def _read_arrow(fs, unit: ReadUnit, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.ipc as ipc

    with fs.open_input_file(unit.path) as f:
        try:
            reader = ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            f.seek(0)
            batches = iter(ipc.open_stream(f))
        for batch in batches:
            yield _pick(batch, unit.path)


def _read_jsonl(fs, unit: ReadUnit, batch_rows: int) -> Iterator[pa.Table]:
    import pyarrow.json as pj

    with fs.open_input_stream(unit.path) as f:
        data = f.read()
    if not data.strip():
        return
    # Every text field read as a string: a value like 12 in `answer` must not turn the column into int64.
    schema = pa.schema([(c, pa.string()) for c in ("question", "answer", *LABEL_COLUMNS)])
    try:
        t = pj.read_json(pa.BufferReader(data), parse_options=pj.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False),
            read_options=pj.ReadOptions(block_size=max(1 << 20, min(len(data), 64 << 20))))
    except pa.ArrowInvalid as e:
        raise SourceError(f"{unit.path}: not valid JSON Lines ({e})") from e
    for c in LABEL_COLUMNS:
        if t[c].null_count == t.num_rows:
            t = t.drop_columns([c])
    for start in range(0, t.num_rows, batch_rows):
        yield _pick(t.slice(start, batch_rows), unit.path)


def _read_v1txt(fs, unit: ReadUnit, batch_rows: int) -> Iterator[pa.Table]:
    """DeepMind v1.0 layout: question and answer on alternating lines, read strictly as line pairs (lines
    1+2, 3+4, ...). A blank line is never skipped: skipping it would shift every later pair (questions
    read as answers). A pair with an empty question or answer is a row like any other, which cleaning
    rejects (empty_question / empty_answer); an odd line count leaves the last line unpaired, a reject
    (unpaired_line). So every line of the file is in exactly one row, kept or rejected with a reason.
    Lines stay bytes here: decoding (and rejecting non-UTF-8 rows) is the cleaning step's job."""
    with fs.open_input_stream(unit.path) as f:
        data = f.read()
    if not data:
        return
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the last line's terminator, not an empty line
    pairs = len(lines) // 2
    for start in range(0, pairs, batch_rows):
        chunk = lines[2 * start: 2 * min(pairs, start + batch_rows)]
        yield _raw_table(pa.array(chunk[0::2], pa.binary()), pa.array(chunk[1::2], pa.binary()))
    if len(lines) % 2:
        yield _raw_table(pa.array([lines[-1]], pa.binary()), pa.nulls(1, pa.binary()),
                         pa.array(["unpaired_line"], pa.string()))
