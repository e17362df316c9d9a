"""Separation losses. Permutation-invariant (PIT) over the two sources."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def pit_min(per_pair: Tensor) -> Tensor:
    """Given losses[b, i, j] of estimate i against reference j, the mean over the batch of the
    best permutation's mean loss."""
    n = per_pair.shape[-1]
    perms = list(itertools.permutations(range(n)))
    totals = torch.stack([sum(per_pair[:, i, p[i]] for i in range(n)) / n for p in perms], dim=-1)
    return totals.min(dim=-1).values.mean()


def psa_target(mixture: Tensor, sources: Tensor) -> Tensor:
    """Truncated phase-sensitive target T_0^{|X|}(|S| cos(theta_X - theta_S)) (paper eq. 4)."""
    mix_mag = mixture.abs().unsqueeze(1)
    cos = torch.cos(torch.angle(mixture).unsqueeze(1) - torch.angle(sources))
    return torch.minimum(torch.clamp(sources.abs() * cos, min=0.0), mix_mag)


def mask_inference_loss(masks: Tensor, mixture: Tensor, sources: Tensor) -> Tensor:
    """L_MI (paper eq. 4): mean |M_i |X| - T(S_j)| over TF points, minimised over permutations.

    masks (B, C, T, F) real; mixture (B, T, F) and sources (B, C, T, F) complex STFTs.
    """
    estimate = masks * mixture.abs().unsqueeze(1)  # |S_hat| = M |X|; its phase is the mixture's
    target = psa_target(mixture, sources)
    per_pair = (estimate.unsqueeze(2) - target.unsqueeze(1)).abs().mean(dim=(-2, -1))
    return pit_min(per_pair)
