"""Fixed clip-by-value, with torch.nn.utils.clip_grad_value_'s semantics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from autoclip.base import Clipper, Params, check_threshold
from autoclip.info import ClipInfo


class ClipValue(Clipper):
    """Clamp every gradient element to [-clip_value, clip_value], as ``clip_grad_value_`` does.

    There is no norm threshold, so ``info.threshold`` is inf; ``info.clipped`` says
    whether any element was clamped (its largest magnitude is read back in the same
    transfer as the norm). Complex parameters are refused: torch cannot clamp them
    (``clip_grad_value_`` fails on them); clip them by norm instead.

    Example::

        clip = ClipValue(model.parameters(), clip_value=0.5)
        loss.backward()
        info = clip.step()
        optimizer.step()
    """

    _settings = ("clip_value",)

    def __init__(self, params: Params, clip_value: float, nonfinite: str = "skip"):
        clip_value = check_threshold(clip_value, "clip_value", "ClipValue")
        super().__init__(params, nonfinite=nonfinite)
        if any(p.is_complex() for group in self.groups for p in group):
            raise ValueError(
                "ClipValue cannot clamp complex parameters (torch.nn.utils.clip_grad_value_ cannot either): "
                "clip them by norm with ClipNorm or AutoClip"
            )
        self.clip_value = clip_value

    def _extras(self, grads: list[list[Tensor]]) -> list[Tensor]:
        flat = [g for gs in grads for g in gs]
        if not flat:
            return []
        return [torch.stack([torch.linalg.vector_norm(g, math.inf).to(flat[0].device) for g in flat]).max()]

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        clipped = len(norms) > 1 and norms[-1] > self.clip_value
        if clipped:
            torch.nn.utils.clip_grad_value_([p for group in self.groups for p in group], self.clip_value)
        return ClipInfo(norms[0], math.inf, clipped)
