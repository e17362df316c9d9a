"""What the Recorder measures on record steps: one small class per quantity.

A quantity declares the columns it adds (to the ``metrics`` table, one value per record
step, or to the ``layers`` table, one value per parameter tensor) and computes them from a
:class:`StepContext` as device tensors: the Recorder moves every result of a record step to
the host in one transfer, so ``compute`` must not call ``.item()`` or ``.tolist()``.

Example, a quantity of your own::

    class ParamSum(Quantity):
        name = "param_sum"
        columns = {"param_sum": "float64"}

        def compute(self, ctx):
            return {"param_sum": sum(p.sum() for p in ctx.params)}

    rec = Recorder(model, optimizer, run_dir, quantities=[*Recorder.default_quantities(), ParamSum()])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from autoclip import ClipInfo
from dynamics import distributed
from dynamics.probe import Probe
from dynamics.smoothness import norms, smoothness_along, total_norm

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
    ``info`` the clipper's ClipInfo, ``closure`` the step's loss function or None.
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


# -- the built-in quantities ------------------------------------------------------------------


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
        if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 0):
            raise ValueError(f"probes must be an integer >= 0, got {probes!r}")
        if direction not in (None, "update", "gradient"):
            raise ValueError(f"direction must be 'update' or 'gradient', got {direction!r}")
        self.probes, self.direction, self.every = probes, direction, every

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

    def __init__(self, every: int | None = None):
        self.every = every

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        before = ctx.before_norms
        ratio = ctx.update_norms / before
        return {"update_ratio": torch.where(before > 0, ratio, torch.full_like(ratio, math.nan))}


class DistanceFromInit(Quantity):
    """``distance_from_init``: ||θt − θ0||₂ over all parameters, θ0 the parameters when recording began."""

    name = "distance_from_init"
    columns = {"distance_from_init": "float64"}

    def __init__(self, every: int | None = None):
        self.every = every
        self.initial: list[Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        self.initial = [p.detach().clone() for p in ctx.params]

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        return {"distance_from_init": total_norm(torch._foreach_sub([p.detach() for p in ctx.params], self.initial))}

    def state_dict(self) -> dict[str, Any]:
        return {"initial": [t.cpu() for t in self.initial]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = [t.to(p.device, p.dtype) for t, p in zip(state["initial"], self.initial)]


class UpdateCosine(Quantity):
    """``update_cosine``: cosine between this record step's update and the previous record step's.

    Near 1: consecutive updates point the same way; near −1: oscillation. NaN on the first record.
    """

    name = "update_cosine"
    columns = {"update_cosine": "float64"}

    def __init__(self, every: int | None = None):
        self.every = every
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
        self.previous = None if previous is None else [t.to(self._device) for t in previous]

    def setup(self, ctx: SetupContext) -> None:
        self._device = ctx.params[0].device


class Sharpness(Quantity):
    """``sharpness``: the top Hessian eigenvalue of the step's loss at θt−1, on the same batch.

    Power iteration on Hessian-vector products (double backward) from a start vector drawn
    from a generator seeded by the step (the training RNG is untouched), ``iters`` products,
    no host sync. It finds the eigenvalue of largest magnitude, which is the top one where the
    Hessian is positive semi-definite. Each product is a double backward, several training steps'
    worth (about ten for the built-in BLSTM on CPU), so measure it far less often than the other
    quantities (``every=1000``) or with fewer ``iters``. One process only; NaN without a closure.
    """

    name = "sharpness"
    columns = {"sharpness": "float64"}

    def __init__(self, every: int | None = None, iters: int = 20):
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"iters must be a positive integer, got {iters!r}")
        self.every, self.iters = every, iters

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        if ctx.prober is None:
            return {"sharpness": ctx.nan()}
        if distributed.world() > 1:
            raise ValueError("Sharpness runs on one process: drop it from the quantities under torch.distributed")
        params = ctx.params
        generator = torch.Generator(device=params[0].device).manual_seed(ctx.step)
        with ctx.prober.at(ctx.before), torch.enable_grad():
            loss = ctx.closure()
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
            if not pairs:  # linear in the parameters: the Hessian is zero
                return {"sharpness": torch.zeros((), dtype=torch.float64, device=params[0].device)}
            grads, wrt = [g for g, _ in pairs], [p for _, p in pairs]
            v = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in wrt]
            eigenvalue = None
            for _ in range(self.iters):
                v = torch._foreach_div(v, total_norm(v))
                hv = torch.autograd.grad(grads, wrt, v, retain_graph=True)
                eigenvalue = sum((a * b).sum() for a, b in zip(v, hv))  # Rayleigh quotient, ||v|| = 1
                v = [h.detach() for h in hv]
        return {"sharpness": eigenvalue.detach().double()}


DEFAULTS = (StepSize, Smoothness, LayerNorms)
