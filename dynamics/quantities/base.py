"""The base of every quantity: a schedule (``every``) and a compute, and the contexts it sees.

A quantity declares the columns it adds (to the ``metrics`` table, one value per record
step, or to the ``layers`` table, one value per parameter tensor) and computes them from a
:class:`StepContext` as device tensors: the Recorder moves every result of a record step to
the host in one transfer, so ``compute`` must not call ``.item()`` or ``.tolist()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from autoclip import ClipInfo
from dynamics.checks import optional_every
from dynamics.probe import Probe
from dynamics.smoothness import norms

ARROW_TYPES = ("float64", "float32", "int64", "bool")


class Quantity:
    """Base class: ``name``, ``columns`` (column -> arrow type name), ``table``, ``every``, ``compute(ctx)``.

    ``every=None`` measures on every record step of the Recorder; an integer (a multiple of
    the Recorder's ``every``) measures less often, and the other rows hold NaN. A quantity
    with state (a previous update, the initial parameters) keeps it in ``state_dict`` so a
    resumed run measures what an uninterrupted one would.
    """

    name: str = ""
    columns: dict[str, str] = {}
    table: str = "metrics"  # or "layers": one value per parameter tensor
    every: int | None = None
    uses_micro_batches: bool = False  # True: reads ctx.micro_grads, so rec.micro_batch() keeps snapshots for it

    def __init__(self, every: int | None = None):
        self.every = optional_every(f"{type(self).__name__}.every", every)

    def should_compute(self, step: int) -> bool:
        """Whether to measure at record step ``step``: always with ``every=None``, else when it divides the step."""
        return self.every is None or step % self.every == 0

    def setup(self, ctx: SetupContext) -> None:
        """Called once when the Recorder starts (before any step, and before a resume loads state)."""

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        every = "" if self.every is None else f"every={self.every}"
        return f"{type(self).__name__}({every})"


@dataclass
class SetupContext:
    """What a quantity sees when the Recorder starts: the model and its trainable parameters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    names: list[str]
    params: list[Tensor]


@dataclass
class StepContext:
    """One record step, as quantities see it.

    ``params`` hold θt (live: do not modify), ``before`` θt−1, ``update`` θt − θt−1, ``grads``
    the raw gradients at θt−1 before clipping, ``loss`` the step's loss (0-dim device tensor),
    ``info`` the clipper's ClipInfo, ``closure`` the step's loss function or None, ``micro_grads``
    the gradients accumulated after each micro-batch when the loop calls ``rec.micro_batch()``.
    ``probe(thetas)`` returns the gradient of the same loss on the same batch, with the same
    dropout masks, at each parameter list in ``thetas``; ``at(theta)`` evaluates anything there.
    Both leave no trace. The per-tensor norms are computed once and shared.
    """

    step: int
    epoch: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    names: list[str]
    params: list[Tensor]
    before: list[Tensor]
    update: list[Tensor]
    grads: list[Tensor]
    loss: Tensor
    info: ClipInfo
    closure: Callable[[], Tensor] | None
    probes: int = 1
    direction: str = "update"
    rng: dict | None = None
    device: torch.device | None = None
    micro_grads: list[list[Tensor]] | None = None  # cumulative gradients after each micro-batch (rec.micro_batch())
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _norms(self, key: str, tensors: list[Tensor]) -> Tensor:
        if key not in self._cache:
            self._cache[key] = norms(tensors)
        return self._cache[key]

    @property
    def update_norms(self) -> Tensor:
        """||θt − θt−1|| per parameter tensor."""
        return self._norms("update", self.update)

    @property
    def grad_norms(self) -> Tensor:
        """Raw gradient norm per parameter tensor."""
        return self._norms("grads", self.grads)

    @property
    def param_norms(self) -> Tensor:
        """||θt|| per parameter tensor."""
        return self._norms("params", [p.detach() for p in self.params])

    @property
    def before_norms(self) -> Tensor:
        """||θt−1|| per parameter tensor."""
        return self._norms("before", self.before)

    @property
    def prober(self) -> Probe | None:
        """The step's :class:`Probe`, or None without a closure."""
        if self.closure is None:
            return None
        if "probe" not in self._cache:
            self._cache["probe"] = Probe(self.params, self.closure, self.rng, self.device)
        return self._cache["probe"]

    def probe(self, thetas: list[list[Tensor]]) -> list[list[Tensor]]:
        """Gradients at each parameter list in ``thetas`` (same batch, same dropout masks, no trace)."""
        if self.prober is None:
            raise ValueError("probing needs the step's closure: pass closure= to Recorder.end()")
        return [self.prober.grads(theta) for theta in thetas]

    def nan(self) -> Tensor:
        return torch.full((), math.nan, dtype=torch.float64, device=self.device)
