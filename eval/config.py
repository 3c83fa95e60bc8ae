"""The `eval:` section: what to evaluate, on which rows, and how the actor pool is sized."""

from __future__ import annotations

import dataclasses

from cluster.config import ConfigError


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
    regime) instead of running a model: for models evaluated elsewhere."""
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
    """Generation budget. Default: the longest label in the split plus max_new_tokens_slack, so an answer
    longer than every gold one is seen as longer instead of being truncated into a match."""
    max_new_tokens_slack: int = 4
    """Tokens added to the longest label length when max_new_tokens is derived."""
    teacher_forced: bool = True
    """Also compute teacher-forced exact match (argmax of the logits given the gold labels): the seed
    project's published metric. One extra decoder pass per batch; the encoder output is shared."""
    num_actors: int | None = None
    """Predictor actors (each loads the model once). Default: one per GPU when GPUs are present, else 1."""
    cpus_per_actor: float = 1.0
    """Logical CPUs each actor reserves. Keep num_actors * cpus_per_actor below the cluster's CPUs: the
    Parquet read tasks need a slot too, or nothing progresses (measured on 2 cores, shared/NOTES.md)."""
    gpus_per_actor: float | None = None
    """GPUs per actor. Default: 1 when the cluster has GPUs, else 0. On GPU the model runs in bf16."""
    torch_threads: int | None = None
    """Intra-op threads per actor on CPU. Default: max(1, int(cpus_per_actor))."""
    max_actor_restarts: int = 3
    """Ray restarts a dead predictor actor this many times and retries its batch (no row lost or
    duplicated); bounded so a model that always crashes fails the job instead of looping."""

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
        for name in ("batch_size", "sort_window", "max_actor_restarts"):
            if getattr(self, name) < (0 if name == "max_actor_restarts" else 1):
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
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError("eval.torch_threads must be >= 1")
