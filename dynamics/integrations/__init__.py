"""Callbacks that record (and clip) training run by a framework's trainer.

- ``dynamics.integrations.lightning``: ``DynamicsCallback`` and ``AutoClipCallback`` for a Lightning ``Trainer``.
- ``dynamics.integrations.huggingface``: ``DynamicsCallback``, ``AutoClipCallback`` and ``RecordingTrainer`` for a
  Hugging Face ``transformers.Trainer``.

Each module imports its framework; this package imports neither, so ``dynamics`` works without them.
"""

from __future__ import annotations

import torch

from autoclip import ClipInfo


@torch.no_grad()
def skip_step(optimizer: torch.optim.Optimizer, info: ClipInfo) -> None:
    """Make the coming ``optimizer.step()`` a no-op when the clipper says to skip it (non-finite gradients).

    A trainer's callback cannot skip the step itself; torch optimizers leave parameters without a
    gradient untouched (state included), so the gradients are dropped.
    """
    if info.skip:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
