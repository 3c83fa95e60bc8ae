"""Find what eval needs before any actor starts, and refuse clearly when it is not there.

Everything here runs in the driver and is cheap (file checks, Parquet metadata, one column read), so a
missing weight file or a misnamed column is one clear line, not a traceback from deep inside a Ray actor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.console import quiet_untied_head_notice
from cluster.core import (
    TOKENIZER_FILES,
    DataError,
    UserError,
    check_data_dir,
    check_model_dir,
    has_tokenizer,
    is_local_spec,
    load_tokenizer,
    open_split,
    read_json,
)

log = logging.getLogger("mathtune.eval")

REQUIRED_COLUMNS = ("question", "answer", "input_ids", "labels")  # regime and module are optional
# A probe the model's and the data's tokenizers must encode identically, or input_ids mean different
# things to the model than to the pipeline that wrote them.
TOKENIZER_PROBE = "Solve -3*x + 12 = 0 for x. -6 3/4"


class EvalError(UserError, RuntimeError):
    """A problem with eval's inputs (model, tokenizer, data) that the user must fix."""


@dataclass
class ModelSource:
    spec: str  # what from_pretrained gets: a local directory or a hub id
    local: bool
    train_dir: Path | None  # the train output that produced it (has metrics.jsonl), if any


def resolve_model(spec: str) -> ModelSource:
    """A train output (<out>/final), a local HF model directory, or a hub id."""
    path = Path(spec).expanduser()
    if path.exists():  # a file is refused by check_model_dir
        if (path / "final").is_dir() and not (path / "config.json").exists():
            path = path / "final"  # a train output directory
        check_model_dir(path)
        train_dir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
        return ModelSource(str(path), True, train_dir)
    if is_local_spec(spec):
        raise EvalError(f"model directory not found: {spec}")
    return ModelSource(spec, False, None)


def resolve_tokenizer(explicit: str | None, model: ModelSource, data: str | None) -> str:
    """--tokenizer, else the model's own, else the pipeline's <data>/tokenizer."""
    if explicit:
        return explicit
    if not model.local or has_tokenizer(Path(model.spec)):
        return model.spec
    if data and has_tokenizer(Path(data) / "tokenizer"):
        return str(Path(data) / "tokenizer")
    raise EvalError(
        f"no tokenizer: {model.spec} has no tokenizer files and {data}/tokenizer does not exist; pass --tokenizer"
    )


def load_model(spec: str, dtype=None, device=None):
    """Weights from safetensors only (use_safetensors=True never falls back to a pickle), loaded onto
    `device` (transformers' device_map: each tensor goes there as it is read)."""
    from transformers import AutoModelForSeq2SeqLM

    quiet_untied_head_notice()
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(
            spec, use_safetensors=True, dtype=dtype, trust_remote_code=False,
            **({"device_map": str(device)} if device is not None else {}),
        )
    except OSError as e:
        hint = (
            " Offline (HF_HUB_OFFLINE=1 or no network)? Download it where there is network and pass the local "
            "directory, or evaluate a train output."
            if not is_local_spec(spec)
            else ""
        )
        raise EvalError(f"could not load model {spec!r}: {e}.{hint}") from e


# T5-family config.json files (what this project writes and flan-t5's) are read as JSON in the driver:
# AutoConfig imports transformers and torch there, ~4 s before Ray can start, for three fields.
FAST_CONFIG_TYPES = ("t5", "mt5", "umt5")


def _local_t5_config(model: ModelSource) -> dict | None:
    """model_type and vocab_size of a local T5-family folder's config.json; None for anything else (a hub
    id, another model type, a file without the fields), which AutoConfig then reads and checks."""
    cfg = read_json(Path(model.spec) / "config.json") if model.local else None  # unreadable: AutoConfig says why
    if isinstance(cfg, dict) and cfg.get("model_type") in FAST_CONFIG_TYPES and isinstance(cfg.get("vocab_size"), int):
        return {"model_type": cfg["model_type"], "vocab_size": cfg["vocab_size"]}
    return None


def check_model_loads(model: ModelSource) -> dict:
    """Read the config in the driver: a hub id that cannot be reached fails here, once, clearly."""
    if (fast := _local_t5_config(model)) is not None:
        return fast
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model.spec, trust_remote_code=False)
    except (OSError, ValueError) as e:
        where = "" if model.local else (
            " It is not a local directory, so it was looked up on the Hugging Face hub: offline "
            "(HF_HUB_OFFLINE=1 or no network) use a local model directory or a train output instead."
        )
        raise EvalError(f"could not load model config for {model.spec!r}: {e}.{where}") from e
    if not getattr(cfg, "is_encoder_decoder", False):
        raise EvalError(f"{model.spec} is a {cfg.model_type} model; eval needs an encoder-decoder (T5 family)")
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size}


# Keys transformers writes into tokenizer_config.json about where a tokenizer was loaded from, not how it
# encodes (a train output's copy of the data's tokenizer differs from it only there).
LOAD_METADATA_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


def _tokenizer_files(path: Path) -> dict[str, Any]:
    """A tokenizer folder's files: their bytes, tokenizer_config.json as a dict without its load metadata."""
    files: dict[str, Any] = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
    if "tokenizer_config.json" in files:
        cfg = read_json(path / "tokenizer_config.json")
        if isinstance(cfg, dict):
            files["tokenizer_config.json"] = {k: v for k, v in cfg.items() if k not in LOAD_METADATA_KEYS}
    return files


def same_tokenizer_files(a: str, b: str) -> bool:
    """Two local tokenizer folders with the same files, byte for byte (tokenizer_config.json up to its load
    metadata), encode alike: no need to load both (AutoTokenizer imports transformers and torch in the
    driver, ~3 s before Ray can start). False whenever unsure: the caller then encodes a probe with both."""
    pa, pb = Path(a), Path(b)
    if not (pa.is_dir() and pb.is_dir()):
        return False
    files = _tokenizer_files(pa)
    return bool(files) and files == _tokenizer_files(pb)


def check_tokenizers_agree(model_tok_spec: str, data: str | None) -> None:
    """The data's input_ids were made by <data>/tokenizer; decoding with another one would be garbage."""
    if not data or not has_tokenizer(Path(data) / "tokenizer"):
        return
    data_tok_spec = str(Path(data) / "tokenizer")
    if Path(model_tok_spec).resolve() == Path(data_tok_spec).resolve() or same_tokenizer_files(model_tok_spec, data_tok_spec):
        return
    a = load_tokenizer(model_tok_spec)(TOKENIZER_PROBE)["input_ids"]
    b = load_tokenizer(data_tok_spec)(TOKENIZER_PROBE)["input_ids"]
    if list(a) != list(b):
        raise EvalError(
            f"the model's tokenizer ({model_tok_spec}) and the data's ({data_tok_spec}) encode text differently: "
            f"the data was tokenized for another model. Re-run the pipeline with this model's tokenizer."
        )


@dataclass
class Split:
    """The rows to evaluate, read once in the driver; every check and bound comes from this table."""

    path: str
    table: Any  # pyarrow.Table: question, answer, regime, module, input_ids, labels
    max_label_len: int
    max_token_id: int

    @property
    def rows(self) -> int:
        return self.table.num_rows


def manifest_module(data: str) -> str:
    """The module a pipeline output holds when its rows carry no `module` column: the manifest's
    config.module, or config.modules when that names exactly one; else "unknown"."""
    cfg = (read_json(Path(data) / "manifest.json") or {}).get("config") or {}
    one = cfg.get("module")
    if isinstance(one, str) and one:
        return one
    many = cfg.get("modules")
    if isinstance(many, str) and many and many != "all":
        return many
    if isinstance(many, (list, dict)) and len(many) == 1:
        return str(next(iter(many)))
    return "unknown"


def load_split(data: str, split: str, max_rows: int | None) -> Split:
    """Read the split's columns once (Parquet, in the driver, no Ray); `regime` and `module` filled in
    when the files lack them. DataError for a missing, unreadable or empty split."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = open_split(check_data_dir(data), split, REQUIRED_COLUMNS)
    where = Path(data) / split
    cols = [*REQUIRED_COLUMNS, *(c for c in ("regime", "module") if c in ds.schema.names)]
    try:
        table = ds.head(max_rows, columns=cols) if max_rows else ds.to_table(columns=cols)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{where}: cannot read its Parquet files ({e}); is a file truncated or corrupt?") from e
    if table.num_rows == 0:
        raise DataError(f"{where}: the split has no rows")
    n = table.num_rows
    if "regime" not in table.column_names:
        table = table.append_column("regime", pa.array(["unknown"] * n, pa.string()))
    if "module" not in table.column_names:
        table = table.append_column("module", pa.array([manifest_module(data)] * n, pa.string()))
    for c in ("regime", "module"):  # nulls would group as "None"
        table = table.set_column(table.column_names.index(c), c, pc.fill_null(table[c].cast(pa.string()), "unknown"))
    max_id = max(pc.max(pc.list_flatten(table[c])).as_py() or 0 for c in ("input_ids", "labels"))
    return Split(
        path=str(where),
        table=table,
        max_label_len=int(pc.max(pc.list_value_length(table["labels"])).as_py() or 0),
        max_token_id=int(max_id),
    )
