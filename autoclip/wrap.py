"""An optimizer whose step() clips first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from autoclip.base import Clipper
from autoclip.info import ClipInfo


class ClippedOptimizer(Optimizer):
    """Wraps an optimizer so that ``step()`` runs ``clipper.step()`` before it.

    It is a ``torch.optim.Optimizer`` sharing the wrapped optimizer's ``param_groups``
    and ``state``, so learning-rate schedulers and ``torch.amp.GradScaler`` accept it
    (``scaler.step(opt)`` unscales before our step runs, so the clipper sees true
    gradients, and steps the scaler skips never reach the clipper). A step whose
    gradients are non-finite under ``nonfinite="skip"`` does not step the optimizer.
    ``state_dict()`` holds both the optimizer's and the clipper's state.

    Example::

        opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-3), AutoClip(model.parameters(), p=10))
        loss.backward()
        opt.step()            # clips, then steps Adam
        opt.last_info         # the ClipInfo of that step
    """

    def __init__(self, optimizer: Optimizer, clipper: Clipper):
        self.optimizer = optimizer
        self.clipper = clipper
        self.last_info: ClipInfo | None = None
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # The wrapped optimizer owns these; load_state_dict replaces its objects, so forward.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (if given), clip, then step the wrapped optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_info = self.clipper.step()
        if not self.last_info.skip:
            self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add parameter groups to the wrapped optimizer before wrapping it")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.clipper.load_state_dict(state_dict["clipper"])

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, {self.clipper!r})"


def wrap(optimizer: Optimizer, clipper: Clipper) -> ClippedOptimizer:
    """An optimizer whose ``step()`` clips with ``clipper`` first; see ``ClippedOptimizer``."""
    return ClippedOptimizer(optimizer, clipper)
