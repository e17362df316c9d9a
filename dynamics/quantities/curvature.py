"""Curvature quantities: the top Hessian eigenvalue (sharpness)."""

from __future__ import annotations

import torch
from torch import Tensor

from dynamics import distributed
from dynamics.checks import positive_int
from dynamics.quantities.base import Quantity, StepContext
from dynamics.smoothness import total_norm


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
        super().__init__(every)
        self.iters = positive_int("iters", iters)

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
