"""Find what eval needs before any actor starts, and refuse clearly when it is not there.

Everything here runs in the driver and is cheap (file checks, Parquet metadata, one column read), so a
missing weight file or a misnamed column is one clear line, not a traceback from deep inside a Ray actor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cluster.core import UserError, check_model_dir, has_tokenizer, load_tokenizer

log = logging.getLogger("mathtune.eval")

REQUIRED_COLUMNS = ("question", "answer", "input_ids", "labels")
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
    if path.exists():
        if not path.is_dir():
            raise EvalError(f"model {spec!r} is a file; expected a model directory (config.json + weights)")
        if (path / "final").is_dir() and not (path / "config.json").exists():
            path = path / "final"  # a train output directory
        check_model_dir(path)
        train_dir = path.parent if (path.parent / "metrics.jsonl").is_file() else None
        return ModelSource(str(path), True, train_dir)
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1:
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


def load_model(spec: str, dtype=None):
    """Weights from safetensors only (use_safetensors=True never falls back to a pickle)."""
    from transformers import AutoModelForSeq2SeqLM

    try:
        return AutoModelForSeq2SeqLM.from_pretrained(
            spec, use_safetensors=True, dtype=dtype, trust_remote_code=False
        )
    except OSError as e:
        hint = (
            " Offline (HF_HUB_OFFLINE=1 or no network)? Download it where there is network and pass the local "
            "directory, or evaluate a train output."
            if not Path(spec).exists()
            else ""
        )
        raise EvalError(f"could not load model {spec!r}: {e}.{hint}") from e


def check_model_loads(model: ModelSource) -> dict:
    """Read the config in the driver: a hub id that cannot be reached fails here, once, clearly."""
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


def check_tokenizers_agree(model_tok_spec: str, data: str | None) -> None:
    """The data's input_ids were made by <data>/tokenizer; decoding with another one would be garbage."""
    if not data or not has_tokenizer(Path(data) / "tokenizer"):
        return
    data_tok_spec = str(Path(data) / "tokenizer")
    if Path(model_tok_spec).resolve() == Path(data_tok_spec).resolve():
        return
    a = load_tokenizer(model_tok_spec)(TOKENIZER_PROBE)["input_ids"]
    b = load_tokenizer(data_tok_spec)(TOKENIZER_PROBE)["input_ids"]
    if list(a) != list(b):
        raise EvalError(
            f"the model's tokenizer ({model_tok_spec}) and the data's ({data_tok_spec}) encode text differently: "
            f"the data was tokenized for another model. Re-run the pipeline with this model's tokenizer."
        )


@dataclass
class SplitInfo:
    path: str
    files: list[str]
    rows: int
    max_label_len: int
    max_token_id: int
    has_regime: bool


def inspect_split(data: str, split: str, max_rows: int | None) -> SplitInfo:
    """Files, row count (Parquet metadata), longest label and largest token id of a pipeline split."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    root = Path(data)
    if not root.is_dir():
        raise EvalError(f"data directory not found: {data}")
    split_dir = root / split
    files = sorted(str(p) for p in split_dir.glob("*.parquet")) if split_dir.is_dir() else []
    if not files:
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise EvalError(f"no Parquet files in {split_dir} (splits found in {data}: {have or 'none'})")
    try:
        ds = pads.dataset(files, format="parquet")
        schema = ds.schema
    except (pa.ArrowInvalid, OSError) as e:
        raise EvalError(f"{split_dir}: unreadable Parquet: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise EvalError(
            f"{split_dir}: missing column(s) {missing}; has {schema.names}. Expected the pipeline's output "
            f"format ({', '.join(REQUIRED_COLUMNS)}, regime)."
        )
    for col in ("input_ids", "labels"):
        if not pa.types.is_list(schema.field(col).type) and not pa.types.is_large_list(schema.field(col).type):
            raise EvalError(f"{split_dir}: column {col} must be list<int>, got {schema.field(col).type}")
    try:
        table = ds.to_table(columns=["input_ids", "labels"])
    except (pa.ArrowInvalid, OSError) as e:
        raise EvalError(f"{split_dir}: unreadable Parquet: {e}") from e
    if max_rows is not None:
        table = table.slice(0, max_rows)
    if table.num_rows == 0:
        raise EvalError(f"{split_dir}: the split has no rows")
    label_lens = pc.list_value_length(table["labels"])
    max_id = max(pc.max(pc.list_flatten(table[c])).as_py() or 0 for c in ("input_ids", "labels"))
    return SplitInfo(
        path=str(split_dir),
        files=files,
        rows=table.num_rows,
        max_label_len=int(pc.max(label_lens).as_py()),
        max_token_id=int(max_id),
        has_regime="regime" in schema.names,
    )
