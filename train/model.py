"""The model: a named tiny T5 built from scratch (offline default) or a T5 checkpoint by hub id / path.

Tiny configs share flan-t5's architecture (T5ForConditionalGeneration, gated-GELU feed-forward, relative
position buckets, pad=decoder start=0, eos=1) so every code path the demo exercises is the one
flan-t5-large takes, untied LM head included. transformers 5 ties the head of any T5 *built from a config*
(T5Config forces tie_word_embeddings=True and reads a passed False only as "T5 v1.1/flan: don't scale the
decoder output"), so `untie_lm_head` gives the tiny models their own head after construction. Saved, such a
model holds lm_head.weight != shared.weight, and from_pretrained keeps the two apart, exactly as it loads
flan-t5 (it says so at every load, "so we will NOT tie them": our loaders drop that line); its config.json
says tie_word_embeddings=false, as flan-t5's does (save_model).
Checkpoints load from safetensors only and never with remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cluster.console import quiet_untied_head_notice
from cluster.core import ModelError, check_model_dir, is_local_spec, write_json_atomic

# d_model / layers / heads chosen for learning per CPU-minute (measured on a 2-core machine: d_model 128, 2+2 layers
# at batch 128 runs ~520 samples/s on 2 cores).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "t5-tiny": dict(d_model=128, d_ff=512, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2),
    "t5-mini": dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=3, num_decoder_layers=3),
    "t5-small-scratch": dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
}

# Fields that make two checkpoints incompatible (a resume from another model must fail clearly). Tied vs
# untied head shows in scale_decoder_outputs: transformers 5 saves tie_word_embeddings=true for every T5.
ARCH_FIELDS = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
               "feed_forward_proj", "scale_decoder_outputs")


def tiny_config(name: str, vocab_size: int, pad_id: int = 0, eos_id: int = 1, dropout: float | None = None):
    from transformers import T5Config

    if name not in TINY_CONFIGS:
        raise ModelError(f"unknown tiny model {name!r}; known: {', '.join(TINY_CONFIGS)}")
    return T5Config(
        vocab_size=vocab_size,
        feed_forward_proj="gated-gelu",
        # T5 v1.1 / flan-t5: untied head (untie_lm_head), so no d_model**-0.5 scaling of the decoder output.
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0 if dropout is None else dropout,  # from scratch on CPU: underfit, not overfit
        layer_norm_epsilon=1e-6,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        decoder_start_token_id=pad_id,
        **TINY_CONFIGS[name],
    )


def build_model(spec: str, vocab_size: int, pad_id: int = 0, eos_id: int = 1, dropout: float | None = None):
    """A T5ForConditionalGeneration for `spec`, with an embedding that covers `vocab_size` tokens."""
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    if spec in TINY_CONFIGS:
        return untie_lm_head(T5ForConditionalGeneration(tiny_config(spec, vocab_size, pad_id, eos_id, dropout)))
    if is_local_spec(spec):
        check_model_dir(spec)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dropout is not None:
        kwargs["dropout_rate"] = dropout
    quiet_untied_head_notice()
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(os.path.expanduser(spec), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"could not load model {spec!r}: {e}. Offline, use a named tiny model "
            f"({', '.join(TINY_CONFIGS)}) or a local directory with config.json + model.safetensors."
        ) from e
    emb = model.get_input_embeddings().num_embeddings
    if vocab_size > emb:
        raise ModelError(
            f"tokenizer has {vocab_size} tokens but model {spec!r} embeds only {emb}: "
            "use the tokenizer the model was trained with"
        )
    return model


def untie_lm_head(model):
    """Give a T5 built from a config its own LM head, as flan-t5 (T5 v1.1) has.

    The head is drawn from N(0, d_model**-0.5), fan-in scaling as T5X initialises v1.1's separate head: the
    first logits then have the scale of a tied head behind T5's d_model**-0.5 output scaling. (transformers'
    own init for an untied T5 head is N(0, 1): t5-tiny then starts at a loss of ~21 instead of ~5.)
    Removing the key from all_tied_weights_keys is what keeps save_pretrained writing lm_head.weight.
    Works on the meta device (the planner's tests count parameters without memory).
    """
    import torch

    weight = torch.empty_like(model.shared.weight)
    if weight.device.type != "meta":
        torch.nn.init.normal_(weight, mean=0.0, std=model.config.d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)
    model.all_tied_weights_keys.pop("lm_head.weight", None)
    return model


def save_model(model, directory, **kwargs) -> None:
    """`save_pretrained` (safetensors) with a config.json every reader takes as this model (mark_untied_head)."""
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    mark_untied_head(directory)


def mark_untied_head(directory) -> None:
    """Rewrites a saved T5 config.json to say `tie_word_embeddings: false` when the head is untied, as
    flan-t5's own config.json does. transformers 5 saves `true` for every T5 (T5Config forces it) and keeps
    the truth in `scale_decoder_outputs: false`, which only it reads: transformers 4 (and any reader that
    honours the flag) would load our untied flan-t5 finetune with its head tied to the embedding and the
    decoder output scaled, a different model, without an error. transformers 5 loads either file the same."""
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") == "t5" and cfg.get("scale_decoder_outputs") is False and cfg.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False
        write_json_atomic(path, cfg)


def arch_of(config) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d.get(k) for k in ARCH_FIELDS}


def check_same_arch(expected, found, where: str) -> None:
    """Refuse to load a checkpoint written for a different architecture, naming the differing fields."""
    a, b = arch_of(expected), arch_of(found)
    diff = {k: (b[k], a[k]) for k in ARCH_FIELDS if a[k] != b[k]}
    if diff:
        shown = ", ".join(f"{k}={x!r} (this run: {y!r})" for k, (x, y) in diff.items())
        raise ModelError(
            f"checkpoint {where} was written by another model: {shown}. Resume with the same model, "
            "or start a new run (a different run_name or storage_path)."
        )
