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

from dynamics.quantities.base import ARROW_TYPES, Quantity, SetupContext, StepContext
from dynamics.quantities.builtin import (
    DEFAULTS,
    DistanceFromInit,
    LayerNorms,
    Smoothness,
    StepSize,
    UpdateCosine,
    UpdateRatio,
)
from dynamics.quantities.curvature import HessianTrace, HessianVectorProducts, Sharpness
from dynamics.quantities.noise import GradientNoiseScale

__all__ = [
    "ARROW_TYPES",
    "DEFAULTS",
    "DistanceFromInit",
    "GradientNoiseScale",
    "HessianTrace",
    "HessianVectorProducts",
    "LayerNorms",
    "Quantity",
    "SetupContext",
    "Sharpness",
    "Smoothness",
    "StepContext",
    "StepSize",
    "UpdateCosine",
    "UpdateRatio",
]
