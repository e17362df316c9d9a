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
    gradients are non-finite under ``nonfinite="skip"`` does not step the optimizer (with an
    on-device AutoClip that decision reads ``info.skip`` from the device, one wait per step; with
    ``nonfinite="zero"`` there is nothing to decide and no wait).
    ``state_dict()`` holds both the optimizer's and the clipper's state. It can be
    deep-copied and pickled (registered hooks are dropped, as torch optimizers drop them).

    With a closure, every evaluation of it is one clipper step: ``step(closure)``
    evaluates the closure (with grad enabled) and clips its gradients, then steps the
    wrapped optimizer with a closure whose first call returns that loss and whose later
    calls (LBFGS's iterations and line search) evaluate the closure again and clip
    again. So the optimizer only ever reads clipped gradients, and every gradient norm it
    saw is in the clipper's history. ``last_info`` is the first evaluation's ClipInfo
    (the gradient at the parameters the step starts from; it decides ``skip``) and
    ``step_infos`` those of every evaluation of the latest step. A non-finite later
    evaluation cannot be skipped, as the optimizer is already inside its step: under
    ``nonfinite="skip"`` its gradients reach the optimizer unchanged (and stay out of
    the history), as without a clipper; use ``"raise"`` to stop there instead.

    Example::

        opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-3), AutoClip(model.parameters(), p=10))
        loss.backward()
        opt.step()            # clips, then steps Adam
        opt.last_info         # the ClipInfo of that step
    """

    def __init__(self, optimizer: Optimizer, clipper: Clipper):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"wrap(optimizer, clipper): optimizer must be a torch Optimizer, not {_kind(optimizer)}")
        if not isinstance(clipper, Clipper):
            raise TypeError(
                f"wrap(optimizer, clipper): clipper must be an autoclip clipper (AutoClip, ClipNorm, ...), "
                f"not {_kind(clipper)}"
            )
        inner = optimizer
        while isinstance(inner, ClippedOptimizer):
            if inner.clipper is clipper:
                raise ValueError(
                    "wrap(optimizer, clipper): the optimizer is wrapped with this clipper already, so every step "
                    "would clip (and count in its history) twice: wrap the plain optimizer once"
                )
            inner = inner.optimizer
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        strangers = sum(id(p) not in optimized for group in clipper.groups for p in group)
        if strangers:
            raise ValueError(
                f"wrap(optimizer, clipper): the clipper holds {strangers} parameter(s) the optimizer does not "
                "optimize: build both from the same parameters, e.g. AutoClip(optimizer.param_groups)"
            )
        self.optimizer = optimizer
        self.clipper = clipper
        self._init_transient()

    def _init_transient(self) -> None:
        self.last_info: ClipInfo | None = None
        self.step_infos: tuple[ClipInfo, ...] = ()
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

    # Optimizer's own pickling keeps only defaults/state/param_groups, which here live in the
    # wrapped optimizer: without these a copy would lose the optimizer and the clipper.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "clipper": self.clipper,
            "last_info": self.last_info,
            "step_infos": self.step_infos,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizer = state["optimizer"]
        self.clipper = state["clipper"]
        self._init_transient()
        self.last_info = state["last_info"]
        self.step_infos = state["step_infos"]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip, then step the wrapped optimizer; with ``closure``, clip each evaluation of it.

        Returns what the wrapped optimizer's step returns (the closure's first loss), or
        that loss / None when a non-finite step is skipped.
        """
        if closure is None:
            self.last_info = self.clipper.step()
            self.step_infos = (self.last_info,)
            return None if self.last_info.skip else self.optimizer.step()

        infos: list[ClipInfo] = []

        def evaluate() -> Any:
            with torch.enable_grad():
                loss = closure()
            infos.append(self.clipper.step())
            self.step_infos = tuple(infos)
            return loss

        first_loss = evaluate()
        self.last_info = infos[0]
        if self.last_info.skip:
            return first_loss
        pending = [first_loss]

        def clipped_closure() -> Any:
            # the optimizer's first call reads the gradients already computed and clipped above
            return pending.pop() if pending else evaluate()

        return self.optimizer.step(clipped_closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add parameter groups to the wrapped optimizer before wrapping it")

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore both states from ``state_dict()``; on a mismatch raise and change neither."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "clipper"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"a wrapped optimizer's state_dict has keys ['clipper', 'optimizer'], got {keys}: "
                "load a plain optimizer's state_dict with .optimizer.load_state_dict(...)"
            )
        previous = self.clipper.state_dict()
        self.clipper.load_state_dict(state_dict["clipper"])  # checks everything before it changes anything
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except BaseException:
            self.clipper.load_state_dict(previous)
            raise

    def __repr__(self) -> str:
        return f"ClippedOptimizer({self.optimizer!r}, {self.clipper!r})"


def wrap(optimizer: Optimizer, clipper: Clipper) -> ClippedOptimizer:
    """An optimizer whose ``step()`` clips with ``clipper`` first; see ``ClippedOptimizer``.

    The clipper's parameters must be among the optimizer's.
    """
    return ClippedOptimizer(optimizer, clipper)


def _kind(x: object) -> str:
    return type(x).__name__
