"""DDP communication hooks: what `train.ddp_comm_hook` names, applied right after prepare_model.

bf16: torch's bf16_compress_hook casts each gradient bucket to bf16 before the all-reduce and back after it,
halving the bytes on the wire. Worth it where ranks talk over TCP between nodes (flan-t5-large's 3.1 GB of
fp32 gradients is ~2.5 s per step on 10 Gbps); inside one NVLink node it only costs the casts. bf16 keeps
fp32's exponent range, so unlike fp16 compression it needs no loss scaling. NCCL only (torch refuses it
on gloo), hence TrainConfig requires use_gpu for it.
"""

from __future__ import annotations

from collections.abc import Callable


def comm_hook(name: str) -> Callable:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook}
    if name not in hooks:
        raise ValueError(f"unknown DDP comm hook {name!r}; known: {list(hooks)}")
    return hooks[name]


def apply_comm_hook(model, name: str | None) -> bool:
    """Register the named hook on a DDP-wrapped model; True if registered. A model that prepare_model left
    unwrapped (one worker: no all-reduce) or no hook: nothing to do."""
    from torch.nn.parallel import DistributedDataParallel

    if name is None or not isinstance(model, DistributedDataParallel):
        return False
    model.register_comm_hook(None, comm_hook(name))
    return True
