"""The pipeline stage's config: the `pipeline:` section of a YAML file, every field a CLI flag."""

from __future__ import annotations

import dataclasses
import re

from cluster.config import ConfigError
from cluster.core import check_repo_id
from pipeline.answers import EXTRAPOLATE, MODULES

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
    modules: list[str] = dataclasses.field(default_factory=lambda: ["algebra__linear_1d"])
    """DeepMind module(s): one (`algebra__linear_1d`), a list (YAML list or `a,b` on the command line), or
    `all` (every module of the generator). What `generate` samples, which v1.0 `<regime>/<module>.txt`
    files and hub configs are read; each row keeps its `module` and is checked against its answer form."""
    module_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Mixing weights for `generate` (a YAML mapping module -> weight, default 1 each): a module generates
    round(weight * train_rows_per_regime) rows per train regime. Test sets are not weighted."""
    tokenizer: str = "char"
    """`char` (built-in, offline), a Hugging Face tokenizer id (google/flan-t5-large) or a local folder."""
    seed: int = 0
    """Seeds the generator shards and the validation hold-out: same seed + config = byte-identical output."""

    # --- generate ---
    train_rows_per_regime: int = 20_000
    """Rows generated per module for each of train-easy / train-medium / train-hard (real: 666,666)."""
    test_rows: int = 2_000
    """Rows generated per module for the test regime `interpolate` (real dataset: 10,000)."""
    extrapolate_rows: int | None = None
    """Rows generated per module for the test regime `extrapolate`, for the modules the generator has an
    extrapolation set for (e.g. arithmetic__add_or_sub -> arithmetic__add_or_sub_big). Default: test_rows;
    0: none."""
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
    """Worker actors, each reading/generating, cleaning, tokenizing and writing whole units (one actor pool,
    so this is the job's whole parallelism). 0 = auto: every CPU of the cluster but one, left to the driver
    (Ray Data's executor; measured on the 16-CPU GPU node: the old "half the CPUs" default generated the
    2M rows at 6.2k rows/s on 8 of its 16 cores)."""
    rows_per_file: int = 500_000
    """Rows per output Parquet file."""

    push_to_hub: str | None = None
    """After writing, upload <output> to this hub dataset repo (token only from $HF_TOKEN)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("pipeline.source must not be empty (e.g. `generate` or a path)")
        if not self.output:
            raise ConfigError("pipeline.output must not be empty")
        if isinstance(self.modules, str):
            self.modules = [m for m in self.modules.split(",") if m]
        self.modules = [m.strip() for m in self.modules]
        if not self.modules:
            raise ConfigError("pipeline.modules must name at least one module, or `all`")
        if "all" in self.modules and len(self.modules) > 1:
            raise ConfigError("pipeline.modules: `all` cannot be combined with module names")
        if len(set(self.modules)) != len(self.modules):
            raise ConfigError(f"pipeline.modules lists a module twice: {self.modules}")
        if self.source == "generate":
            unknown = [m for m in self.modules if m != "all" and m not in MODULES]
            if unknown:
                import difflib

                hints = [h for m in unknown for h in difflib.get_close_matches(m, MODULES, n=2)]
                raise ConfigError(f"pipeline.modules: the generator has no module {unknown}"
                                  + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                                  + f"; it has {len(MODULES)}, listed in pipeline/answers.py, or use `all`")
        if self.module_weights:
            if self.source != "generate":
                raise ConfigError("pipeline.module_weights applies to source=generate only: a file source is "
                                  "read in full (subsample the files to mix them differently)")
            chosen = self.module_list()
            stray = sorted(set(self.module_weights) - set(chosen))
            if stray:
                raise ConfigError(f"pipeline.module_weights names module(s) not in pipeline.modules: {stray}")
            for m, w in self.module_weights.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                    raise ConfigError(f"pipeline.module_weights.{m} must be a number >= 0, got {w!r}")
        for name in ("train_rows_per_regime", "test_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pipeline.{name} must be >= 0, got {getattr(self, name)}")
        if self.extrapolate_rows is not None and self.extrapolate_rows < 0:
            raise ConfigError(f"pipeline.extrapolate_rows must be >= 0, got {self.extrapolate_rows}")
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
            train = 3 * sum(self.train_rows(m) for m in self.module_list())
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
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub, "pipeline.push_to_hub")


    def module_list(self) -> list[str]:
        """The modules named, `all` expanded to the generator's (for a file source: see sources.find_units)."""
        return list(MODULES) if self.modules == ["all"] else list(self.modules)

    def train_rows(self, module: str) -> int:
        """Rows `generate` samples of `module` per train regime (its mixing weight applied)."""
        return round(self.train_rows_per_regime * float(self.module_weights.get(module, 1.0)))

    def test_units(self, module: str) -> list[tuple[str, str, int]]:
        """(regime, generator module, rows) of `module`'s test sets: interpolate, and extrapolate where the
        generator has one."""
        out = [("interpolate", module, self.test_rows)]
        extra = self.test_rows if self.extrapolate_rows is None else self.extrapolate_rows
        if module in EXTRAPOLATE and extra:
            out.append(("extrapolate", EXTRAPOLATE[module], extra))
        return out
