"""What the Lightning and Hugging Face callbacks share; each framework module keeps only its glue.

- :class:`DynamicsCallbackBase`: the ``DynamicsCallback`` arguments and their checks, the
  Recorder's start (config, the paired clipper, resume state, loggers), each optimizer step
  (begin, the micro-batches' losses and the probe closure, after_backward and the AutoClip
  skip, end), finishing (close, or release with ``finish=False``) and failing (release: the
  run stays resumable and unlocked).
- :class:`AutoClipCallbackBase`: the ``AutoClipCallback`` settings, its clipper and the
  pairing: ``attach(recorder)`` hands the clipper to a Recorder, which then clips, once per
  step, after snapshotting the raw gradients; ``detach()`` gives it back.

Neither imports a framework.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoclip import AutoClip, ClipInfo, ClippedOptimizer
from dynamics import checks
from dynamics.errors import ArgumentTypeError, CallOrderError, DynamicsError
from dynamics.quantities import Quantity
from dynamics.recorder import Recorder
from dynamics.run import RunError

__all__ = ["AutoClipCallbackBase", "DynamicsCallbackBase", "skip_step"]

Logger = Callable[[dict[str, float], int], Any]  # what Recorder(loggers=[...]) calls: logger(metrics, step)


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


def _params(param_groups: Sequence[Any]) -> list[int]:
    """The parameters' identities, from optimizer param_groups (dicts) or a clipper's groups (lists)."""
    return [id(p) for group in param_groups for p in (group["params"] if isinstance(group, dict) else group)]


class AutoClipCallbackBase:
    """An ``AutoClipCallback`` without its framework: settings, clipper, and the pairing with a Recorder.

    Alone, the callback clips every optimizer step itself (:meth:`clip`), once per step even if
    the Trainer holds it twice. With a ``DynamicsCallback`` on the same Trainer the Recorder runs
    the clipper: ``attach(recorder)`` hands it over (the Recorder clips once per step, after
    snapshotting the raw gradients) and ``detach()`` takes it back; ``last_info`` is then the
    Recorder's. A clipper is paired with one Recorder at a time.
    """

    def __init__(self, p: float = 10, window: int | None = None, per_group: bool = False):
        self.p = checks.finite_float("p", p, 0.0, 100.0)
        self.window = None if window is None else checks.positive_int("window", window)
        self.per_group = checks.flag("per_group", per_group)
        self.clipper: AutoClip | None = None
        self._recorder: Recorder | None = None
        self._last_info: ClipInfo | None = None
        self._clipped_step: int | None = None  # the trainer step clipped last

    def start_clipper(self, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None) -> AutoClip:
        """The clipper of the optimizer's parameter groups: kept while they are the same, else new.

        ``state`` (a checkpoint's) is loaded into it. An optimizer from ``autoclip.wrap()`` is refused.
        """
        if isinstance(optimizer, ClippedOptimizer):
            raise DynamicsError(
                "the optimizer from autoclip.wrap() clips already, so AutoClipCallback would clip every step twice: "
                "drop the callback, or give the Trainer the unwrapped optimizer"
            )
        param_groups = optimizer.param_groups
        if self.clipper is None or _params(self.clipper.groups) != _params(param_groups):
            self.clipper = AutoClip(param_groups, p=self.p, window=self.window, per_group=self.per_group)
            if state:
                self.clipper.load_state_dict(state)
        self._clipped_step = None
        return self.clipper

    @property
    def recorder(self) -> Recorder | None:
        """The Recorder that runs this clipper, or None while the callback clips by itself."""
        return self._recorder

    @property
    def last_info(self) -> ClipInfo | None:
        """The ClipInfo of the latest step (the Recorder's while attached)."""
        return self._recorder.last_info if self._recorder is not None else self._last_info

    def attach(self, recorder: Recorder) -> None:
        """Let ``recorder`` (built with ``clipper=self.clipper``) clip every step; this callback stops clipping."""
        if self.clipper is None or recorder.clipper is not self.clipper:
            raise DynamicsError("attach(recorder): build the Recorder with clipper=callback.clipper first")
        if self._recorder is not None and self._recorder is not recorder and not self._recorder.closed:
            raise DynamicsError(
                f"this AutoClipCallback already clips for the Recorder of {self._recorder.run_dir}: "
                "one DynamicsCallback per Trainer (a second one would count every step twice)"
            )
        self._recorder = recorder

    def detach(self) -> None:
        """Clip by itself again (the Recorder stopped); ``last_info`` keeps the Recorder's latest."""
        if self._recorder is not None:
            self._last_info = self._recorder.last_info
            self._recorder = None

    def clip(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Clip the gradients of trainer step ``step`` unless a Recorder does; skip the step if non-finite."""
        if self._recorder is not None or self._clipped_step == step:
            return  # the Recorder clips; or this callback is on the Trainer twice and clipped already
        self._clipped_step = step
        self._last_info = self.clipper.step()
        skip_step(optimizer, self._last_info)


@dataclass
class _Step:
    """One optimizer step as the callback sees it: the micro-batches' losses and how to re-evaluate them."""

    losses: list[Tensor] = field(default_factory=list)
    loss_known: bool = True
    reevaluate: list[Callable[[], Tensor]] = field(default_factory=list)
    stepped: bool = False  # after_backward() ran: the optimizer stepped

    def loss(self) -> Tensor | None:
        return functools.reduce(torch.add, self.losses) if self.losses and self.loss_known else None

    def closure(self) -> Callable[[], Tensor] | None:
        """The step's loss again, summed over its micro-batches (None when a micro-batch's loss is unknown)."""
        parts = list(self.reevaluate)
        if not parts or not self.loss_known:
            return None
        return lambda: functools.reduce(torch.add, [f() for f in parts])


# run directory -> the callback recording into it in this process (to free a run a broken train() left locked)
_RECORDING: weakref.WeakValueDictionary[Path, DynamicsCallbackBase] = weakref.WeakValueDictionary()


class DynamicsCallbackBase:
    """A ``DynamicsCallback`` without its framework: arguments, the Recorder and the step it is in.

    Args:
        run_dir: the run directory (new, or the one a resumed checkpoint belongs to).
        every: write a metrics row every ``every`` optimizer steps.
        probes: gradient probes for smoothness (0: smoothness NaN).
        layers: with the default quantities, also record per-tensor norms (the ``layers`` table).
        quantities: what to measure on record steps, the whole list (None: the defaults). To add
            to the defaults, pass ``[*Recorder.default_quantities(layers=True), Sharpness(every=1000)]``.
        log: send the ``dyn/`` metrics of every record step to the framework's loggers.
        finish: close the run when training ends (False: leave it open for a later resume).
        overwrite: replace a run in ``run_dir`` that nobody records any more (a crashed one).
    """

    integration = ""  # the framework, as config.json records it

    def __init__(
        self,
        run_dir: str | os.PathLike,
        every: int = 20,
        probes: int = 1,
        layers: bool = True,
        quantities: list[Quantity] | None = None,
        log: bool = True,
        finish: bool = True,
        overwrite: bool = False,
    ):
        if not isinstance(run_dir, (str, os.PathLike)) or not str(run_dir):
            raise ArgumentTypeError(f"run_dir must be a path, got {type(run_dir).__name__} {run_dir!r}")
        self.run_dir = Path(run_dir)
        self.every = checks.positive_int("every", every)
        self.probes = checks.nonnegative_int("probes", probes)
        self.layers = checks.flag("layers", layers)
        self.quantities = _check_quantities(quantities)
        if not layers and any(q.table == "layers" for q in self.quantities or ()):
            raise DynamicsError(
                "layers=False, yet quantities= holds per-layer quantities: layers only chooses among the default "
                "quantities; with quantities= given, list exactly what to measure"
            )
        self.log = checks.flag("log", log)
        self.finish = checks.flag("finish", finish)
        self.overwrite = checks.flag("overwrite", overwrite)
        self.recorder: Recorder | None = None
        self._saved: dict[str, Any] | None = None  # a Recorder state: to resume from, or the last one let go
        self._autoclip: AutoClipCallbackBase | None = None
        self._step = _Step()
        self._thread: int | None = None  # the thread training runs in

    @property
    def live(self) -> bool:
        """True while recording: the Recorder exists and is neither closed nor released."""
        return self.recorder is not None and not self.recorder.closed

    # -- start ---------------------------------------------------------------------------------

    def _training_starts(self) -> None:
        """Once per ``fit()``/``train()``: a Recorder still open here is from one an exception broke."""
        if self.live:
            self.release()
        self._thread = threading.get_ident()

    def _open(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        config: dict[str, Any],
        autoclip: AutoClipCallbackBase | None = None,
        state: dict[str, Any] | None = None,
        loggers: list[Logger] | None = None,
    ) -> None:
        """Start the Recorder at trainer step ``step``: resume ``state`` (or the state this callback
        holds) when it is at that step, else a new run."""
        state = state if state is not None else self._saved
        if state is not None and not isinstance(state, dict):
            raise DynamicsError(
                f"the checkpoint holds no Recorder state for {self.run_dir} (a {type(state).__name__}): "
                "resume from a checkpoint a DynamicsCallback saved"
            )
        resume = state if state is not None and state.get("t") == step else None
        if resume is None and step > 0:
            warnings.warn(
                f"DynamicsCallback: no Recorder state for step {step} (the checkpoint holds none): "
                f"{self.run_dir} records from step {step} as a new run",
                UserWarning,
                stacklevel=3,
            )
        self._free_abandoned_run()
        try:
            recorder = Recorder(
                model,
                optimizer,
                self.run_dir,
                clipper=autoclip.clipper if autoclip is not None else None,
                every=self.every,
                probes=self.probes,
                layers=self.layers,
                quantities=self.quantities,
                config={"integration": self.integration, **config},
                resume=resume or False,
                loggers=loggers if self.log else None,
                overwrite=self.overwrite and resume is None,
            )
        except RunError as e:
            if resume is None and not self.overwrite and (self.run_dir / "config.json").exists():
                raise RunError(f"{e} (DynamicsCallback(..., overwrite=True) replaces a run nobody records)") from None
            raise
        if autoclip is not None:
            try:
                autoclip.attach(recorder)
            except DynamicsError:
                recorder.release()
                raise
        self.recorder, self._autoclip, self._step = recorder, autoclip, _Step()
        _RECORDING[self.run_dir.resolve()] = self

    def _free_abandoned_run(self) -> None:
        """Release a Recorder of this run that a train() in this thread left open when it raised."""
        other = _RECORDING.get(self.run_dir.resolve())
        if other is not None and other is not self and other.live and other._thread == threading.get_ident():
            other.release()  # one thread trains one model at a time: that training is over

    # -- one optimizer step ----------------------------------------------------------------------

    def _begin(self, epoch: int | None = None) -> None:
        """Before the step's first micro-batch (a no-op on the others)."""
        if not self.recorder.in_step:
            self._step = _Step()
            self.recorder.begin(epoch=epoch)

    def add_micro_batch(self, loss: Tensor | None, reevaluate: Callable[[], Tensor] | None = None) -> None:
        """One micro-batch's loss as back-propagated (None: unknown) and a function re-evaluating it.

        The step's loss is the sum over its micro-batches; on record steps the functions make the
        closure the probing quantities (smoothness, sharpness) re-evaluate the step's loss with.
        """
        if loss is not None and not isinstance(loss, Tensor):
            raise ArgumentTypeError(f"add_micro_batch: loss must be a tensor or None, got {type(loss).__name__}")
        if reevaluate is not None and not callable(reevaluate):
            raise ArgumentTypeError("add_micro_batch: reevaluate must be a function returning the loss")
        if not self.live or not self.recorder.in_step:
            return
        if isinstance(loss, Tensor):
            self._step.losses.append(loss.detach())
        else:
            self._step.loss_known = False
        if reevaluate is not None and self.recorder.recording:
            self._step.reevaluate.append(reevaluate)

    def micro_batch_done(self) -> None:
        """After one micro-batch's backward: the Recorder keeps its gradients where a quantity compares them."""
        if self.live and self.recorder.recording:
            self.recorder.micro_batch()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After all backward passes: the Recorder's snapshot and the paired clipper; AutoClip may skip."""
        info = self.recorder.after_backward()
        if self._autoclip is not None:
            skip_step(optimizer, info)  # only AutoClip skips: recording alone never changes a step
        self._step.stepped = True

    def _end(self) -> None:
        """After the optimizer step (a no-op while micro-batches still accumulate): record it."""
        if not self._step.stepped:
            return
        step, self._step = self._step, _Step()
        self.recorder.end(step.loss(), closure=step.closure())

    # -- checkpoints, the end, failures ------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any] | None:
        """The Recorder state for a checkpoint (None when there is none)."""
        if not self.live:
            return self._saved
        if self.recorder.in_step:
            raise CallOrderError(
                "DynamicsCallback: a checkpoint was saved in the middle of an optimizer step; "
                "save checkpoints between steps (the Trainer's own checkpointing does)"
            )
        return self.recorder.state_dict()

    def _finish(self) -> None:
        """Training ended: close the run, or with ``finish=False`` release it for a later resume."""
        if not self.live:
            return
        try:
            if self.finish:
                self._saved = self.recorder.state_dict()
                self.recorder.close()
            else:
                self._saved = self.recorder.release()
        finally:
            self._unpair()

    def release(self) -> None:
        """Stop recording after an exception: the step it broke is dropped, the run stays open and unlocked.

        The callbacks call it themselves; call it after a plain Hugging Face ``Trainer.train()``
        raised to free the run before a new Trainer records into it in this process.
        """
        if not self.live:
            return
        try:
            self._saved = self.recorder.release()
        except Exception as e:  # the run's files failed under it: the lock is gone all the same
            self._saved = None
            warnings.warn(f"DynamicsCallback: {self.run_dir} could not save its state ({e})", UserWarning, stacklevel=2)
        self._unpair()

    def _unpair(self) -> None:
        if self._autoclip is not None:
            self._autoclip.detach()
        self._autoclip, self._step = None, _Step()


def _check_quantities(quantities: Any) -> list[Quantity] | None:
    if quantities is None:
        return None
    if not isinstance(quantities, (list, tuple)):
        raise ArgumentTypeError(
            f"quantities must be a list of Quantity objects, e.g. [UpdateRatio()], got {type(quantities).__name__}"
        )
    for q in quantities:
        if not isinstance(q, Quantity):
            raise ArgumentTypeError(f"quantities must be Quantity objects, got {type(q).__name__} {q!r}")
    return list(quantities)
