"""The built-in quantities: step size, smoothness, per-layer norms, update ratio, distance from init, update cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dynamics import checks, distributed
from dynamics.quantities.base import Quantity, SetupContext, StepContext
from dynamics.smoothness import smoothness_along, total_norm


class StepSize(Quantity):
    """``step_size``: ||θt − θt−1||₂ over all parameters, after clipping and the optimizer."""

    name = "step_size"
    columns = {"step_size": "float64"}

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        return {"step_size": torch.linalg.vector_norm(ctx.update_norms)}


class Smoothness(Quantity):
    """``smoothness``: the local gradient-Lipschitz estimate along the update (Zhang et al., 2020).

    L̂t = max_k ||g(θt−1 + γk d) − g(θt−1)|| / (γk ||d||), γk = k/(K+1), with K = ``probes``
    gradient probes (default: the Recorder's). ``direction="gradient"`` probes along −g as far
    as the update went (Santurkar et al., 2018). NaN without a closure or with a zero update.
    """

    name = "smoothness"
    columns = {"smoothness": "float64"}

    def __init__(self, probes: int | None = None, direction: str | None = None, every: int | None = None):
        super().__init__(every)
        self.probes = None if probes is None else checks.nonnegative_int("probes", probes)
        self.direction = checks.direction(direction, allow_none=True)

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        probes = ctx.probes if self.probes is None else self.probes
        if probes == 0 or ctx.prober is None:
            return {"smoothness": ctx.nan()}
        direction = self.direction or ctx.direction
        value = smoothness_along(ctx.prober, ctx.before, ctx.update, ctx.grads, probes, direction)
        return {"smoothness": value}


class LayerNorms(Quantity):
    """Per parameter tensor: raw ``grad_norm``, ``step_size`` and ``param_norm`` (θt)."""

    name = "layer_norms"
    table = "layers"
    columns = {"grad_norm": "float64", "step_size": "float64", "param_norm": "float64"}

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        return {"grad_norm": ctx.grad_norms, "step_size": ctx.update_norms, "param_norm": ctx.param_norms}


class UpdateRatio(Quantity):
    """``update_ratio`` per parameter tensor: ||θt − θt−1|| / ||θt−1|| (NaN where θt−1 is zero)."""

    name = "update_ratio"
    table = "layers"
    columns = {"update_ratio": "float64"}

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        before = ctx.before_norms
        ratio = ctx.update_norms / before
        return {"update_ratio": torch.where(before > 0, ratio, torch.full_like(ratio, math.nan))}


class DistanceFromInit(Quantity):
    """``distance_from_init``: ||θt − θ0||₂ over all parameters, θ0 the parameters when recording began."""

    name = "distance_from_init"
    columns = {"distance_from_init": "float64"}

    def __init__(self, every: int | None = None):
        super().__init__(every)
        self.initial: list[Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        self.initial = [p.detach().clone() for p in ctx.params]

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        return {"distance_from_init": total_norm(torch._foreach_sub([p.detach() for p in ctx.params], self.initial))}

    def state_dict(self) -> dict[str, Any]:
        return {"initial": [t.cpu() for t in self.initial]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        initial = _like(state["initial"], self.initial, "DistanceFromInit's initial parameters")
        self.initial = [t.to(p.device, p.dtype) for t, p in zip(initial, self.initial)]


class UpdateCosine(Quantity):
    """``update_cosine``: cosine between this record step's update and the previous record step's.

    Near 1: consecutive updates point the same way; near −1: oscillation. NaN on the first record.
    """

    name = "update_cosine"
    columns = {"update_cosine": "float64"}

    def __init__(self, every: int | None = None):
        super().__init__(every)
        self.previous: list[Tensor] | None = None

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        update = [u.clone() for u in ctx.update]
        if self.previous is None:
            value = ctx.nan()
        else:
            dot = sum(distributed.full((u.double() * v.double()).sum()) for u, v in zip(update, self.previous))
            value = dot / (total_norm(update).double() * total_norm(self.previous).double())
        self.previous = update
        return {"update_cosine": value}

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else [t.cpu() for t in self.previous]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = state["previous"]
        if previous is not None:
            previous = _like(previous, self._params, "UpdateCosine's previous update")
        self.previous = None if previous is None else [t.to(self._device) for t in previous]

    def setup(self, ctx: SetupContext) -> None:
        self._device = ctx.params[0].device
        self._params = ctx.params


def _like(tensors: Any, params: list[Tensor], what: str) -> list[Tensor]:
    """``tensors`` if it is one tensor per parameter, each of its shape; else a ValueError naming ``what``."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
        raise ValueError(f"{what}: expected {len(params)} tensors, one per parameter, got {type(tensors).__name__}")
    for t, p in zip(tensors, params):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what}: a tensor of shape {shape} for a parameter of shape {tuple(p.shape)}")
    return list(tensors)


DEFAULTS = (StepSize, Smoothness, LayerNorms)
