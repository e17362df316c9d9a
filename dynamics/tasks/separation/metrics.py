"""Scale-invariant SDR (Le Roux et al., 2019), with permutation invariance."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def si_sdr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """SI-SDR in dB over the last axis; both signals are made zero-mean first."""
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    alpha = (estimate * reference).sum(-1, keepdim=True) / ((reference**2).sum(-1, keepdim=True) + eps)
    target = alpha * reference
    noise = estimate - target
    return 10 * torch.log10(((target**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))


def pit_si_sdr(estimates: Tensor, references: Tensor) -> Tensor:
    """Per-item mean SI-SDR of the best assignment of estimates (B, C, n) to references (B, C, n)."""
    n = estimates.shape[1]
    scores = [
        torch.stack([si_sdr(estimates[:, i], references[:, p[i]]) for i in range(n)]).mean(0)
        for p in itertools.permutations(range(n))
    ]
    return torch.stack(scores).max(dim=0).values
