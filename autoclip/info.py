"""What a clipper did on one step."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """The outcome of one ``clipper.step()``.

    ``grad_norm`` is the total L2 norm of all gradients before clipping and ``threshold``
    the norm threshold used this step (``inf`` where nothing can clip). ``skip`` is True
    when the gradients were non-finite under ``nonfinite="skip"``: the optimizer step
    should not be taken. With ``per_group=True`` the per-group norms and thresholds are
    in ``group_grad_norms`` and ``group_thresholds``.

    Example::

        info = clipper.step()
        if not info.skip:
            optimizer.step()
        print(info.grad_norm, info.threshold, info.clipped)
    """

    grad_norm: float
    threshold: float
    clipped: bool
    finite: bool = True
    skip: bool = False
    group_grad_norms: tuple[float, ...] = ()
    group_thresholds: tuple[float, ...] = ()

    @property
    def clip_coef(self) -> float:
        """min(1, threshold / grad_norm): the factor a global clip-by-norm scales by."""
        if not self.finite or self.grad_norm <= self.threshold:
            return 1.0
        return self.threshold / self.grad_norm if self.grad_norm > 0 else 1.0

    def __post_init__(self) -> None:
        if self.finite != math.isfinite(self.grad_norm):
            raise ValueError("ClipInfo.finite must say whether grad_norm is finite")
