"""Gradients of one training step's loss at other parameters, leaving no trace on training.

A probe re-evaluates the step's loss (the closure: same batch) after replaying the random
state the step's forward pass started from (same dropout masks). Parameters are restored by
copying saved values, never by subtracting, so they come back bit for bit; ``.grad`` is put
back as it was. The caller restores buffers (BatchNorm statistics) and its own RNG stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from dynamics.checkpoint import set_rng_state
from dynamics.errors import DynamicsError


class Probe:
    """Evaluate ``closure`` at other parameter values of ``params``.

    Example::

        probe = Probe(params, closure, rng_before)
        grads = probe.grads(theta)          # gradient at theta (a list like params)
        with probe.at(theta):               # params hold theta inside, RNG replayed
            loss = closure()
    """

    def __init__(self, params: list[Tensor], closure: Callable[[], Tensor], rng: dict, device=None):
        self.params = params
        self.closure = closure
        self.rng = rng
        self.device = device

    @contextmanager
    def at(self, theta: list[Tensor]) -> Iterator[None]:
        """Parameters hold ``theta`` and the RNG is replayed inside; both are restored on exit."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            saved_grads = [p.grad for p in self.params]
            for p, value in zip(self.params, theta):
                p.copy_(value)
                p.grad = None
        set_rng_state(self.rng, self.device)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value, g in zip(self.params, saved, saved_grads):
                    p.copy_(value)
                    p.grad = g

    def loss(self) -> Tensor:
        """The closure's loss (call with gradients enabled), checked: one number with a graph to back-propagate."""
        loss = self.closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            got = (
                f"a tensor of shape {tuple(loss.shape)}{'' if loss.requires_grad else ' without a graph'}"
                if isinstance(loss, Tensor)
                else type(loss).__name__
            )
            raise DynamicsError(
                f"the step's closure (closure= of Recorder.end, or Recorder.step's) must return the loss as a "
                f"one-number tensor computed from the model, with gradients enabled, got {got}"
            )
        return loss

    def grads(self, theta: list[Tensor]) -> list[Tensor]:
        """The gradient at ``theta``, through ``backward()`` (so averaged over ranks under DDP/FSDP)."""
        with self.at(theta):
            with torch.enable_grad():
                self.loss().backward()
            return [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
