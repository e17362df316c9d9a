"""What the Recorder is given, checked once when it starts: each mistake named with its fix."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoclip import ClippedOptimizer, Clipper, NoClip
from dynamics import checks
from dynamics.errors import ArgumentTypeError, DynamicsError
from dynamics.quantities import ARROW_TYPES, Quantity
from dynamics.run import METRICS_BASE, METRICS_LAST, RunError

STATE_VERSION = 2  # of Recorder.state_dict(); a state from a newer dyn is refused, not misread
STATE_KEYS = ("t", "epoch", "time_s", "journal", "clipper")

Logger = Callable[[dict[str, float], int], Any]


def check_objects(model: Any, optimizer: Any, run_dir: Any, config: Any, resume: Any) -> None:
    """The types of the Recorder's main arguments."""
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"optimizer must be a torch.optim.Optimizer built from model.parameters(), got {type(optimizer).__name__}"
        )
    if not isinstance(run_dir, (str, Path)) or not str(run_dir):
        raise ArgumentTypeError(f"run_dir must be a path, got {type(run_dir).__name__} {run_dir!r}")
    if config is not None and not isinstance(config, dict):
        raise ArgumentTypeError(f"config must be a dict of settings to record, got {type(config).__name__}")
    if not isinstance(resume, (bool, dict)):
        raise ArgumentTypeError("resume must be False, True (from RUN_DIR/checkpoint.pt) or a Recorder state_dict()")


def check_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> None:
    """The optimizer must hold the model's parameters; holding only some of them is warned about."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = {id(p) for p in params}
    if not held & mine:
        raise DynamicsError("the optimizer holds none of the model's parameters: build it from model.parameters()")
    if mine - held:
        warnings.warn(
            f"the optimizer holds {len(mine & held)} of the model's {len(mine)} trainable parameter tensors: "
            "the others never change (their step size is 0); freeze them (requires_grad=False) to leave them out",
            UserWarning,
            stacklevel=4,
        )


def check_clipper(
    clipper: Any, module: torch.nn.Module, params: list[Tensor], optimizer: torch.optim.Optimizer
) -> Clipper:
    """The clipper (NoClip when None): of this model's parameters, and not clipping twice through wrap()."""
    if clipper is None:
        return NoClip(params)
    if not isinstance(clipper, Clipper):
        raise ArgumentTypeError(
            f"clipper must be a Clipper such as AutoClip(model.parameters(), p=10), got {type(clipper).__name__} "
            f"{clipper!r}"
        )
    mine = {id(p) for p in module.parameters()}
    if any(id(p) not in mine for group in clipper.groups for p in group):
        raise DynamicsError("the clipper holds parameters that are not the model's: build it from model.parameters()")
    if getattr(optimizer, "clipper", None) is clipper:
        raise DynamicsError(
            "the optimizer from autoclip.wrap() already clips with this clipper, so every step would count twice: "
            "give the Recorder the unwrapped optimizer (wrapped.optimizer), or leave out clipper="
        )
    return clipper


def check_unwrapped(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer from ``autoclip.wrap()`` clips inside its step(), where the Recorder cannot see it: the
    rows would say nothing clipped (or, with another clipper=, every step would be clipped twice)."""
    if isinstance(optimizer, ClippedOptimizer):
        raise DynamicsError(
            "the optimizer from autoclip.wrap() clips inside step(), out of the Recorder's sight (its rows would "
            "report no clipping, or a second clipper would clip again): give the Recorder wrapped.optimizer with "
            "clipper=wrapped.clipper, and step wrapped.optimizer in your loop (with a Trainer: return the plain "
            "optimizer and add AutoClipCallback)"
        )


def check_quantities(quantities: Any, every: int) -> list[Quantity]:
    """Quantities (a list) with unique names, schedules on record steps, and new, well-typed columns."""
    if isinstance(quantities, Quantity) or not isinstance(quantities, (list, tuple)):
        raise ArgumentTypeError(
            f"quantities must be a list of Quantity objects, e.g. [*Recorder.default_quantities(), Sharpness()], "
            f"got {type(quantities).__name__}"
        )
    taken = {"metrics": {n for n, _ in METRICS_BASE + METRICS_LAST}, "layers": {"step", "name"}}
    names = set()
    for q in quantities:
        if not isinstance(q, Quantity):
            raise ArgumentTypeError(f"quantities must be Quantity instances, got {type(q).__name__} {q!r}")
        kind = type(q).__name__
        if q.table not in taken:
            raise DynamicsError(f"{kind}.table must be 'metrics' or 'layers', got {q.table!r}")
        if not isinstance(q.name, str) or not q.name or q.name in names:
            raise DynamicsError(f"quantity names must be unique and non-empty: {q.name!r} in {quantities}")
        names.add(q.name)
        if checks.optional_every(f"{kind}.every", q.every) is not None and q.every % every:
            raise DynamicsError(
                f"{kind}(every={q.every}) must measure on record steps: "
                f"make every a multiple of the Recorder's every={every}"
            )
        if not isinstance(q.columns, dict) or not q.columns:
            raise DynamicsError(f"{kind}.columns must be a non-empty dict of column name -> type")
        for column, arrow_type in q.columns.items():
            if not isinstance(column, str) or not column.strip():
                raise DynamicsError(f"{kind}: column names must be non-empty strings, got {column!r}")
            if arrow_type not in ARROW_TYPES:
                raise DynamicsError(f"column {column!r} of {kind}: type must be one of {ARROW_TYPES}")
            if column in taken[q.table]:
                raise DynamicsError(f"column {column!r} of {kind} is already in the {q.table} table")
            taken[q.table].add(column)
    return list(quantities)


def check_loggers(loggers: Any) -> list[Logger]:
    """A list of callables ``logger(metrics, step)``."""
    if loggers is None:
        return []
    if callable(loggers) or not isinstance(loggers, (list, tuple)):
        raise ArgumentTypeError("loggers must be a list of callables logger(metrics, step), e.g. [tensorboard(dir)]")
    for logger in loggers:
        if not callable(logger):
            raise ArgumentTypeError(
                f"each logger must be a callable logger(metrics, step), got {type(logger).__name__} {logger!r}"
            )
    return list(loggers)


def _segment_name(name: Any) -> bool:
    """A file name of the journal folder (never a path leading elsewhere)."""
    return isinstance(name, str) and name.endswith(".arrows") and Path(name).name == name and name[0] != "."


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def check_state(state: Any, run_dir: Path, config: dict[str, Any], every: int) -> None:
    """A Recorder state to resume from: complete, well-typed, of this dyn or older, of this run and schedule.

    Everything is checked before anything changes, so a refused state cuts no row.
    """
    if not isinstance(state, dict):
        raise ArgumentTypeError(f"a Recorder state must be the dict state_dict() returns, got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise DynamicsError(f"the Recorder state lacks {missing}: pass what Recorder.state_dict() returned")
    version = state.get("version", 1)
    if not _whole(version):
        raise DynamicsError(f"the Recorder state's version must be an integer, got {version!r}: pass a state_dict()")
    if version > STATE_VERSION:
        raise DynamicsError(
            f"the Recorder state is of version {version!r}, newer than this dyn reads ({STATE_VERSION}): upgrade dyn"
        )
    for key in ("t", "epoch"):
        if not _whole(state[key]):
            raise DynamicsError(f"the Recorder state's {key} must be an integer >= 0, got {state[key]!r}")
    journal = state["journal"]
    if not isinstance(journal, dict):
        raise DynamicsError("the Recorder state's journal sizes are not a dict: pass a state from state_dict()")
    for name, size in journal.items():
        if not _segment_name(name) or not _whole(size):
            raise DynamicsError(
                f"the Recorder state's journal sizes must map segment names to byte counts, got {name!r}: {size!r}"
            )
    time_s = state["time_s"]
    if isinstance(time_s, bool) or not isinstance(time_s, (int, float)) or not math.isfinite(time_s) or time_s < 0:
        raise DynamicsError(f"the Recorder state's time_s must be a number of seconds >= 0, got {time_s!r}")
    if not isinstance(state.get("quantities", {}), dict) or not all(
        isinstance(q, dict) for q in state.get("quantities", {}).values()
    ):
        raise DynamicsError("the Recorder state's quantities must map each quantity's name to its state_dict()")
    clip_count = state.get("clip_count", [0, 0])
    if not (isinstance(clip_count, (list, tuple)) and len(clip_count) == 2 and all(_whole(c) for c in clip_count)):
        raise DynamicsError(f"the Recorder state's clip_count must be two integers >= 0, got {clip_count!r}")
    last_eval = state.get("last_eval_step")
    if last_eval is not None and not _whole(last_eval):
        raise DynamicsError(f"the Recorder state's last_eval_step must be a step or None, got {last_eval!r}")
    run_id = state.get("run_id")
    if run_id is not None and config.get("run_id") not in (None, run_id):
        raise RunError(f"{run_dir}: the checkpoint belongs to another run (run id {run_id})")
    recorded = state.get("every", config.get("every", every))
    if not _whole(recorded):
        raise DynamicsError(f"the Recorder state's every must be a positive integer, got {recorded!r}")
    if recorded != every:
        raise RunError(
            f"{run_dir}: the state was recorded every {recorded} steps; resume with every={recorded}, "
            f"not {every} (one table, one schedule)"
        )
