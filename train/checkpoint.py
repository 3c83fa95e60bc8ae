"""Checkpoints: the model, the optimizer and the training state, verifiable before they are trusted.

Two layouts (what `ray.train.report(..., checkpoint=...)` uploads), named by the manifest's "layout":

"full" (DDP, one worker: the state is replicated, rank 0 writes all of it):

    config.json, generation_config.json, model.safetensors   # from_pretrained-loadable as is
    tokenizer.json, tokenizer_config.json, ...                # the tokenizer the data was encoded with
    train_state.pt                                            # optimizer, step, data position, metrics
    checkpoint.json                                           # manifest: every file above with its size,
                                                              # and the data order (seed, workers, ...)

"sharded" (FSDP: nothing is gathered; each rank writes its own shard with torch.distributed.checkpoint):

    config.json, generation_config.json, tokenizer files     # rank 0
    train_state.pt                                            # rank 0: step, data position (no optimizer)
    dcp/.metadata, dcp/__<rank>_0.distcp                      # model + AdamW state, one file per rank
    checkpoint.json                                           # rank 0, after every rank wrote: all files

Each rank writes into its own temporary directory; Ray merges them into one storage directory. A sharded
checkpoint is not a Hugging Face model folder: `export_model_dir` consolidates one (the best, at the end
of a run, or any kept one with `python -m train export`) into `final/`-style safetensors.

Atomicity: `checkpoint.json` is written last; Ray copies every rank's directory to storage and registers
the checkpoint only once all ranks' copies are done (a checkpoint interrupted mid-upload is never handed
back by `get_checkpoint()`). On load, every file of the manifest must be present with its recorded size,
so a torn copy is refused with a clear message instead of loading garbage. `train_state.pt` holds only
tensors and plain containers and is read with `weights_only=True`; DCP shards are read by DCP's own reader
(tensors and plain metadata only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from cluster.core import CheckpointError, write_json_atomic
from train.model import mark_untied_head, save_model, untie_lm_head

MANIFEST = "checkpoint.json"
TRAIN_STATE = "train_state.pt"
SHARDS = "dcp"  # the DCP folder of a sharded checkpoint
FORMAT_VERSION = 1


def write_checkpoint(
    directory: str | Path,
    model,
    model_state: dict[str, torch.Tensor],
    tokenizer,
    train_state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint into `directory` (which must be new or empty). Rank 0 only."""
    d = _empty_dir(directory)
    save_model(model, d, state_dict=model_state)
    tokenizer.save_pretrained(d)
    torch.save(train_state, d / TRAIN_STATE)
    _write_manifest(d, train_state, _files(d))
    return d


def _empty_dir(directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise CheckpointError(f"refusing to write a checkpoint into non-empty {d}")
    return d


def _files(d: Path) -> dict[str, int]:
    return {p.relative_to(d).as_posix(): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def _write_manifest(d: Path, train_state: dict[str, Any], files: dict[str, int], **extra: Any) -> None:
    manifest = {"format": FORMAT_VERSION, **extra, "step": train_state["step"], "files": files}
    if train_state.get("data_order"):  # what the saved data position means; the driver checks it on resume
        manifest["data_order"] = train_state["data_order"]
    write_json_atomic(d / MANIFEST, manifest)  # the manifest appears whole or not at all


def write_sharded_checkpoint(directory: str | Path, model, optimizer, tokenizer, train_state: dict[str, Any],
                             rank: int) -> Path:
    """Every rank writes its shard of the model and AdamW state into its own `directory` (new or empty)
    with torch.distributed.checkpoint; rank 0 adds the config, tokenizer, training state and, once every
    rank is done, the manifest of all ranks' files. Collective: every rank calls it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    d = _empty_dir(directory)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards (DTensors): no gather
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(d / SHARDS))
    core = model.module if hasattr(model, "module") else model
    if rank == 0:
        core.config.save_pretrained(d)
        mark_untied_head(d)
        if getattr(core, "generation_config", None) is not None:
            core.generation_config.save_pretrained(d)
        tokenizer.save_pretrained(d)
        torch.save(train_state, d / TRAIN_STATE)
    per_rank: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, _files(d))  # the file names and sizes every rank wrote (a few lines)
    if rank == 0:
        files = {k: v for f in per_rank for k, v in (f or {}).items()}
        # untied_lm_head: what the export needs to rebuild the module tree (T5 v1.1 / flan heads are untied)
        _write_manifest(d, train_state, files, layout="sharded",
                        untied_lm_head=core.lm_head.weight is not core.shared.weight)
    return d


def is_sharded(directory: str | Path) -> bool:
    return verify_checkpoint(directory).get("layout") == "sharded"


def load_sharded_state(model, optimizer, directory: str | Path) -> None:
    """Load a sharded checkpoint's model and AdamW state into an already distributed model (FSDP2, or DDP:
    DCP reshards). Each rank reads only the bytes of its own shards. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # the target layout (and AdamW's state slots)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(Path(directory) / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


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


def consolidate_model(directory: str | Path):
    """The full model of a sharded checkpoint, on CPU, in the dtype it was trained in: the module tree is
    built from config.json on the meta device (no init), then DCP reads only the model's tensors (not the
    optimizer's) in one process, without a process group."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    d = Path(directory)
    manifest = verify_checkpoint(d)
    reader = dcp.FileSystemReader(d / SHARDS)
    meta = reader.read_metadata().state_dict_metadata
    config = AutoConfig.from_pretrained(d, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=False)
        if manifest.get("untied_lm_head"):
            untie_lm_head(model)
    model.to_empty(device="cpu")  # tied weights stay one parameter
    model.to(meta["model.shared.weight"].properties.dtype)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)  # in place into the model's tensors
    return model


CKPT_PREFIX = "mathtune-ckpt-"


def checkpoint_dir_prefix(host: str, pid: int | str) -> str:
    return f"{CKPT_PREFIX}{host}-pid{pid}-"


def local_checkpoint_dir(root: str | None = None) -> str:
    """A new local folder for one checkpoint, named after this host and process (remove_orphaned_checkpoints)."""
    return tempfile.mkdtemp(prefix=checkpoint_dir_prefix(socket.gethostname(), os.getpid()), dir=root)


def remove_orphaned_checkpoints(root: str | None = None) -> list[str]:
    """Deletes the local checkpoint folders that processes of this host which no longer run left behind, and
    returns them. Ray deletes a local copy only once it is uploaded, so a worker killed during an upload
    leaves its copy (9.4 GB for flan-t5-large under DDP) on the node's disk, once per failure. Called as a
    worker starts. Only this host's names (pods sharing a host's /tmp have their own hostnames and pid
    spaces), and only pids that do not exist: a live process's folder (another run's) is never touched."""
    root = root or tempfile.gettempdir()
    pattern = re.compile(re.escape(f"{CKPT_PREFIX}{socket.gethostname()}-pid") + r"(\d+)-")
    removed = []
    for name in sorted(os.listdir(root)):
        m = pattern.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or another user's: PermissionError below is a live process too)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)  # two ranks of a node may race: fine
        removed.append(name)
    return removed


def export_model_dir(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """A from_pretrained-loadable model folder (weights, config, tokenizer; no training state) at `dest`,
    replacing it atomically: the HF files of a full checkpoint copied, or a sharded one consolidated."""
    src, dest = Path(checkpoint_dir), Path(dest)
    manifest = verify_checkpoint(src)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if manifest.get("layout") == "sharded":
        save_model(consolidate_model(src), tmp)
    for p in src.iterdir():
        if p.is_file() and p.name not in (TRAIN_STATE, MANIFEST) and not (tmp / p.name).exists():
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
