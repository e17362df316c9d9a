"""Local gradient-Lipschitz ("smoothness") estimate along the update (after Zhang et al., 2020).

L_t = max_k ||g(theta_{t-1} + gamma_k d) - g(theta_{t-1})|| / (gamma_k ||d||),  gamma_k = k / (K + 1),

with d = theta_t - theta_{t-1} the actual update, g the gradient of the same loss on the
same batch with the same dropout masks. On f = 1/2 theta^T A theta it is ||A d|| / ||d||.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynamics import checks
from dynamics.distributed import full
from dynamics.probe import Probe


def norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's L2 norm, stacked (global norms for FSDP2 shards), on the device (no sync)."""
    return full(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def total_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of tensors viewed as one vector, on the device (no sync)."""
    return torch.linalg.vector_norm(norms(tensors))


@torch.no_grad()
def smoothness_along(
    probe: Probe, before: list[Tensor], update: list[Tensor], grad_before: list[Tensor], probes: int, direction: str
) -> Tensor:
    """The estimate from a :class:`Probe` of the step, as a 0-dim device tensor (NaN when the update is zero)."""
    d = update
    if direction == "gradient":
        # Santurkar et al.: probe along -g, as far as the update actually went
        scale = total_norm(d) / total_norm(grad_before)
        d = torch._foreach_mul(grad_before, -scale)
    else:
        checks.direction(direction)
    d_norm = total_norm(d)
    best = torch.full((), float("nan"), device=d_norm.device, dtype=d_norm.dtype)
    for k in range(1, probes + 1):
        gamma = k / (probes + 1)
        grads = probe.grads([b + gamma * dd for b, dd in zip(before, d)])
        ratio = total_norm(torch._foreach_sub(grads, grad_before)) / (gamma * d_norm)
        best = torch.fmax(best, ratio)  # fmax: the first probe replaces the NaN start
    return torch.where(d_norm > 0, best, torch.full_like(best, float("nan")))
