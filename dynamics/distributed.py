"""What the Recorder needs from torch.distributed: who writes, averaging, and full state dicts.

Everything degrades to plain single-process behaviour when no process group is initialized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def full(t: Tensor) -> Tensor:
    """A DTensor (FSDP2) as the full tensor every rank agrees on; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def mean(t: Tensor) -> Tensor:
    """The average over ranks (a copy); the tensor itself on one process."""
    if world() == 1:
        return t
    out = t.clone()
    torch.distributed.all_reduce(out)
    return out / world()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (its names carry no 'module.')."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sharded(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())


def state_dicts(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """Model and optimizer state as full (unsharded) dicts; a collective under FSDP2.

    Under FSDP2 an optimizer that has not stepped yet is saved as None: torch's full
    optimizer state dict would first initialize it with a zero-gradient step, which
    advances Adam's step count and so changes training.
    """
    if not sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(module, options=options)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=options) if optimizer.state else None
    return model_sd, optim_sd


def load_state_dicts(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict | None):
    """Load what ``state_dicts`` saved, on every rank."""
    if not sharded(module):
        module.load_state_dict(model_sd)
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_sd, options=options)
    if optim_sd is not None:
        set_optimizer_state_dict(module, optimizer, optim_sd, options=options)
