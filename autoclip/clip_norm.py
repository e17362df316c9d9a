"""Fixed clip-by-norm, with torch.nn.utils.clip_grad_norm_'s semantics."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from autoclip.base import Clipper, Params
from autoclip.info import ClipInfo
from autoclip.norms import scale_


class ClipNorm(Clipper):
    """Scale gradients by min(max_norm / (norm + 1e-6), 1), as ``clip_grad_norm_`` does.

    The 1e-6 is torch's: a gradient whose norm equals ``max_norm`` is scaled by a factor
    just under 1. The factor is computed in the norm's dtype, as torch computes it, so
    the clipped gradients equal ``clip_grad_norm_``'s bit for bit.

    Example::

        clip = ClipNorm(model.parameters(), max_norm=1.0)
        loss.backward()
        info = clip.step()
        optimizer.step()
    """

    def __init__(self, params: Params, max_norm: float, nonfinite: str = "skip"):
        super().__init__(params, nonfinite=nonfinite)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        total = norms[0]
        flat = [g for gs in grads for g in gs]
        # torch computes max_norm / (total + 1e-6) in the norm's dtype (float32 for float32 grads)
        dtype = functools.reduce(torch.promote_types, (g.dtype for g in flat))
        norm = torch.tensor(total, dtype=dtype)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0).item()
        scale_(flat, coef)
        return ClipInfo(total, self.max_norm, coef < 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "max_norm": self.max_norm}

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm:g}, " + super().extra_repr()
