"""The no-clipping baseline: measures the gradient norm and leaves the gradients alone."""

from __future__ import annotations

import math

from torch import Tensor

from autoclip.base import Clipper
from autoclip.info import ClipInfo


class NoClip(Clipper):
    """Records the gradient norm, changes nothing (non-finite steps follow ``nonfinite``).

    Example::

        clip = NoClip(model.parameters())
        loss.backward()
        info = clip.step()   # info.threshold is inf, info.clipped is False
        optimizer.step()
    """

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        return ClipInfo(norms[0], math.inf, False)
