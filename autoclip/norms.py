"""Gradient norms and scaling on the device, the way torch.nn.utils.clip_grad_norm_ computes them."""

from __future__ import annotations

import torch
from torch import Tensor

# torch (2.13) has no public helper that groups tensors by device and dtype for the foreach kernels:
# torch.nn.utils.get_total_norm is public but returns only the total, and the per-group norms need
# each tensor's norm. So this module calls torch's private helpers, here and nowhere else, the same
# ones clip_grad_norm_ calls (torch/nn/utils/clip_grad.py).
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support


def _foreach_groups(tensors: list[Tensor]) -> list[tuple[torch.device, list[Tensor], list[int], bool]]:
    """``tensors`` grouped by (device, dtype): (device, members, their positions, foreach supported)."""
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)
    return [
        (device, members, indices, _has_foreach_support(members, device))
        for (device, _), ([members], indices) in grouped.items()
    ]


def _per_tensor_norms(tensors: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Each tensor's L2 norm, in the order torch.nn.utils.get_total_norm stacks them.

    Returns the norms and, for each input position, where its norm sits in that order.
    Mirroring get_total_norm (grouped by device and dtype, foreach where supported) makes
    the total bit-identical to what clip_grad_norm_ returns.
    """
    norms: list[Tensor] = []
    where = [0] * len(tensors)
    for _, members, indices, foreach in _foreach_groups(tensors):
        for j, i in enumerate(indices):
            where[i] = len(norms) + j
        if foreach:
            norms.extend(torch._foreach_norm(members, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(t, 2.0) for t in members)
    return norms, where


def _stack_norm(norms: list[Tensor], device: torch.device) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), 2.0)


def _replicated(t: Tensor) -> Tensor:
    # DTensor gradients (FSDP2) give a DTensor norm: full_tensor() makes it the global norm.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def norm_tensors(groups: list[list[Tensor]], extras: list[Tensor] = ()) -> list[Tensor]:
    """[total norm, norm of group 0, norm of group 1, ..., *extras] as 0-dim tensors on the device.

    With one group its norm is the total and is not repeated. A group without gradients has
    norm 0. Nothing is read back to the host. ``groups`` must hold at least one gradient.
    """
    flat = [g for grads in groups for g in grads]
    norms, where = _per_tensor_norms(flat)
    device = flat[0].device
    out = [_stack_norm(norms, device)]
    if len(groups) > 1:
        start = 0
        for grads in groups:
            members = [norms[where[i]] for i in range(start, start + len(grads))]
            start += len(grads)
            out.append(_stack_norm(members, device) if members else out[0].new_zeros(()))
    return [_replicated(n) for n in out] + [_replicated(e).to(device) for e in extras]


@torch.no_grad()
def grad_norms(groups: list[list[Tensor]], extras: list[Tensor] = ()) -> list[float]:
    """``norm_tensors`` as Python floats, read back to the host in one transfer.

    A step without gradients gives zeros (and reads only the extras).
    """
    if not any(groups):
        return [0.0] * (1 if len(groups) == 1 else 1 + len(groups)) + [e.item() for e in extras]
    out = norm_tensors(groups, extras)
    if len(out) == 1:
        return [out[0].item()]
    return torch.stack([n.to(out[0].dtype) for n in out]).tolist()


@torch.no_grad()
def scale_(grads: list[Tensor], coef: float) -> None:
    """Multiply every gradient in place by a host scalar (no transfer)."""
    for _, members, _, foreach in _foreach_groups(grads):
        if foreach:
            torch._foreach_mul_(members, coef)
        else:
            for g in members:
                g.mul_(coef)


@torch.no_grad()
def scale_by_tensor_(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply every gradient in place by a 0-dim float64 device tensor, with no host read.

    The factor reaches each gradient as the host path's Python float does: on the CPU as the
    float64 scalar itself (which torch reads in the kernel's compute type), elsewhere cast to the
    gradient's dtype (as clip_grad_norm_ passes it; the foreach kernels take a factor of the
    gradients' dtype). Complex gradients are scaled through their real view: by a real factor,
    which leaves an inf component inf instead of making its partner NaN.
    """
    real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
    for device, members, _, foreach in _foreach_groups(real):
        on_cpu = device.type == "cpu" and coef.device == device
        factor = coef if on_cpu else coef.to(device=device, dtype=members[0].dtype)
        if foreach:
            torch._foreach_mul_(members, factor)
        else:
            for g in members:
                g.mul_(factor)
