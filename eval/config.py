"""The `eval:` section: what to evaluate, on which rows, and how the actor pool is sized."""

from __future__ import annotations

import dataclasses

from cluster.config import ConfigError
from eval.metrics import COLLAPSE_SHARE


@dataclasses.dataclass
class EvalConfig:
    output: str = ""
    """Directory for predictions.parquet, metrics.json and report.md (created)."""
    model: str | None = None
    """A train output (<out>, whose <out>/final is used), a local Hugging Face model directory, or a hub id
    such as google/flan-t5-large (needs network or a filled HF cache)."""
    data: str | None = None
    """Pipeline output directory (<data>/<split>/*.parquet, <data>/tokenizer/)."""
    split: str = "test"
    """Which split of the pipeline output to evaluate (train, validation, test)."""
    predictions: str | None = None
    """Score an existing Parquet file of predictions (columns answer, prediction; optional question,
    regime, module) instead of running a model: for models evaluated elsewhere."""
    tokenizer: str | None = None
    """Tokenizer for decoding: default the model directory's own, else <data>/tokenizer."""
    max_rows: int | None = None
    """Evaluate only the first N rows of the split (smoke runs)."""
    batch_size: int = 64
    """Rows per generate() call."""
    sort_window: int = 512
    """Rows handed to an actor at once; they are sorted by question length and cut into batch_size
    chunks, so each generate() call pads to similar lengths (no global shuffle needed). Capped at
    rows/8 (but >= batch_size) so a small split still gives every actor work."""
    max_new_tokens: int | None = None
    """Upper bound on generated tokens. Generation never runs past the longest label in the split plus
    max_new_tokens_slack (an answer longer than every gold one is wrong either way, and is still seen as
    longer instead of being truncated into a match); this caps it further when smaller."""
    max_new_tokens_slack: int = 4
    """Tokens allowed beyond the longest label of the split."""
    teacher_forced: bool = True
    """Also compute teacher-forced exact match (argmax of the logits given the gold labels): the seed
    project's published metric. One extra decoder pass per batch; the encoder output is shared."""
    num_actors: int | None = None
    """A fixed number of predictor actors (each loads the model once). Default: an autoscaling pool of 1 to
    max_actors actors, which grows as nodes join (a cluster scaling up from zero GPUs still spreads the
    work) and while free CPUs / GPUs allow."""
    max_actors: int = 8
    """Largest autoscaling pool (when num_actors is not set); one actor per GPU, so e.g. 8 for one 8-GPU
    node. Never more actors than blocks of sort_window rows."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves (the rows are read by the driver, so actors may take every CPU)."""
    gpus_per_actor: float | None = None
    """GPUs per actor. Default: 1 when the cluster has GPUs when eval starts, else 0; set it to 1 on an
    autoscaling cluster whose GPU nodes start on demand. On GPU the model runs in bf16."""
    torch_threads: int | None = None
    """Intra-op threads per actor on CPU. Default: max(1, int(cpus_per_actor))."""
    collapse_share: float = COLLAPSE_SHARE
    """Report a collapsed model when one prediction covers at least this share of the rows (of >= 50) and
    is the gold answer of at least this share fewer (checked overall and per module)."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("eval.output is required (--output DIR)")
        if self.predictions and self.model:
            raise ConfigError("eval: give either --predictions FILE or --model MODEL, not both")
        if not self.predictions:
            if not self.model:
                raise ConfigError("eval: --model MODEL (or --predictions FILE) is required")
            if not self.data:
                raise ConfigError("eval: --data DIR (a pipeline output) is required with --model")
        for name in ("batch_size", "sort_window", "max_actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.sort_window < self.batch_size:
            raise ConfigError(
                f"eval.sort_window ({self.sort_window}) must be >= eval.batch_size ({self.batch_size})"
            )
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"eval.max_rows must be >= 1, got {self.max_rows}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"eval.num_actors must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor <= 0 and not self.gpus_per_actor:
            raise ConfigError("eval.cpus_per_actor must be > 0 on CPU")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError("eval.gpus_per_actor must be >= 0")
        if not 0 < self.collapse_share <= 1:
            raise ConfigError(f"eval.collapse_share must be in (0, 1], got {self.collapse_share}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("eval.torch_threads must be >= 1")
