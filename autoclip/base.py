"""The interface every clipper shares: step() -> ClipInfo, state_dict(), load_state_dict()."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autoclip.info import ClipInfo
from autoclip.norms import grad_norms

NONFINITE_POLICIES = ("skip", "raise", "zero")

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


class NonFiniteGradientError(FloatingPointError):
    """Raised by a clipper with ``nonfinite="raise"`` when the gradient norm is NaN or inf."""


def param_groups(params: Params) -> list[list[Tensor]]:
    """Parameters as a list of groups, accepting what an optimizer accepts.

    ``params`` may be tensors (one group) or dicts with a ``"params"`` entry, such as
    ``optimizer.param_groups`` (one group per dict).
    """
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or of parameter-group dicts")
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = []
        for group in items:
            group_params = group["params"]
            groups.append([group_params] if isinstance(group_params, Tensor) else list(group_params))
        return groups
    return [items]


class Clipper:
    """Base class: holds the parameters, reads their gradients, applies the non-finite policy.

    Subclasses implement ``_clip(grads, norms) -> ClipInfo`` for finite gradients and may
    extend ``state_dict``/``load_state_dict``.
    """

    def __init__(self, params: Params, nonfinite: str = "skip", per_group: bool = False):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.groups = param_groups(params)
        if not any(self.groups):
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        self.nonfinite = nonfinite
        self.per_group = per_group
        self.steps = 0  # how many times step() was called
        self.nonfinite_steps = 0

    def grads(self) -> list[list[Tensor]]:
        """The current gradients, grouped as the parameters; parameters without one are skipped."""
        return [[p.grad for p in group if p.grad is not None] for group in self.groups]

    @torch.no_grad()
    def step(self) -> ClipInfo:
        """Measure the gradient norm and clip in place. Call after backward, before optimizer.step()."""
        self.steps += 1
        grads = self.grads()
        norms = grad_norms(grads if self.per_group else [[g for gs in grads for g in gs]], self._extras(grads))
        if math.isfinite(norms[0]):
            return self._clip(grads, norms)
        self.nonfinite_steps += 1
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"{type(self).__name__}: gradient norm is {norms[0]} at step {self.steps}; "
                "pass nonfinite='skip' to skip such steps or 'zero' to zero their gradients"
            )
        if self.nonfinite == "zero":
            for group in grads:
                for g in group:
                    g.zero_()
        return self._nonfinite_info(norms)

    def _extras(self, grads: list[list[Tensor]]) -> list[Tensor]:
        """Scalar device tensors to read back with the norms (appended to ``norms``)."""
        return []

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        raise NotImplementedError

    def _nonfinite_info(self, norms: list[float]) -> ClipInfo:
        return ClipInfo(norms[0], math.inf, False, finite=False, skip=self.nonfinite == "skip")

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only: round-trips through torch.save(weights_only=True)."""
        return {"steps": self.steps, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.nonfinite_steps = int(state["nonfinite_steps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"nonfinite={self.nonfinite!r}"
