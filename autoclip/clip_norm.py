"""Fixed clip-by-norm, with torch.nn.utils.clip_grad_norm_'s semantics."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from autoclip.base import Clipper, Params, check_threshold
from autoclip.info import ClipInfo
from autoclip.norms import scale_


class ClipNorm(Clipper):
    """Scale gradients by min(max_norm / (norm + 1e-6), 1), as ``clip_grad_norm_`` does.

    The 1e-6 is torch's: a gradient whose norm equals ``max_norm`` is scaled by a factor
    just under 1. The factor is computed in the norm's dtype, as torch computes it, so
    the clipped gradients equal ``clip_grad_norm_``'s bit for bit, complex gradients
    included (their norm is ``torch.linalg.vector_norm``'s). A step without gradients
    reports norm 0, as ``clip_grad_norm_`` returns. ``max_norm`` must be a finite positive
    number (torch does not check it; use ``NoClip`` to measure without clipping).

    Example::

        clip = ClipNorm(model.parameters(), max_norm=1.0)
        loss.backward()
        info = clip.step()
        optimizer.step()
    """

    _settings = ("max_norm",)

    def __init__(self, params: Params, max_norm: float, nonfinite: str = "skip"):
        max_norm = check_threshold(max_norm, "max_norm", "ClipNorm")
        super().__init__(params, nonfinite=nonfinite)
        self.max_norm = max_norm

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        total = norms[0]
        flat = [g for gs in grads for g in gs]
        if not flat:
            return ClipInfo(total, self.max_norm, False)
        # torch computes max_norm / (total + 1e-6) in the norm's dtype: float32 for float32 or complex64 grads
        dtype = functools.reduce(torch.promote_types, (g.dtype.to_real() for g in flat))
        norm = torch.tensor(total, dtype=dtype)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0).item()
        scale_(flat, coef)
        return ClipInfo(total, self.max_norm, coef < 1.0)
