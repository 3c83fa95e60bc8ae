"""The pipeline stage's config: the `pipeline:` section of a YAML file, every field a CLI flag."""

from __future__ import annotations

import dataclasses
import re

from cluster.config import ConfigError

TRAIN_REGIMES = ("train-easy", "train-medium", "train-hard")
TEST_REGIMES = ("interpolate",)
# Validation is carved from train; past this share it would starve training (and say more about a
# misconfiguration than about the model), so larger requests are an error.
MAX_VALIDATION_SHARE = 0.2


@dataclasses.dataclass
class PipelineConfig:
    source: str = "generate"
    """Where rows come from: `generate` (DeepMind's generator), a local path or URI (s3://, gs://) of a
    Parquet / JSON Lines / Arrow file or folder or the DeepMind v1.0 layout (<regime>/<module>.txt), or
    `hf:<dataset id>[:config]` (the Hugging Face hub; needs network)."""
    output: str = "outputs/data"
    """Output folder: <output>/{train,validation,test}/*.parquet, tokenizer/, rejects/, manifest.json."""
    module: str = "algebra__linear_1d"
    """DeepMind module: what `generate` samples, which v1.0 `<module>.txt` files are read, and which
    answer form is checked."""
    tokenizer: str = "char"
    """`char` (built-in, offline), a Hugging Face tokenizer id (google/flan-t5-large) or a local folder."""
    seed: int = 0
    """Seeds the generator shards and the validation hold-out: same seed + config = byte-identical output."""

    # --- generate ---
    train_rows_per_regime: int = 20_000
    """Rows generated for each of train-easy / train-medium / train-hard (real dataset: 666,666)."""
    test_rows: int = 2_000
    """Rows generated for the test regime `interpolate` (real dataset: 10,000)."""
    rows_per_shard: int = 5_000
    """Rows per generator task. Part of the data's identity: each shard has its own seed."""

    # --- validation hold-out ---
    validation_size: float = 0.01
    """Validation rows carved from train: < 1 is a fraction, >= 1 a row count (the expected count: rows
    are held out by a seeded hash of the question, so equal questions never straddle train/validation)."""

    # --- validation of rows ---
    max_input_tokens: int = 256
    """Rows whose question encodes to more tokens (eos included) are rejected (input_too_long)."""
    max_label_tokens: int = 64
    """Rows whose answer encodes to more tokens (eos included) are rejected (labels_too_long)."""
    max_text_chars: int = 2_000
    """Question or answer longer than this (characters) is rejected before tokenizing (text_too_long):
    the generator caps questions at 160 characters, so a 1 MB line is corrupt input, not data."""
    answer_pattern: str = "auto"
    """Regex a (cleaned) answer must match in full, else it is rejected (answer_form). `auto`: the
    module's known form (an integer for algebra__linear_1d), `none`: no check."""
    strict: bool = False
    """Fail on the first reject class instead of writing rejects to <output>/rejects/."""

    # --- execution ---
    batch_size: int = 8_192
    """Rows per Ray Data batch (clean + tokenize)."""
    tokenize_workers: int = 0
    """Tokenizer actors (each loads the tokenizer once). 0 = auto: half the cluster's CPUs, leaving the
    rest to the read/generate tasks (an actor pool holding every CPU starves them: shared/NOTES.md)."""
    rows_per_file: int = 500_000
    """Rows per output Parquet file."""

    push_to_hub: str | None = None
    """After writing, upload <output> to this hub dataset repo (token only from $HF_TOKEN)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("pipeline.source must not be empty (e.g. `generate` or a path)")
        if not self.output:
            raise ConfigError("pipeline.output must not be empty")
        for name in ("train_rows_per_regime", "test_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pipeline.{name} must be >= 0, got {getattr(self, name)}")
        if self.source == "generate" and self.train_rows_per_regime + self.test_rows == 0:
            raise ConfigError("pipeline: source=generate with 0 rows: set train_rows_per_regime or test_rows")
        for name in ("rows_per_shard", "batch_size", "rows_per_file", "max_input_tokens", "max_label_tokens",
                     "max_text_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pipeline.{name} must be >= 1, got {getattr(self, name)}")
        if self.tokenize_workers < 0:
            raise ConfigError("pipeline.tokenize_workers must be >= 0 (0 = auto)")
        if self.validation_size < 0:
            raise ConfigError("pipeline.validation_size must be >= 0")
        if 0 < self.validation_size < 1 and self.validation_size > MAX_VALIDATION_SHARE:
            raise ConfigError(
                f"pipeline.validation_size={self.validation_size} holds out more than "
                f"{MAX_VALIDATION_SHARE:.0%} of train; use a smaller fraction or a row count"
            )
        if self.validation_size >= 1 and not float(self.validation_size).is_integer():
            raise ConfigError("pipeline.validation_size >= 1 is a row count and must be a whole number")
        if self.source == "generate" and self.validation_size >= 1:
            train = 3 * self.train_rows_per_regime
            if self.validation_size > MAX_VALIDATION_SHARE * train:
                raise ConfigError(
                    f"pipeline.validation_size={int(self.validation_size)} is more than "
                    f"{MAX_VALIDATION_SHARE:.0%} of the {train} generated train rows"
                )
        if self.answer_pattern not in ("auto", "none"):
            try:
                re.compile(self.answer_pattern)
            except re.error as e:
                raise ConfigError(f"pipeline.answer_pattern is not a valid regex: {e}") from e
        if self.push_to_hub is not None and "/" not in self.push_to_hub:
            raise ConfigError(f"pipeline.push_to_hub must be a repo id like 'user/name', got {self.push_to_hub!r}")


# Answer forms of modules we know (DeepMind's linear equations have integer solutions).
ANSWER_PATTERNS = {
    "algebra__linear_1d": r"-?\d+",
    "algebra__linear_1d_composed": r"-?\d+",
    "algebra__linear_2d": r"-?\d+",
    "algebra__linear_2d_composed": r"-?\d+",
}


def answer_regex(cfg: PipelineConfig) -> str | None:
    if cfg.answer_pattern == "none":
        return None
    if cfg.answer_pattern == "auto":
        return ANSWER_PATTERNS.get(cfg.module)
    return cfg.answer_pattern
