"""The interface every clipper shares: step() -> ClipInfo, state_dict(), load_state_dict()."""

from __future__ import annotations

import difflib
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from autoclip.info import ClipInfo
from autoclip.norms import grad_norms

NONFINITE_POLICIES = ("skip", "raise", "zero")

Params = Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]]

_PARAMS_HELP = "pass model.parameters(), model.named_parameters(), a list of tensors or optimizer.param_groups"


class NonFiniteGradientError(FloatingPointError):
    """Raised by a clipper with ``nonfinite="raise"`` when the gradient norm is NaN or inf."""


def _check_container(params: object, owner: str, what: str) -> None:
    """Reject the things that are iterable but are not a list of parameters."""
    if isinstance(params, Tensor):
        raise TypeError(f"{owner} {what} must be an iterable of tensors, got a single tensor: wrap it in a list")
    if isinstance(params, torch.nn.Module):
        raise TypeError(f"{owner} {what} got a {type(params).__name__} module: pass module.parameters()")
    if isinstance(params, torch.optim.Optimizer):
        raise TypeError(f"{owner} {what} got an optimizer: pass optimizer.param_groups")
    if isinstance(params, Mapping):
        raise TypeError(f"{owner} {what} got a dict (a state_dict?): {_PARAMS_HELP}")
    if isinstance(params, (set, frozenset)):
        # as torch optimizers: a set has no order, so the norm's summation order would vary
        raise TypeError(f"{owner} {what} got a set, whose order changes between runs: pass a list")
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(f"{owner} {what} must be an iterable of tensors, got {type(params).__name__}: {_PARAMS_HELP}")


def _tensors(items: Iterable[Any], owner: str, where: str) -> list[Tensor]:
    """The tensors of one group; (name, tensor) pairs give their tensor; duplicates dropped with a warning."""
    out: list[Tensor] = []
    seen: set[int] = set()
    duplicates = 0
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, item = item
            label = f"{where}parameter {name!r}"
        else:
            label = f"{where}item {i}"
        if isinstance(item, torch.nn.Module):
            raise TypeError(f"{owner}: {label} is a {type(item).__name__} module: pass module.parameters()")
        if not isinstance(item, Tensor):
            raise TypeError(f"{owner} can only clip tensors, but {label} is a {type(item).__name__}: {_PARAMS_HELP}")
        if not (item.is_leaf or item.retains_grad):
            raise ValueError(
                f"{owner}: {label} is not a leaf tensor, so backward never fills its .grad: "
                "pass the model's parameters (or call .retain_grad() on it)"
            )
        if id(item) in seen:
            duplicates += 1
            continue
        seen.add(id(item))
        out.append(item)
    if duplicates:
        # torch optimizers only warn here; counting a gradient twice would inflate the norm, so drop the copy
        warnings.warn(
            f"{owner}: {where or 'the parameter list '}lists {duplicates} parameter(s) more than once; "
            "each is counted once in the gradient norm",
            UserWarning,
            stacklevel=5,
        )
    return out


def param_groups(params: Params, owner: str = "Clipper") -> list[list[Tensor]]:
    """Parameters as a list of groups, accepting what a torch optimizer accepts.

    ``params`` may be tensors or ``(name, tensor)`` pairs (one group), or dicts with a
    ``"params"`` entry such as ``optimizer.param_groups`` (one group per dict). Raises a
    clear TypeError/ValueError for anything else, for an empty list and for a parameter
    that appears in more than one group.
    """
    _check_container(params, owner, "params")
    items = list(params)
    if not items:
        raise ValueError(
            f"{owner} got an empty parameter list (a parameters() generator already used up by an optimizer?): "
            "pass list(model.parameters()) or optimizer.param_groups"
        )
    n_dicts = sum(isinstance(item, Mapping) for item in items)
    if 0 < n_dicts < len(items):
        raise TypeError(f"{owner} params mixes parameter-group dicts with tensors: put every tensor in a group dict")
    if n_dicts:
        groups = []
        for k, group in enumerate(items):
            if "params" not in group:
                raise ValueError(f"{owner}: parameter group {k} has no 'params' entry")
            group_params = group["params"]
            if isinstance(group_params, Tensor):
                group_params = [group_params]
            _check_container(group_params, owner, f"parameter group {k}'s 'params'")
            groups.append(_tensors(group_params, owner, f"parameter group {k}: "))
    else:
        groups = [_tensors(items, owner, "")]
    if not any(groups):
        raise ValueError(f"{owner} got an empty parameter list: {_PARAMS_HELP}")
    owners: dict[int, int] = {}
    for k, group in enumerate(groups):
        for p in group:
            if owners.setdefault(id(p), k) != k:
                raise ValueError(
                    f"{owner}: a parameter appears in parameter groups {owners[id(p)]} and {k}; "
                    "list each parameter in one group only"
                )
    return groups


def check_nonfinite(nonfinite: object) -> str:
    """The non-finite policy, or a clear error naming the valid ones."""
    if nonfinite not in NONFINITE_POLICIES:
        hint = difflib.get_close_matches(str(nonfinite), NONFINITE_POLICIES, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}{suggestion}")
    return nonfinite


def check_threshold(value: object, name: str, kind: str) -> float:
    """A fixed clipping threshold: a finite positive number, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{kind}: {name} must be a positive number, got {type(value).__name__} {value!r}")
    if math.isinf(value) and value > 0:
        raise ValueError(f"{kind}: {name}=inf never clips: use NoClip to measure the norm without clipping")
    if not value > 0:  # also NaN
        raise ValueError(f"{kind}: {name} must be a positive number, got {value}")
    return float(value)


class Clipper:
    """Base class: holds the parameters, reads their gradients, applies the non-finite policy.

    Subclasses implement ``_clip(grads, norms) -> ClipInfo`` for finite gradients and may
    extend ``state_dict``/``_check_state``/``_load_state``. The attributes named in
    ``_settings`` make the state dict (with the step counts) and the repr, and must match on
    load; ``_state_data`` names the other keys a subclass adds to its state dict.
    """

    _settings: tuple[str, ...] = ()
    _state_data: tuple[str, ...] = ()
    # key set of each kind's state dict -> the kind, to name the source of a mismatched state
    _kinds: dict[frozenset[str], str] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Clipper._kinds.setdefault(cls._state_keys(), cls.__name__)

    @classmethod
    def _state_keys(cls) -> frozenset[str]:
        return frozenset(("steps", "nonfinite_steps", *cls._settings, *cls._state_data))

    def __init__(self, params: Params, nonfinite: str = "skip", per_group: bool = False):
        self.nonfinite = check_nonfinite(nonfinite)
        if not isinstance(per_group, bool):
            raise TypeError(f"per_group must be True or False, got {type(per_group).__name__} {per_group!r}")
        self.groups = param_groups(params, type(self).__name__)
        self.per_group = per_group
        self.steps = 0  # how many times step() was called
        self.nonfinite_steps = 0

    def grads(self) -> list[list[Tensor]]:
        """The current gradients, grouped as the parameters; parameters without one are skipped."""
        return [[p.grad for p in group if p.grad is not None] for group in self.groups]

    @torch.no_grad()
    def step(self) -> ClipInfo:
        """Measure the gradient norm and clip in place. Call after backward, before optimizer.step().

        A step on which no parameter has a gradient reports ``grad_norm`` 0 and clips nothing.
        """
        self.steps += 1
        grads = self.grads()
        norms = grad_norms(grads if self.per_group else [[g for gs in grads for g in gs]], self._extras(grads))
        if math.isfinite(norms[0]):
            return self._clip(grads, norms)
        self.nonfinite_steps += 1
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"{type(self).__name__}: gradient norm is {norms[0]} at step {self.steps}; "
                "pass nonfinite='skip' to skip such steps or 'zero' to zero their gradients"
            )
        if self.nonfinite == "zero":
            for group in grads:
                for g in group:
                    g.zero_()
        return self._nonfinite_info(norms)

    def _extras(self, grads: list[list[Tensor]]) -> list[Tensor]:
        """Scalar device tensors to read back with the norms (appended to ``norms``)."""
        return []

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        raise NotImplementedError

    def _nonfinite_info(self, norms: list[float]) -> ClipInfo:
        return ClipInfo(norms[0], math.inf, False, finite=False, skip=self.nonfinite == "skip")

    def state_dict(self) -> dict[str, Any]:
        """The step counts and the declared settings (``_settings``); subclasses add their ``_state_data``.

        Plain tensors and numbers only: round-trips through torch.save(weights_only=True).
        """
        return {
            "steps": self.steps,
            "nonfinite_steps": self.nonfinite_steps,
            **{key: getattr(self, key) for key in self._settings},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict()`` of a clipper of the same kind and settings.

        Raises ValueError, changing nothing, for a state of another kind, other settings
        (say another ``p``) or another number of parameter groups.
        """
        self._check_state(state)
        self._load_state(state)

    def _check_state(self, state: Any) -> None:
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(f"{name}.load_state_dict expects the dict that state_dict() returns, not {_kind(state)}")
        keys = frozenset(state)
        if {"optimizer", "clipper"} <= keys:
            raise ValueError(f"this is a wrapped optimizer's state_dict: pass its ['clipper'] entry to {name}")
        expected = self._state_keys()
        if keys != expected:
            source = Clipper._kinds.get(keys)
            if source is not None and source != name:
                raise ValueError(f"this state_dict is from a {source}, not a {name}: load it into a {source}")
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise ValueError(f"not a {name} state_dict: missing keys {missing}, unexpected keys {extra}")
        for key in ("steps", "nonfinite_steps"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} state_dict: {key} must be a non-negative integer, got {value!r}")
        for key in self._settings:
            mine, theirs = getattr(self, key), state[key]
            if theirs != mine:
                raise ValueError(
                    f"{name} state_dict was saved with {key}={theirs!r}, this {name} has {key}={mine!r}: "
                    f"construct it with {key}={theirs!r} to resume that state"
                )

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.nonfinite_steps = int(state["nonfinite_steps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        """The declared settings, then the non-finite policy."""
        settings = [f"{key}={_setting(getattr(self, key))}" for key in self._settings]
        return ", ".join([*settings, f"nonfinite={self.nonfinite!r}"])


def _setting(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _kind(x: object) -> str:
    return type(x).__name__
