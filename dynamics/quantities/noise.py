"""The gradient noise scale (McCandlish, Kaplan, Amodei et al., 2018): the batch size beyond which more data per
step stops paying off.

B_simple = tr(Σ) / |G|², Σ the per-example gradient covariance and G the true gradient. From
k small-batch gradients gᵢ (b examples each) and their mean g_B (B = k·b examples), with
S = mean |gᵢ|² and T = |g_B|² (so E S = |G|² + tr(Σ)/b and E T = |G|² + tr(Σ)/B):

    |G|²  ≈ (B·T − b·S) / (B − b)          = (k·T − S) / (k − 1)
    tr(Σ) ≈ (S − T) / (1/b − 1/B)          = b·k·(S − T) / (k − 1)

both unbiased. Each is averaged exponentially over measurements and B_simple is the ratio of
the two averages (not the average of ratios, which the noise in |G|² would bias).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dynamics import checks, distributed
from dynamics.errors import DynamicsError
from dynamics.quantities.base import Quantity, SetupContext, StepContext


def squared_norm(tensors: list[Tensor]) -> Tensor:
    """Σ ‖t‖² over tensors, accumulated in float64, on the device (no sync)."""
    return sum(torch.linalg.vector_norm(t, dtype=torch.float64).square() for t in tensors)


class GradientNoiseScale(Quantity):
    """``gradient_noise_scale`` (B_simple), with ``gns_grad_sq`` (|G|²) and ``gns_trace_sigma`` (tr Σ).

    Its two batch sizes come from what the step already computes:

    - one process: the micro-batches of gradient accumulation. Call ``rec.micro_batch()`` after
      each micro-batch's backward (at least two per step, of equal size); the gradient of
      micro-batch i is the difference of consecutive snapshots. The small batch is one
      micro-batch, the big one the whole step.
    - DistributedDataParallel: the ranks. Each rank's own gradient of the step's loss at θt−1
      is evaluated once more through the step's closure inside ``model.no_sync()`` (same batch,
      same dropout masks, leaving no trace: one extra forward and backward per measurement);
      the squared norms and the gradients are then summed over ranks. The small batch is one
      rank's step (all its micro-batches), the big one all ranks'. Needs the closure.

    ``micro_batch_size``: examples in one micro-batch of one process. With it, B_simple and
    tr(Σ) are per example, as in the paper; without it (None), they count micro-batches
    (multiply by your micro-batch size). |G|² is in the units of the step's gradient: the
    mean loss's when the accumulation loop scales each micro-batch's loss by 1/n. ``beta``:
    the exponential moving average's decay per measurement (bias-corrected, so the columns
    are meaningful from the first one); a measurement that is not finite leaves the averages
    as they were. The averages are in ``state_dict``, so a resumed run measures what an
    uninterrupted one would.
    """

    name = "gradient_noise_scale"
    columns = {"gradient_noise_scale": "float64", "gns_grad_sq": "float64", "gns_trace_sigma": "float64"}
    uses_micro_batches = True  # rec.micro_batch() keeps gradient snapshots on the steps it measures

    def __init__(self, every: int | None = None, beta: float = 0.9, micro_batch_size: int | None = None):
        super().__init__(every)
        self.beta = checks.finite_float("beta", beta, 0.0, 1.0)
        if self.beta == 1.0:
            raise DynamicsError("beta must be in [0, 1): with beta=1 the averages never move")
        self.micro_batch_size = (
            None if micro_batch_size is None else checks.positive_int("micro_batch_size", micro_batch_size)
        )
        self._device = torch.device("cpu")
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        self.count, self.grad_sq, self.trace = zero.clone(), zero.clone(), zero.clone()

    def setup(self, ctx: SetupContext) -> None:
        self._device = ctx.params[0].device
        self._reset()

    def compute(self, ctx: StepContext) -> dict[str, Tensor]:
        small_sq, big_sq, k, small_batch = self._gradients(ctx)
        grad_sq = (k * big_sq - small_sq) / (k - 1)
        trace = small_batch * k * (small_sq - big_sq) / (k - 1)
        finite = torch.isfinite(grad_sq) & torch.isfinite(trace)
        # device-side: a non-finite measurement (an overflowing AMP step) leaves the averages as they were
        self.grad_sq = torch.where(finite, self.beta * self.grad_sq + (1 - self.beta) * grad_sq, self.grad_sq)
        self.trace = torch.where(finite, self.beta * self.trace + (1 - self.beta) * trace, self.trace)
        self.count = self.count + finite.double()
        correction = 1 - torch.pow(self.beta, self.count)  # 0 before the first finite measurement: NaN
        return {
            "gradient_noise_scale": self.trace / self.grad_sq,
            "gns_grad_sq": self.grad_sq / correction,
            "gns_trace_sigma": self.trace / correction,
        }

    def _gradients(self, ctx: StepContext) -> tuple[Tensor, Tensor, int, int]:
        """(S, T, k, b): mean squared norm of the k small-batch gradients, that of their mean, and b."""
        micro = ctx.micro_grads or []
        unit = self.micro_batch_size or 1
        if distributed.world() > 1:
            return self._ranks(ctx, unit * max(len(micro), 1))
        n = len(micro)
        if n < 2:
            raise DynamicsError(
                f"GradientNoiseScale needs two batch sizes, and step {ctx.step} had "
                f"{n or 'no'} micro-batch snapshot{'' if n == 1 else 's'}: accumulate gradients over at least two "
                "micro-batches and call rec.micro_batch() after each one's backward, or train under "
                "DistributedDataParallel"
            )
        # micro-batch i's gradient is the difference of consecutive snapshots; n times it has the scale of the
        # step's gradient (the snapshots' sum), whatever the loop's loss scaling, so their mean is the big batch
        small = [squared_norm(micro[0])]
        for previous, current in zip(micro, micro[1:]):
            small.append(squared_norm(torch._foreach_sub(current, previous)))
        small_sq = n * n * torch.stack(small).mean()
        return small_sq, squared_norm(micro[-1]), n, unit

    def _ranks(self, ctx: StepContext, small_batch: int) -> tuple[Tensor, Tensor, int, int]:
        model = ctx.model
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise DynamicsError(
                "GradientNoiseScale under torch.distributed takes its small batches from the ranks of a "
                "DistributedDataParallel model: wrap the model in DDP (FSDP and hand-made all-reduces are not "
                "supported)"
            )
        if ctx.prober is None:
            raise DynamicsError(
                "GradientNoiseScale under DistributedDataParallel re-evaluates each rank's own gradient: "
                "pass closure= to Recorder.end() (Recorder.step does)"
            )
        with model.no_sync():  # this rank's gradient alone, before any all-reduce
            own = ctx.prober.grads(ctx.before)
        flat = torch.cat([g.detach().reshape(-1) for g in own])
        own_sq = torch.linalg.vector_norm(flat, dtype=torch.float64).square()
        world = distributed.world()
        torch.distributed.all_reduce(flat)
        torch.distributed.all_reduce(own_sq)
        big_sq = (torch.linalg.vector_norm(flat, dtype=torch.float64) / world).square()
        return own_sq / world, big_sq, world, small_batch

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "grad_sq": self.grad_sq.cpu(), "trace": self.trace.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.grad_sq, self.trace = (state[k].to(self._device) for k in ("count", "grad_sq", "trace"))

    def __repr__(self) -> str:
        args = [] if self.every is None else [f"every={self.every}"]
        args.append(f"beta={self.beta}")
        if self.micro_batch_size is not None:
            args.append(f"micro_batch_size={self.micro_batch_size}")
        return f"GradientNoiseScale({', '.join(args)})"
