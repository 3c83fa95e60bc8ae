"""Checkpoints: a Hugging Face model directory plus the training state, verifiable before it is trusted.

Layout of one checkpoint (what `ray.train.report(..., checkpoint=...)` uploads):

    config.json, generation_config.json, model.safetensors   # from_pretrained-loadable as is
    tokenizer.json, tokenizer_config.json, ...                # the tokenizer the data was encoded with
    train_state.pt                                            # optimizer, step, data position, metrics
    checkpoint.json                                           # manifest: every file above with its size,
                                                              # and the data order (seed, workers, ...)

Atomicity: rank 0 writes into a fresh temporary directory and writes `checkpoint.json` last; Ray copies
the directory to storage and only then registers it (a checkpoint interrupted mid-upload is never handed
back by `get_checkpoint()`). On load, every file of the manifest must be present with its recorded size,
so a torn copy is refused with a clear message instead of loading garbage. `train_state.pt` holds only
tensors and plain containers and is read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cluster.core import CheckpointError, write_json_atomic

MANIFEST = "checkpoint.json"
TRAIN_STATE = "train_state.pt"
FORMAT_VERSION = 1


def write_checkpoint(
    directory: str | Path,
    model,
    model_state: dict[str, torch.Tensor],
    tokenizer,
    train_state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint into `directory` (which must be new or empty). Rank 0 only."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise CheckpointError(f"refusing to write a checkpoint into non-empty {d}")
    model.save_pretrained(d, state_dict=model_state, safe_serialization=True)
    tokenizer.save_pretrained(d)
    torch.save(train_state, d / TRAIN_STATE)
    files = {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
    manifest = {"format": FORMAT_VERSION, "step": train_state["step"], "files": files}
    if train_state.get("data_order"):  # what the saved data position means; the driver checks it on resume
        manifest["data_order"] = train_state["data_order"]
    write_json_atomic(d / MANIFEST, manifest)  # the manifest appears whole or not at all
    return d


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The manifest, after checking every listed file is there with its size. Raises CheckpointError."""
    d = Path(directory)
    mf = d / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{d} is not a complete checkpoint: {MANIFEST} is missing (torn or foreign write)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf} is unreadable: {e}") from e
    problems = []
    for name, size in files.items():
        p = d / name
        if not p.is_file():
            problems.append(f"{name} missing")
        elif p.stat().st_size != size:
            problems.append(f"{name} has {p.stat().st_size} bytes, manifest says {size}")
    if problems:
        raise CheckpointError(f"checkpoint {d} is incomplete: {'; '.join(problems)}")
    return manifest


def load_train_state(directory: str | Path) -> dict[str, Any]:
    verify_checkpoint(directory)
    return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    d = Path(directory)
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {d} has no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(load_file(str(s)))
    return state


def load_weights(model, directory: str | Path) -> None:
    """Load a checkpoint's weights into `model`, refusing one that does not cover it. Only weights tied to
    shared.weight may be absent (save_pretrained writes them once); an untied LM head missing from the
    checkpoint would otherwise silently keep its fresh init."""
    res = model.load_state_dict(load_model_state(directory), strict=False)
    missing = [k for k in res.missing_keys if k not in model.all_tied_weights_keys]
    if missing or res.unexpected_keys:
        raise CheckpointError(f"checkpoint {directory} does not match the model: missing {missing}, "
                              f"unexpected {res.unexpected_keys}")


def read_config(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"checkpoint {directory} has no config.json")
    return json.loads(p.read_text())


def export_model_dir(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint's HF files (not the training state) to `dest`, replacing it atomically."""
    src, dest = Path(checkpoint_dir), Path(dest)
    verify_checkpoint(src)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name not in (TRAIN_STATE, MANIFEST):
            shutil.copy2(p, tmp / p.name)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)
    return dest
