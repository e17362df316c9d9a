"""Hugging Face callbacks: record a ``transformers.Trainer``'s training dynamics, clip with AutoClip.

Example::

    from dynamics.integrations.huggingface import AutoClipCallback, DynamicsCallback, RecordingTrainer

    args = TrainingArguments("out", max_steps=200, max_grad_norm=0.0, report_to="none")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data,
                               callbacks=[DynamicsCallback("runs/hf", every=20, probes=1), AutoClipCallback(p=10)])
    trainer.train()

A callback is not given the batch or the loss: with a plain ``Trainer`` the ``loss`` column is NaN
and smoothness is not measured. ``RecordingTrainer`` (or ``DynamicsTrainerMixin`` mixed into your
own Trainer subclass) hands each micro-batch's inputs and loss to the callback. The Trainer clips
(``max_grad_norm``, 1.0 by default) before any callback sees the gradients: set ``max_grad_norm=0``
to record raw gradient norms and to clip with AutoClip alone.

Both callbacks save their state into each checkpoint folder, so ``trainer.train(resume_from_checkpoint=...)``
continues the run: every step is recorded once.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from autoclip import AutoClip, ClipInfo
from autoclip.percentile import check_p, check_window
from dynamics.integrations import skip_step
from dynamics.recorder import Recorder

__all__ = ["AutoClipCallback", "DynamicsCallback", "DynamicsTrainerMixin", "RecordingTrainer"]

RECORDER_STATE = "dynamics_recorder.pt"
AUTOCLIP_STATE = "autoclip.pt"

# A callback is not told which other callbacks share its Trainer; both see the same optimizer.
_AUTOCLIP: weakref.WeakKeyDictionary[torch.optim.Optimizer, AutoClipCallback] = weakref.WeakKeyDictionary()


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients now (the Trainer only does it when it clips), so clippers see true norms."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(_inner(optimizer))
    except RuntimeError as e:  # the Trainer's own clipping already unscaled them
        if "unscale_() has already been called" not in str(e):
            raise


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _load(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class AutoClipCallback(TrainerCallback):
    """Clip the gradients of every optimizer step with AutoClip (the p-th percentile of the norms seen so far).

    It clips in ``on_pre_optimizer_step``, after all micro-batches' backward passes, after the
    Trainer's own clipping: set ``max_grad_norm=0`` in ``TrainingArguments`` (it warns otherwise).
    Steps with non-finite gradients are skipped and never enter the history. With a
    :class:`DynamicsCallback` on the same Trainer the Recorder runs this clipper and records its
    ClipInfo. ``last_info`` holds the latest step's ClipInfo.
    """

    def __init__(self, p: float = 10, window: int | None = None, per_group: bool = False):
        self.p, self.window, self.per_group = check_p(p), check_window(window), per_group
        self.clipper: AutoClip | None = None
        self.last_info: ClipInfo | None = None
        self._driver: DynamicsCallback | None = None

    def clipper_for(self, args: TrainingArguments, state: TrainerState, optimizer: Any) -> AutoClip:
        """The AutoClip of this Trainer's optimizer; on a resumed run, with the checkpoint's history."""
        if self.clipper is None:
            if args.max_grad_norm and args.max_grad_norm > 0:
                warnings.warn(
                    f"TrainingArguments(max_grad_norm={args.max_grad_norm}): the Trainer clips before AutoClip runs, "
                    "so AutoClip sees clipped norms; set max_grad_norm=0 to clip with AutoClip alone",
                    UserWarning,
                    stacklevel=2,
                )
            self.clipper = AutoClip(
                _inner(optimizer).param_groups, p=self.p, window=self.window, per_group=self.per_group
            )
            if state.global_step > 0:
                saved = _load(_checkpoint_dir(args, state) / AUTOCLIP_STATE)
                if saved is not None:
                    self.clipper.load_state_dict(saved)
        return self.clipper

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.clipper_for(args, state, optimizer)
        _AUTOCLIP[_inner(optimizer)] = self

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._driver is not None:
            return  # the Recorder clips, once, after its snapshot
        _unscale(optimizer)
        self.last_info = self.clipper.step()
        skip_step(_inner(optimizer), self.last_info)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.clipper is not None:
            torch.save(self.clipper.state_dict(), _checkpoint_dir(args, state) / AUTOCLIP_STATE)

    def on_train_end(self, args, state, control, **kwargs):
        self._driver = None


class DynamicsCallback(TrainerCallback):
    """Record step size, gradient norm, loss, smoothness and threshold of a Hugging Face run into ``run_dir``.

    Every optimizer step goes into the ``steps`` table; every ``every``-th step gets a ``metrics``
    row (and ``layers`` rows with ``layers=True``). The gradients are read in
    ``on_pre_optimizer_step``, after the Trainer's own clipping (``max_grad_norm > 0`` warns).
    The loss (the sum of ``training_step``'s losses over the step's micro-batches) and smoothness
    (``probes`` probes re-running ``compute_loss`` on the same inputs) need a Trainer built with
    :class:`DynamicsTrainerMixin`, such as :class:`RecordingTrainer`; with a plain Trainer the loss
    is NaN and smoothness is not measured. Attaching it never changes training.

    The Recorder starts with training: a new run, or, when ``train(resume_from_checkpoint=...)``
    resumes, the run continued from the Recorder state saved in that checkpoint folder (rows
    recorded after it are dropped and recorded again). When training ends the run is closed;
    ``finish=False`` leaves it open so a later ``train(resume_from_checkpoint=...)`` may record
    more steps into it. ``recorder`` is the Recorder.
    """

    def __init__(self, run_dir: str | Path, every: int = 20, probes: int = 0, layers: bool = True, finish: bool = True):
        self.run_dir = Path(run_dir)
        self.every, self.probes, self.layers, self.finish = every, probes, layers, finish
        self.recorder: Recorder | None = None
        self.resume_dir: Path | None = None  # where to find the Recorder state on resume (set by the mixin)
        self._auto: AutoClipCallback | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._losses: list[Tensor] = []
        self._closures: list[Callable[[], Tensor]] = []
        self._clipped = False

    def _live(self) -> bool:
        return self.recorder is not None and not self.recorder.closed

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._live() and args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}): the Trainer clips before DynamicsCallback "
                "reads the gradients, so grad_norm records clipped norms; set max_grad_norm=0 to record raw norms",
                UserWarning,
                stacklevel=2,
            )

    def _start(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module, optimizer: Any) -> None:
        # at the first step, not in on_train_begin: by then an AutoClipCallback has registered itself
        resume: dict[str, Any] | bool = False
        if state.global_step > 0:
            folder = self.resume_dir or _checkpoint_dir(args, state)
            resume = _load(Path(folder) / RECORDER_STATE) or False
            if not resume:
                warnings.warn(
                    f"{folder} holds no {RECORDER_STATE}: recording from step {state.global_step} as a new run",
                    UserWarning,
                    stacklevel=2,
                )
        self._auto = _AUTOCLIP.get(_inner(optimizer))
        clipper = self._auto.clipper_for(args, state, optimizer) if self._auto is not None else None
        config = {
            "integration": "huggingface",
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "max_steps": args.max_steps,
            "seed": args.seed,
        }
        self.recorder = Recorder(
            model,
            _inner(optimizer),
            self.run_dir,
            clipper=clipper,
            every=self.every,
            probes=self.probes,
            layers=self.layers,
            config=config,
            resume=resume,
        )
        if self._auto is not None:
            self._auto._driver = self
        self._reset_step()

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._live():
            self._start(args, state, model, optimizer)
        self._reset_step()
        self.recorder.begin(epoch=int(state.epoch or 0))

    def add_micro_batch(self, loss: Tensor, closure: Callable[[], Tensor]) -> None:
        """Called by :class:`DynamicsTrainerMixin` after each micro-batch: its loss and a closure re-evaluating it."""
        if not self._live():
            return
        self._losses.append(loss.detach())
        rec = self.recorder
        if self.probes and rec.t % rec.every == rec.every - 1:
            self._closures.append(closure)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        _unscale(optimizer)
        info = self.recorder.after_backward()
        if self._auto is not None:
            self._auto.last_info = info
            skip_step(_inner(optimizer), info)  # only AutoClip skips: recording alone never changes a step

    def on_step_end(self, args, state, control, **kwargs):
        loss = functools.reduce(torch.add, self._losses) if self._losses else math.nan
        closures = list(self._closures)
        closure = (lambda: functools.reduce(torch.add, [c() for c in closures])) if closures else None
        self.recorder.end(loss, closure=closure)
        self._reset_step()

    def on_save(self, args, state, control, **kwargs):
        if self._live():
            sd = self.recorder.state_dict()  # on every rank: it averages the pending losses
            if args.should_save:
                torch.save(sd, _checkpoint_dir(args, state) / RECORDER_STATE)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._live():
            return
        if self.finish:
            self.recorder.close()
        else:
            self.recorder.release()
        if self._auto is not None:
            self._auto._driver = None


class DynamicsTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass so that :class:`DynamicsCallback` records loss and smoothness.

    After each micro-batch it hands the callback the loss ``training_step`` returned and a
    closure that re-evaluates it (``compute_loss`` on the same inputs, normalized as the Trainer
    normalizes it for gradient accumulation). ``train(resume_from_checkpoint=PATH)`` also tells the
    callback where to find its state. Example::

        class MyTrainer(DynamicsTrainerMixin, Trainer): ...
    """

    def _dynamics_callbacks(self) -> list[DynamicsCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, DynamicsCallback)]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        for cb in self._dynamics_callbacks():
            cb.resume_dir = Path(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, Path)) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        closure = functools.partial(self._dynamics_loss, model, inputs, num_items_in_batch)
        for cb in self._dynamics_callbacks():
            cb.add_micro_batch(loss, closure)
        return loss

    def _dynamics_loss(self, model, inputs, num_items_in_batch) -> Tensor:
        """The micro-batch's loss as ``training_step`` back-propagates it (without the backward)."""
        inputs = self._prepare_inputs(inputs)  # a fresh dict: compute_loss may pop the labels
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss


class RecordingTrainer(DynamicsTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that hands :class:`DynamicsCallback` each step's loss and inputs."""
