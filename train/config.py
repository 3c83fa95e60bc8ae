"""TrainConfig: everything `python -m train` does, one typed field each (the `train:` YAML section).

Contradictions are rejected in `__post_init__`, before Ray starts. The batch is stated *globally*
(`global_batch_size`); per-worker micro batch and gradient accumulation are derived from it, so a run
means the same thing on 2 CPU workers and on 8 GPUs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from cluster.config import ConfigError


@dataclasses.dataclass
class TrainConfig:
    # --- data & outputs ---
    data: str = ""
    """Pipeline output directory (<data>/{train,validation}/*.parquet, <data>/tokenizer/). Required."""
    output: str = "outputs/train"
    """Where final/, summary.json and metrics.jsonl go. Must be writable by the rank-0 worker."""
    tokenizer: str | None = None
    """Tokenizer dir or hub id. Default: <data>/tokenizer (the one the data was tokenized with)."""

    # --- model ---
    model: str = "t5-tiny"
    """A named tiny T5 built from scratch (t5-tiny, t5-mini, t5-small-scratch) or a hub id / local
    directory of a T5 checkpoint (e.g. google/flan-t5-large). Weights load from safetensors only."""
    dropout: float | None = None
    """Override the model's dropout rate (default: 0.0 for from-scratch tiny models, checkpoint's own)."""
    precision: Literal["bf16-mixed", "bf16", "fp32"] = "bf16-mixed"
    """bf16-mixed: fp32 master weights + bf16 autocast. bf16: weights in bf16. fp32: debugging."""

    # --- optimization ---
    global_batch_size: int = 128
    """Sequences per optimizer step, summed over all workers and accumulation steps."""
    micro_batch_size: int | Literal["auto"] | None = None
    """Sequences per forward pass per worker (the rest of global_batch_size / num_workers is gradient
    accumulation). Default global_batch_size / num_workers (no accumulation). "auto" (or 0): the memory
    planner's choice at run time, on each worker's free GPU memory (torch.cuda.mem_get_info, the smallest
    over the workers): the largest divisor of the per-worker batch, a multiple of 8, whose estimate for
    plan_source_len x plan_target_len tokens fits with a 10% margin (`python -m train plan` shows the
    choice per card); on CPU the largest such divisor up to 32. A resumed run keeps its checkpoint's."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw: torch's AdamW (fused on GPUs). adafactor: transformers' Adafactor, the optimizer T5 was
    trained with (Hugging Face Trainer's `optim="adafactor"`), each step relative to its tensor's RMS
    (scale_parameter) under this LR schedule (relative_step off); no momentum, factored second moments.
    T5 folds attention's 1/sqrt(d) into its q weights' init (std (d_model*d_kv)**-0.5, 0.0055 for
    t5-small-scratch) and draws embeddings at std 1, so AdamW's step (~lr per element) is ~18% of q's
    scale and 0.1% of the embeddings' at lr 1e-3; Adafactor's is lr x each tensor's own scale. Typical lr:
    ~1e-2 from scratch, ~1e-3 fine-tuning. It reads each tensor's RMS on the host (one sync per tensor per
    step). Not with FSDP: its factored statistics are not written for sharded tensors."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The LR decays linearly from lr to lr * min_lr_ratio at max_steps."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay (the names are Hugging Face TrainingArguments')."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay. 0.999 (PyTorch's and Hugging Face's default) averages the squared
    gradients over ~1,000 steps: after a long plateau of small gradients, a sudden rise makes updates many
    times the LR. 0.95 (GPT-3, LLaMA, nanoGPT) adapts within ~20 steps: the usual fix for such loss spikes
    when training from scratch (configs/speedrun.yaml)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    max_steps: int | None = 600
    """Optimizer steps to train. Exactly one of max_steps / epochs."""
    epochs: float | None = None
    """Passes over the train split (converted to steps from the split's row count)."""
    max_time_s: float | None = None
    """A time budget (Lightning's `max_time`): end the run once this many seconds of training steps are
    spent (data waits included; start-up, validation and checkpoints not), even before max_steps / epochs,
    which then only cap it. At every log interval the step where the budget runs out is estimated anew
    from rank 0's mean step time, each start's first step left out (so every worker stops at the same
    step), and the LR decay ends there. A
    resumed run counts the time already trained. The step count then depends on the machine's speed."""
    seed: int = 0
    """Model init, data order (with the same worker count) and dropout (seed + rank on each worker, set
    after the model is built, so every rank starts from the same weights but draws its own dropout masks).
    A resume must use the same seed and worker count (checked)."""
    early_stopping_patience: int | None = None
    """Stop after this many validations in a row without a better score (exact match; validation loss
    breaks ties), and export the best checkpoint as final/. Each improving validation then also writes a
    checkpoint, so the best model is always kept. None: train to max_steps."""
    early_stopping_min_delta: float = 0.0
    """Patience restarts only when a validation's score (exact match, 0..1) beats the best so far by more
    than this (a smaller gain still makes it the best, and its checkpoint is kept)."""

    # --- validation, logging ---
    eval_every: int = 100
    """Validate every N steps (and at the end): loss + exact match by greedy generation."""
    eval_samples: int = 256
    """Validation rows scored per validation, sharded across workers: a fixed subset picked once from the
    seed, each regime (and module) in its share of the validation split, trimmed to a multiple of
    num_workers."""
    eval_batch_size: int = 64
    """Rows per validation forward/generation batch per worker."""
    max_new_tokens: int = 32
    """Greedy decoding length bound during validation; decoding also stops at the longest answer (in
    tokens, eos included) of the validation subset."""
    log_every: int = 20
    """One progress line (and one metrics.jsonl / TensorBoard entry) every N steps."""
    tracking: list[Literal["tensorboard", "mlflow"]] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, written by rank 0. TensorBoard event files go to <output>/tensorboard always
    (`tensorboard --logdir <output>`); add mlflow to also log params and metrics to MLflow (needs the
    `mlflow-skinny` package; logged from a background thread, so a slow server never stalls training)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI (http://host:5000, databricks, or a local folder / file: URI, which works
    offline). Default: the MLFLOW_TRACKING_URI environment variable, else <output>/mlruns."""
    mlflow_experiment: str = "mathtune"
    """MLflow experiment the run is logged under (its run name is run_name)."""

    # --- checkpoints & fault tolerance ---
    ckpt_every: int = 100
    """Checkpoint every N steps (a multiple of eval_every, so each checkpoint has a fresh score)."""
    keep_best_k: int = 2
    """Checkpoints kept, ranked by validation exact match (ties: lower validation loss). Ray also always
    keeps the latest, so resume never goes further back than the last checkpoint."""
    max_failures: int = 1
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    run_name: str = "train"
    """Ray Train run name. Re-running with the same run_name + storage_path resumes."""
    storage_path: str | None = None
    """Ray Train storage (local dir, s3://, gs://). Default: <output>/ray (absolute)."""

    # --- scale ---
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPU (gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves."""
    torch_threads: int | None = None
    """Intra-op threads per worker. Default: cpus_per_worker (rounded), so 2 workers on 2 cores don't
    oversubscribe."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: replicated model. fsdp: torch FSDP2 fully_shard per block (weights, grads and optimizer state
    sharded across workers) for models that don't fit one device."""
    ddp_comm_hook: Literal["bf16"] | None = None
    """DDP gradient compression. bf16: all-reduce gradients in bf16 (half the bytes; torch's
    bf16_compress_hook). For workers on several nodes that talk over TCP; needs GPUs (NCCL) and ddp.
    None: fp32 all-reduce (right inside one NVLink node)."""
    pad_to_multiple_of: int = 8
    """Inputs are padded to the batch's longest question rounded up to a multiple of this (tensor-core
    friendly, few distinct shapes); labels only to the batch's longest answer."""
    compile: bool = False
    """torch.compile each T5 block (encoder and decoder) before wrapping: fewer kernel launches on GPU.
    Dynamic shapes: four graphs compiled in the first step (slower) serve every padded length after it;
    validation runs eager."""
    in_memory_max_mb: float = 256.0
    """A train split whose token columns take at most this many MB (uncompressed, from the Parquet
    footers) is read once by every worker and reshuffled in memory each epoch (a new epoch costs nothing);
    a larger one is streamed through Ray Data with a shuffle buffer. 0 = always stream."""
    length_bucketing: int = 64
    """Length bucketing, as a window in micro batches (0 = off): each window of the epoch's seeded order is
    sorted by padded question length, cut into micro batches, and its micro batches shuffled (seeded), so
    a batch holds questions of one padded length (less padding: +28% samples/s for flan-t5-large at micro
    batch 512 on an H200) while the order of batches, and so of regimes and modules, stays random. A
    resume must use the same value (checked)."""
    shuffle_buffer: int = 4
    """Streamed splits only: local shuffle buffer of each worker, in micro batches (seeded by seed, epoch
    and rank; 0 = read order)."""

    # --- memory planner (python -m train plan) ---
    plan_source_len: int = 128
    """Encoder length (tokens) the planner assumes per sequence: the longest question (eos included) rounded
    up to pad_to_multiple_of, since the micro batch holding the longest questions sets the peak memory."""
    plan_target_len: int = 32
    """Decoder length (tokens) the planner assumes per sequence: the longest answer (eos included)."""

    def __post_init__(self) -> None:
        pos = {
            "global_batch_size": self.global_batch_size, "num_workers": self.num_workers,
            "eval_every": self.eval_every, "eval_batch_size": self.eval_batch_size,
            "max_new_tokens": self.max_new_tokens, "log_every": self.log_every, "ckpt_every": self.ckpt_every,
            "keep_best_k": self.keep_best_k, "pad_to_multiple_of": self.pad_to_multiple_of,
            "plan_source_len": self.plan_source_len, "plan_target_len": self.plan_target_len,
        }
        if self.micro_batch_size == "auto":  # one spelling downstream: 0 = the planner chooses
            self.micro_batch_size = 0
        for k, v in pos.items():
            if v < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {v}")
        if (self.eval_samples < 0 or self.warmup_steps < 0 or self.max_failures < 0 or self.shuffle_buffer < 0
                or self.in_memory_max_mb < 0 or self.length_bucketing < 0):
            raise ConfigError("train.eval_samples, warmup_steps, max_failures, shuffle_buffer, in_memory_max_mb "
                              "and length_bucketing must be >= 0")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ConfigError(f"train.early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
            if self.early_stopping_min_delta < 0:
                raise ConfigError(f"train.early_stopping_min_delta must be >= 0, got {self.early_stopping_min_delta}")
            if not self.eval_samples:
                raise ConfigError("train.early_stopping_patience needs validation: eval_samples is 0")
        unknown = [t for t in self.tracking if t not in ("tensorboard", "mlflow")]
        if unknown:
            raise ConfigError(f"train.tracking: unknown tracker(s) {unknown}; known: tensorboard, mlflow")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"train.adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"train.dropout must be in [0, 1), got {self.dropout}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(
                "train: set exactly one of max_steps and epochs "
                f"(got max_steps={self.max_steps}, epochs={self.epochs}; use --max-steps none to use epochs)"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise ConfigError(f"train.max_time_s must be > 0 seconds, got {self.max_time_s}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})"
            )
        if self.ckpt_every % self.eval_every:
            raise ConfigError(
                f"train.ckpt_every ({self.ckpt_every}) must be a multiple of eval_every ({self.eval_every}): "
                "checkpoints are ranked by the validation score computed at the same step"
            )
        if self.global_batch_size % self.num_workers:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"num_workers ({self.num_workers})"
            )
        per_worker = self.global_batch_size // self.num_workers
        if self.micro_batch_size and (self.micro_batch_size < 1 or per_worker % self.micro_batch_size):
            raise ConfigError(
                f"train.micro_batch_size ({self.micro_batch_size}) must divide the per-worker batch "
                f"global_batch_size / num_workers = {per_worker}"
            )
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"train.torch_threads must be >= 1, got {self.torch_threads}")
        if self.optimizer == "adafactor" and self.strategy == "fsdp":
            raise ConfigError("train.optimizer adafactor does not shard (its factored statistics are per whole "
                              "tensor): use strategy ddp, or optimizer adamw with fsdp")
        if self.strategy == "fsdp" and self.num_workers < 2:
            raise ConfigError("train.strategy fsdp shards across workers: it needs num_workers >= 2")
        if self.ddp_comm_hook is not None and (self.strategy != "ddp" or not self.use_gpu):
            raise ConfigError(
                f"train.ddp_comm_hook {self.ddp_comm_hook} compresses DDP's NCCL all-reduce: it needs strategy ddp "
                f"and use_gpu true (got strategy {self.strategy}, use_gpu {self.use_gpu}; torch refuses it on gloo)"
            )
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"train.run_name must be a non-empty name without '/', got {self.run_name!r}")

    # Derived quantities: one place, so the loop, the planner and the bench agree.
    @property
    def per_worker_batch(self) -> int:
        return self.global_batch_size // self.num_workers

    @property
    def auto_micro_batch(self) -> bool:
        """The micro batch is the planner's, chosen on each worker (`with_micro_batch`) before training."""
        return self.micro_batch_size == 0

    @property
    def micro_batch(self) -> int:
        if self.auto_micro_batch:
            raise RuntimeError("train.micro_batch_size is auto: resolve it first (TrainConfig.with_micro_batch)")
        return self.micro_batch_size or self.per_worker_batch

    def with_micro_batch(self, micro_batch: int) -> TrainConfig:
        """This config with the micro batch fixed (the planner's choice), validated like a configured one."""
        return dataclasses.replace(self, micro_batch_size=micro_batch)

    @property
    def grad_accum(self) -> int:
        return self.per_worker_batch // self.micro_batch

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.cpus_per_worker))

    def resolved_storage_path(self) -> str:
        if self.storage_path:
            return self.storage_path if "://" in self.storage_path else os.path.abspath(self.storage_path)
        return os.path.abspath(os.path.join(self.output, "ray"))

    def resolved_tokenizer(self) -> str:
        return self.tokenizer or os.path.join(self.data, "tokenizer")
