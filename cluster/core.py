"""The shared core every stage imports (stages never import each other's internals):

- the user-error family (one class per kind of thing a user can get wrong; every entry point prints one
  `error: ...` line and exits 2 for any of them),
- atomic writes and writability probes,
- the data contract (the pipeline's Parquet output, as train and eval read it),
- model-folder checks, tokenizer loading (the built-in char tokenizer or any Hugging Face one),
- padding and the label pad value.

Kept free of Ray and torch at import time: the driver-side checks run before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

# ---------------------------------------------------------------------------------------------------
# User errors. Every class is "something the user must fix": its message is one line naming what and
# why. Entry points catch UserError (cluster.config.run_cli) and print `error: <message>`, exit code 2.
# The ValueError / RuntimeError bases keep `except ValueError` callers (and older tests) working.


class UserError(Exception):
    """Base of every error a user can cause (config, source, data, model, output, resources, checkpoints)."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and why."""


class SourceError(UserError, ValueError):
    """The pipeline's source is missing, unreadable or not in a known format."""


class DataError(UserError, ValueError):
    """A pipeline output (train/eval input) is missing, incomplete or not in the contract's format."""


class OutputError(UserError, ValueError):
    """An output folder cannot be used (not writable, holds something else)."""


class RejectError(UserError, ValueError):
    """--strict: the first class of rejected rows, with an example."""


class ModelError(UserError, ValueError):
    """A model spec, folder or tokenizer that cannot be used; the message says what is missing."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is torn, incomplete or from another model."""


class ResourceError(UserError, RuntimeError):
    """The cluster cannot provide what the job asks for (now, or within the configured wait)."""


class DivergedError(UserError, RuntimeError):
    """Training's loss or gradient norm became NaN/inf: the recipe (LR, warmup, precision) must change."""


def find_user_error(e: BaseException) -> UserError | None:
    """Our own error in an exception's chain, unwrapped from Ray's task/actor wrappers (whose str() adds
    a remote traceback and retry advice), reduced to its first line. None if there is none."""
    seen, todo, found = set(), [e], []
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, UserError):
            found.append(x)
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    if not found:
        return None
    # Prefer the original instance (Ray keeps it as .cause) over RayTaskError(SourceError), whose type is
    # a dynamic subclass; keep the first line: Ray appends its advice below our one-line message.
    x = next((x for x in found if type(x).__module__ == __name__), found[0])
    cls = next(c for c in type(x).__mro__ if c.__module__ == __name__ and issubclass(c, UserError))
    return cls(str(x).strip().splitlines()[0] if str(x).strip() else type(x).__name__)


# ---------------------------------------------------------------------------------------------------
# Files


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write-then-rename (fsynced): a reader, or a crash, never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, obj: dict[str, Any]) -> None:
    """One JSON line appended (a log that runs and restarts add to: metrics.jsonl, stages.jsonl)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The lines `append_jsonl` wrote, as dicts ([] for a missing file); a line torn by a process killed
    mid-write (or anything that is not a JSON object) is skipped, not fatal."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: str | Path) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (a torn write, another tool's file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def check_writable(path: str | Path, what: str) -> Path | str:
    """Create `path` if needed and prove a file can be written there; OutputError naming `what` if not.
    Remote URIs (s3://, gs://) are returned as they are: Ray checks those when it first writes."""
    if "://" in str(path):
        return str(path)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} exists and is a file; choose a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{what} {p} is not writable ({e.strerror or e}); choose another folder") from e
    return p


# ---------------------------------------------------------------------------------------------------
# The data contract: what the pipeline writes under <data>/{train,validation,test}/*.parquet and what
# train and eval read. Token ids are stored unpadded; padding is the collator's job.

SPLITS = ("train", "validation", "test")
DATA_SCHEMA = pa.schema([
    ("question", pa.string()), ("answer", pa.string()), ("regime", pa.string()), ("module", pa.string()),
    ("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
])
REJECT_SCHEMA = pa.schema([
    ("split", pa.string()), ("regime", pa.string()), ("module", pa.string()), ("reason", pa.string()),
    ("question", pa.string()), ("answer", pa.string()),  # the original text, as read
])
TOKEN_COLUMNS = ("input_ids", "labels")


def check_data_dir(data: str | Path) -> Path:
    """A pipeline output folder; refuses a missing one and one whose manifest says it did not finish."""
    if not str(data):
        raise ConfigError("a data directory is required: the pipeline output (--data DIR)")
    d = Path(data)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist (run the pipeline first: python -m pipeline)")
    manifest = d / "manifest.json"
    if manifest.is_file() and (read_json(manifest) or {}).get("complete") is not True:
        raise DataError(f"{manifest} does not say complete: the pipeline run that wrote {d} did not finish")
    return d


def open_split(data: str | Path, split: str, columns: Sequence[str]):
    """The split's Parquet files as a pyarrow dataset, its schema checked against the contract.
    Driver-side metadata only (footers): no Ray Data job, which costs seconds of start-up per use."""
    import pyarrow.dataset as pads

    where = Path(data) / split
    files = sorted(str(p) for p in where.glob("*.parquet")) if where.is_dir() else []
    if not files:
        have = sorted(p.name for p in Path(data).iterdir() if p.is_dir()) if Path(data).is_dir() else []
        raise DataError(f"{where} holds no .parquet files (expected the pipeline's {split} split; "
                        f"splits found: {have or 'none'})")
    try:
        ds = pads.dataset(files, format="parquet")
        schema = ds.schema
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{where}: cannot read its Parquet files ({e}); is a file truncated or corrupt?") from e
    names = set(schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{where} lacks column(s) {missing}; it has {sorted(names)} (see the pipeline's "
                        f"output format: {', '.join(DATA_SCHEMA.names)})")
    for c in TOKEN_COLUMNS:
        if c in names:
            t = schema.field(c).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                raise DataError(f"{where}: column {c} must be a list of token ids, got {t}")
    return ds


# ---------------------------------------------------------------------------------------------------
# Models and tokenizers

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def is_local_spec(spec: str) -> bool:
    """A path rather than a hub id: starts like a path, exists, or has more than one '/'."""
    return spec.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(spec)) or spec.count("/") > 1


def check_model_dir(path: str | Path) -> Path:
    """A local model folder must hold a valid config.json and safetensors weights (we never unpickle)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise ModelError(f"model {p} is a file; expected a model directory (config.json + model.safetensors)")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").is_file():
        bins = sorted(f.name for f in p.glob("*.bin"))
        missing.append(f"model.safetensors (only a pickle {bins} is there: only safetensors weights are loaded, "
                       "we never unpickle weights (a pickle can run code); convert it)" if bins else "model.safetensors")
    if missing:
        present = sorted(x.name for x in p.iterdir())
        raise ModelError(f"model directory {p} is incomplete: missing {', '.join(missing)} (it has: "
                         f"{present or 'nothing'}). Point at a train output (<out> or <out>/final) or a "
                         "save_pretrained() folder.")
    if read_json(p / "config.json") is None:
        raise ModelError(f"{p / 'config.json'} is not valid JSON")
    return p


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


CHAR_TOKENIZER = "char"
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's layout
# Printable ASCII is the DeepMind dataset's whole alphabet; anything else maps to <unk> (and the
# pipeline rejects rows that would contain one, so no training target is silently corrupted).
ALPHABET = [chr(c) for c in range(32, 127)]
CHAR_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET)


def build_char_tokenizer():
    """The built-in char-level tokenizer with T5's special tokens (pad 0, eos 1, unk 2; `</s>` appended),
    so the same collator, model config and decoding serve it and flan-t5's SentencePiece one. A plain
    `tokenizers` WordLevel model in PreTrainedTokenizerFast, saved as standard files: AutoTokenizer loads
    it anywhere without this code. Ids depend only on ALPHABET's order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character, spaces included (the default whitespace pre-tokenizers would drop them).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512, padding_side="right")


def load_tokenizer(spec: str):
    """`char` -> the built-in one; anything else -> AutoTokenizer (a local folder or a hub id).
    Never trust_remote_code: a tokenizer that needs custom code is refused by transformers itself."""
    if spec == CHAR_TOKENIZER:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(spec), trust_remote_code=False)
    except (OSError, ValueError) as e:
        offline = "" if is_local_spec(spec) else (
            " It is not a local folder, so it was looked up on the Hugging Face hub; offline, use "
            "`char` or a local folder with tokenizer files (e.g. a pipeline output's tokenizer/).")
        raise ModelError(f"could not load tokenizer {spec!r}: {str(e).splitlines()[0]}.{offline}") from e


def tokenizer_identity(tokenizer, spec: str) -> dict:
    return {"spec": spec, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "unk_token_id": tokenizer.unk_token_id}


# ---------------------------------------------------------------------------------------------------
# Pushing to the Hugging Face hub (pipeline output as a dataset repo, a trained model as a model repo).
# The token is read from $HF_TOKEN only and handed to huggingface_hub: never a flag, never logged or saved.

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_repo_id(repo: str, key: str = "--push-to-hub") -> None:
    if not HUB_REPO_ID.match(repo):
        raise ConfigError(f"{key} must be a hub repo id like 'user/name', got {repo!r}")


def check_push(repo: str | None) -> None:
    """Refuse a push that cannot work, before any work: a malformed repo id or no $HF_TOKEN."""
    if not repo:
        return
    check_repo_id(repo)
    if not os.environ.get("HF_TOKEN"):
        raise ConfigError("--push-to-hub needs a Hugging Face token in the HF_TOKEN environment variable "
                          "(never as a flag or config key)")


def push_folder(folder: str | Path, repo: str, repo_type: str, message: str) -> str:
    """Upload `folder` to a private hub repo of `repo_type` ("model" / "dataset"); the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, repo_type=repo_type, private=True, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type, commit_message=message)
    print(f"pushed {folder} to the hub {repo_type} {repo}", flush=True)
    return str(getattr(info, "commit_url", repo))


# ---------------------------------------------------------------------------------------------------
# Padding

IGNORE_INDEX = -100  # the label value CrossEntropyLoss ignores: padding never counts in the loss


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class FlatRows:
    """Token rows as slices of one flat array (row i: values[starts[i]:starts[i] + lengths[i]]), as the
    training data is held in memory: pad_2d pads them in a few numpy ops, with no Python step per row."""

    values: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def pad_2d(rows: Sequence[Sequence[int]] | FlatRows, pad_value: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to the longest (rounded up to `multiple`): (ids, mask) int64 arrays.
    The mask comes from the lengths, not from `!= pad`: a tokenizer may use the pad id inside a row."""
    if len(rows) == 0:
        raise ValueError("cannot pad an empty batch")
    if not isinstance(rows, FlatRows):
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        rows = FlatRows(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]), np.cumsum(lengths) - lengths,
                        lengths)
    if rows.lengths.min() == 0:
        raise ValueError("a row has an empty token list (every sequence must end with eos)")
    pos = np.arange(round_up(int(rows.lengths.max()), multiple))
    mask = pos[None, :] < rows.lengths[:, None]
    gather = np.minimum(rows.starts[:, None] + pos[None, :], len(rows.values) - 1)  # past a row's end: masked
    return np.where(mask, rows.values[gather], pad_value).astype(np.int64), mask.astype(np.int64)
