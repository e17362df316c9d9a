"""Gradient norms on the device, read back to the host in one transfer."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support


def _per_tensor_norms(tensors: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Each tensor's L2 norm, in the order torch.nn.utils.get_total_norm stacks them.

    Returns the norms and, for each input position, where its norm sits in that order.
    Mirroring get_total_norm (grouped by device and dtype, foreach where supported) makes
    the total bit-identical to what clip_grad_norm_ returns.
    """
    grouped = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    norms: list[Tensor] = []
    where = [0] * len(tensors)
    for (device, _), ([device_tensors], indices) in grouped.items():
        for j, i in enumerate(indices):
            where[i] = len(norms) + j
        if _has_foreach_support(device_tensors, device):
            norms.extend(torch._foreach_norm(device_tensors, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(t, 2.0) for t in device_tensors)
    return norms, where


def _stack_norm(norms: list[Tensor], device: torch.device) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)


def _replicated(t: Tensor) -> Tensor:
    # DTensor gradients (FSDP2) give a DTensor norm: full_tensor() makes it the global norm.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def grad_norms(groups: list[list[Tensor]], extras: list[Tensor] = ()) -> list[float]:
    """[total norm, norm of group 0, norm of group 1, ..., *extras] as Python floats.

    With one group its norm is the total and is not repeated. ``extras`` are scalar
    tensors that ride along. Everything is computed on the device and crosses to the
    host together: one transfer per call.
    """
    flat = [g for grads in groups for g in grads]
    if not flat:
        return [0.0] * (1 if len(groups) == 1 else 1 + len(groups)) + [e.item() for e in extras]
    norms, where = _per_tensor_norms(flat)
    device = flat[0].device
    out = [_stack_norm(norms, device)]
    if len(groups) > 1:
        start = 0
        for grads in groups:
            members = [norms[where[i]] for i in range(start, start + len(grads))]
            start += len(grads)
            out.append(_stack_norm(members, device) if members else out[0].new_zeros(()))
    out = [_replicated(n) for n in out] + [_replicated(e).to(device) for e in extras]
    if len(out) == 1:
        return [out[0].item()]
    return torch.stack([n.to(out[0].dtype) for n in out]).tolist()


@torch.no_grad()
def scale_(grads: list[Tensor], coef: float) -> None:
    """Multiply every gradient in place by a host scalar (no transfer)."""
    grouped = torch._C._group_tensors_by_device_and_dtype([grads], False)
    for (device, _), ([device_grads], _) in grouped.items():
        if _has_foreach_support(device_grads, device):
            torch._foreach_mul_(device_grads, coef)
        else:
            for g in device_grads:
                g.mul_(coef)
