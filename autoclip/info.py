"""What a clipper did on one step."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True, slots=True)
class ClipInfo:
    """The outcome of one ``clipper.step()``.

    ``grad_norm`` is the total L2 norm of all gradients before clipping and ``threshold``
    the norm threshold used this step (``inf`` where nothing can clip). ``clip_coef`` is
    min(1, threshold / grad_norm), the factor a global clip-by-norm scales by (1 where
    nothing clipped). ``skip`` is True when the gradients were non-finite under
    ``nonfinite="skip"``: the optimizer step should not be taken. With ``per_group=True``
    the per-group norms and thresholds are in ``group_grad_norms`` and ``group_thresholds``.

    From a host clipper the values are Python numbers. From ``AutoClip(on_device=True)``
    ``grad_norm``, ``threshold``, ``clip_coef``, ``clipped``, ``finite`` and the group values
    are 0-dim tensors on the parameters' device, so that ``step()`` never waits for the
    device; reading one (``float(info.threshold)``, ``if info.clipped``) waits for it, and
    ``to_host()`` reads them all in one transfer. ``skip`` is a plain ``False`` unless the
    clipper's policy is ``nonfinite="skip"``.

    Example::

        info = clipper.step()
        if not info.skip:
            optimizer.step()
        print(info.to_host())   # grad_norm, threshold, clipped as Python numbers
    """

    grad_norm: float | Tensor
    threshold: float | Tensor
    clipped: bool | Tensor
    finite: bool | Tensor = True
    skip: bool | Tensor = False
    group_grad_norms: tuple[float | Tensor, ...] = ()
    group_thresholds: tuple[float | Tensor, ...] = ()
    clip_coef: float | Tensor | None = None  # derived from grad_norm and threshold when not given

    def __post_init__(self) -> None:
        if isinstance(self.grad_norm, Tensor):
            if self.clip_coef is None:
                raise ValueError("a ClipInfo of device tensors must be given its clip_coef")
            return
        if self.finite != math.isfinite(self.grad_norm):
            raise ValueError("ClipInfo.finite must say whether grad_norm is finite")
        if self.clip_coef is None:
            object.__setattr__(self, "clip_coef", _clip_coef(self.grad_norm, self.threshold, self.finite))

    @property
    def on_device(self) -> bool:
        """Whether the values are device tensors (from ``AutoClip(on_device=True)``) rather than numbers."""
        return isinstance(self.grad_norm, Tensor)

    def to_host(self) -> ClipInfo:
        """This ClipInfo with Python numbers, read from the device in one transfer (itself if already numbers)."""
        if not self.on_device:
            return self
        names = [f.name for f in fields(self)]
        scalars = {n: getattr(self, n) for n in names if isinstance(getattr(self, n), Tensor)}
        groups = {n: getattr(self, n) for n in ("group_grad_norms", "group_thresholds")}
        flat = [*scalars.values(), *groups["group_grad_norms"], *groups["group_thresholds"]]
        device = self.grad_norm.device
        values = torch.stack([t.to(device).reshape(()).double() for t in flat]).tolist()  # the one transfer
        out = {}
        for n, t in scalars.items():
            v = values.pop(0)
            out[n] = bool(v) if t.dtype == torch.bool else v
        for n, g in groups.items():
            out[n] = tuple(values.pop(0) for _ in g)
        return replace(self, **out)


def _clip_coef(grad_norm: float, threshold: float, finite: bool) -> float:
    if not finite or grad_norm <= threshold or grad_norm <= 0:
        return 1.0
    return threshold / grad_norm
