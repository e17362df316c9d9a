"""Curvature quantities: the top Hessian eigenvalue (sharpness) and the Hessian trace, from Hessian-vector products.

Both go through one :class:`HessianVectorProducts` of the step's loss at θt−1 (same batch,
same dropout masks), computed one of two ways:

- ``"fd"`` (default): central finite differences of gradients,
  Hv ≈ (∇f(θ + εv) − ∇f(θ − εv)) / 2ε, each gradient a plain ``backward()`` through the
  step's :class:`~dynamics.probe.Probe`. No double backward, so it works on ``torch.compile``'d
  models and cuDNN RNNs, and under DistributedDataParallel (the probe gradients are averaged
  over ranks like training gradients). Two gradient evaluations per product.
- ``"autograd"``: the exact double backward (Pearlmutter's trick), one process, eager models.
  One forward with its graph kept, then one backward of a backward per product.

The step of the finite difference is ε = √u (1 + ‖θ‖) / ‖v‖, u the machine epsilon of the
parameters' dtype (the coarsest if they differ). Why: the displacement εv is then about √u
relative to θ coordinate by coordinate (when v and θ are alike in shape), so rounding θ ± εv
to the dtype's grid and rounding the two gradients cost a relative error of order √u in Hv,
while the central difference's truncation error, of order ε² ‖∇³f‖, is of order u (1 + ‖θ‖)²
relative to the curvature: it vanishes for a quadratic, which the difference reproduces up
to rounding (about 1e-8 relative in float64, 3e-4 in float32). The ``1 +`` keeps the step
away from zero at θ = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor

from dynamics import distributed
from dynamics.checks import positive_int
from dynamics.errors import DynamicsError
from dynamics.probe import Probe
from dynamics.quantities.base import Quantity, StepContext
from dynamics.smoothness import total_norm

HVP_METHODS = ("fd", "autograd")


def hvp_method(value) -> str:
    """A Hessian-vector product method: 'fd' (finite differences of gradients) or 'autograd' (double backward)."""
    if value not in HVP_METHODS:
        raise DynamicsError(f"hvp must be 'fd' (finite differences of gradients) or 'autograd', got {value!r}")
    return value


def compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` or one of its submodules runs through ``torch.compile``."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )


def finite_difference_step(theta: list[Tensor]) -> Tensor:
    """√u (1 + ‖θ‖) as a 0-dim float64 device tensor: ε‖v‖ of the central difference (see the module docstring)."""
    u = max(torch.finfo(t.dtype).eps for t in theta if t.is_floating_point())
    return math.sqrt(u) * (1 + total_norm(theta).double())


def dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ aᵢ·bᵢ over tensor lists, accumulated in float64, on the device."""
    return sum((x * y).sum(dtype=torch.float64) for x, y in zip(a, b))


class HessianVectorProducts:
    """Hv of the step's loss at ``theta``, for any list ``v`` shaped like the parameters.

    A context manager: for ``"autograd"`` the graph of the gradient lives inside it (with the
    parameters holding ``theta`` and the RNG replayed); for ``"fd"`` each product is two probe
    gradients, each leaving no trace. The result is a new list of tensors, zeros for
    parameters the loss does not depend on. Example::

        with HessianVectorProducts(probe, theta, "fd") as hvp:
            hv = hvp(v)
    """

    def __init__(self, probe: Probe, theta: list[Tensor], method: str = "fd", owner: str = "HessianVectorProducts"):
        self.probe = probe
        self.theta = theta
        self.method = hvp_method(method)
        self.owner = owner  # who asks, for error messages
        self._stack: ExitStack | None = None

    def __enter__(self) -> HessianVectorProducts:
        if self.method == "fd":
            self._scale = finite_difference_step(self.theta)
            return self
        self._stack = ExitStack()
        self._stack.enter_context(self.probe.at(self.theta))
        self._stack.enter_context(torch.enable_grad())
        try:
            loss = self.probe.loss()
            grads = self._double_backward(
                lambda: torch.autograd.grad(loss, self.probe.params, create_graph=True, allow_unused=True)
            )
        except BaseException:
            self._stack.close()
            raise
        # gradients that are constant in the parameters (a linear loss) add nothing to Hv
        self._pairs = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        if self.method == "fd":
            return self._finite_difference(v)
        return self._autograd(v)

    def _finite_difference(self, v: list[Tensor]) -> list[Tensor]:
        v_norm = total_norm(v).double()
        step = self._scale / torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))  # v = 0: Hv = 0
        with torch.no_grad():
            delta = torch._foreach_mul(v, step)
            plus = self.probe.grads(torch._foreach_add(self.theta, delta))
            hv = [g.detach().clone() for g in plus]  # a probe's grads may be reused (DDP bucket views)
            minus = self.probe.grads(torch._foreach_sub(self.theta, delta))
            torch._foreach_sub_(hv, minus)
            torch._foreach_div_(hv, 2 * step)
        return hv

    def _autograd(self, v: list[Tensor]) -> list[Tensor]:
        params = self.probe.params
        if not self._pairs:
            return [torch.zeros_like(p) for p in params]
        outputs = [g for _, g in self._pairs]
        directions = [v[i] for i, _ in self._pairs]
        hv = self._double_backward(
            lambda: torch.autograd.grad(outputs, params, directions, retain_graph=True, allow_unused=True)
        )
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]

    def _double_backward(self, fn: Callable[[], tuple]) -> tuple:
        try:
            return fn()
        except RuntimeError as e:
            raise DynamicsError(
                f"{self.owner}(hvp='autograd') needs a double backward, which failed ({e}); "
                "(compiled models and cuDNN RNNs have none): use hvp='fd'"
            ) from e


def check_hvp_layout(quantity: Quantity, method: str, ctx: StepContext) -> None:
    """Refuse what the HVPs cannot do, before any work: sharded parameters; autograd on compiled or DDP models."""
    label = type(quantity).__name__
    if distributed.sharded(distributed.unwrap(ctx.model)):
        raise DynamicsError(f"{label} does not support sharded (FSDP2) parameters: drop it from the quantities")
    if method != "autograd":
        return
    if distributed.world() > 1:
        raise DynamicsError(f"{label}(hvp='autograd') runs on one process: use hvp='fd' under torch.distributed")
    if compiled(ctx.model):
        raise DynamicsError(f"{label}(hvp='autograd'): a torch.compile'd model has no double backward: use hvp='fd'")


def power_iteration(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor], iters: int) -> Tensor:
    """The Rayleigh quotient vᵀHv/vᵀv after ``iters`` products, starting from ``v`` (0-dim float64, no sync)."""
    eigenvalue = torch.zeros((), dtype=torch.float64, device=v[0].device)
    for _ in range(iters):
        norm = total_norm(v)
        v = torch._foreach_div(v, torch.where(norm > 0, norm, torch.ones_like(norm)))  # Hv = 0: stays 0
        hv = hvp(v)
        eigenvalue = dot(v, hv)
        v = hv
    return eigenvalue


def _generator(ctx: StepContext) -> torch.Generator:
    """A generator seeded by the step, on the parameters' device: the training RNG stays untouched."""
    return torch.Generator(device=ctx.params[0].device).manual_seed(ctx.step)


class Sharpness(Quantity):
    """``sharpness``: the top Hessian eigenvalue of the step's loss at θt−1, on the same batch.

    Power iteration on Hessian-vector products from a start vector drawn from a generator
    seeded by the step (the training RNG is untouched), ``iters`` products, no host sync. It
    finds the eigenvalue of largest magnitude, which is the top one where the Hessian is
    positive semi-definite. ``hvp="fd"`` (default): two gradient evaluations per product, on
    any model (compiled, cuDNN, DDP); ``hvp="autograd"``: exact double backward, one process,
    eager models. Either way a measurement costs dozens of training steps, so measure it far
    less often than the other quantities (``every=1000``) or with fewer ``iters``. NaN without
    a closure.
    """

    name = "sharpness"
    columns = {"sharpness": "float64"}

    def __init__(self, every: int | None = None, iters: int = 20, hvp: str = "fd"):
        super().__init__(every)
        self.iters = positive_int("iters", iters)
        self.hvp = hvp_method(hvp)

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        if ctx.prober is None:
            return {"sharpness": ctx.nan()}
        check_hvp_layout(self, self.hvp, ctx)
        generator = _generator(ctx)
        device = generator.device
        v = [torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype).to(p.device) for p in ctx.params]
        with HessianVectorProducts(ctx.prober, ctx.before, self.hvp, type(self).__name__) as hvp:
            return {"sharpness": power_iteration(hvp, v, self.iters)}

    def __repr__(self) -> str:
        every = "" if self.every is None else f"every={self.every}, "
        return f"Sharpness({every}iters={self.iters}, hvp={self.hvp!r})"


class HessianTrace(Quantity):
    """``hessian_trace``: tr(H) of the step's loss at θt−1 by Hutchinson's estimator, and its standard error.

    tr(H) ≈ mean of vᵀHv over ``samples`` Rademacher vectors v (entries ±1) drawn from a
    generator seeded by the step (the training RNG is untouched). Exact for a diagonal
    Hessian (vᵀDv = tr D for every such v); otherwise unbiased with variance
    2(‖H‖²_F − Σ Hᵢᵢ²)/samples. ``hessian_trace_se`` is the standard error estimated from the
    samples (NaN with ``samples=1``). Same Hessian-vector products as :class:`Sharpness`
    (``hvp="fd"`` or ``"autograd"``), ``samples`` of them. NaN without a closure.
    """

    name = "hessian_trace"
    columns = {"hessian_trace": "float64", "hessian_trace_se": "float64"}

    def __init__(self, every: int | None = None, samples: int = 10, hvp: str = "fd"):
        super().__init__(every)
        self.samples = positive_int("samples", samples)
        self.hvp = hvp_method(hvp)

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        if ctx.prober is None:
            return {"hessian_trace": ctx.nan(), "hessian_trace_se": ctx.nan()}
        check_hvp_layout(self, self.hvp, ctx)
        generator = _generator(ctx)
        device = generator.device
        values = []
        with HessianVectorProducts(ctx.prober, ctx.before, self.hvp, type(self).__name__) as hvp:
            for _ in range(self.samples):
                v = [
                    (torch.randint(0, 2, p.shape, generator=generator, device=device) * 2 - 1).to(p.device, p.dtype)
                    for p in ctx.params
                ]
                values.append(dot(v, hvp(v)))
        values = torch.stack(values)
        se = values.std() / math.sqrt(self.samples) if self.samples > 1 else ctx.nan()
        return {"hessian_trace": values.mean(), "hessian_trace_se": se}

    def __repr__(self) -> str:
        every = "" if self.every is None else f"every={self.every}, "
        return f"HessianTrace({every}samples={self.samples}, hvp={self.hvp!r})"
