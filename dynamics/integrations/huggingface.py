"""Hugging Face callbacks: record a ``transformers.Trainer``'s training dynamics, clip with AutoClip.

Example::

    from dynamics.integrations.huggingface import AutoClipCallback, DynamicsCallback, RecordingTrainer

    args = TrainingArguments("out", max_steps=200, max_grad_norm=0.0, report_to="none")
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data,
                               callbacks=[DynamicsCallback("runs/hf", every=20), AutoClipCallback(p=10)])
    trainer.train()

A callback is not given the batch or the loss: ``RecordingTrainer`` (or ``DynamicsTrainerMixin``
mixed into your own Trainer subclass) hands each micro-batch's inputs and loss to the callback,
sends the ``dyn/`` metrics through ``Trainer.log`` (so every ``report_to`` integration gets them)
and frees the run when ``train()`` raises. With a plain ``Trainer`` the loss and the probing
quantities are NaN and the metrics only reach ``trainer.state.log_history`` (it warns once).
The Trainer clips (``max_grad_norm``, 1.0 by default) before any callback sees the gradients:
set ``max_grad_norm=0`` to record raw gradient norms and to clip with AutoClip alone.

Both callbacks save their state into each checkpoint folder, so ``trainer.train(resume_from_checkpoint=...)``
continues the run: every step is recorded once.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from dynamics.errors import DynamicsError
from dynamics.integrations.core import AutoClipCallbackBase, DynamicsCallbackBase

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
    except RuntimeError as e:  # the Trainer's own clipping, or the other callback, already unscaled them
        if "unscale_() has already been called" not in str(e):
            raise


def _warn_clipped(args: TrainingArguments, what: str) -> None:
    if args.max_grad_norm and args.max_grad_norm > 0:
        warnings.warn(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}): the Trainer clips before {what}; "
            "set max_grad_norm=0 to see raw norms and clip with AutoClip alone",
            UserWarning,
            stacklevel=3,
        )


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, another format: torch raises many kinds
        raise DynamicsError(f"{path} is damaged ({type(e).__name__}): resume from another checkpoint") from None


def _trainer_log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    trainer.log(dict(metrics))  # into state.log_history, then on_log of every report_to integration


def _append_history(state: TrainerState, metrics: dict[str, float], step: int) -> None:
    state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})


class _TrainerBound:
    """What :class:`DynamicsTrainerMixin` tells its callbacks in ``train()``: the Trainer and the checkpoint."""

    trainer: Trainer | None = None
    resume_dir: Path | None = None

    def bind(self, trainer: Trainer | None, resume_from_checkpoint: Any = None) -> None:
        """Set by ``DynamicsTrainerMixin.train``: the Trainer running, and the checkpoint folder it resumes."""
        self.trainer = trainer
        resumed = isinstance(resume_from_checkpoint, (str, Path))
        self.resume_dir = Path(resume_from_checkpoint) if resumed else None

    def checkpoint_dir(self, args: TrainingArguments, state: TrainerState) -> Path:
        """The folder of the checkpoint at the current step (the one resumed, or where it is saved)."""
        return self.resume_dir or Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def _checkpointed(self, args: TrainingArguments, state: TrainerState, name: str) -> dict[str, Any] | None:
        return _load(self.checkpoint_dir(args, state) / name) if state.global_step > 0 else None


class AutoClipCallback(_TrainerBound, AutoClipCallbackBase, TrainerCallback):
    """Clip the gradients of every optimizer step with AutoClip (the p-th percentile of the norms seen so far).

    It clips in ``on_pre_optimizer_step``, after all micro-batches' backward passes, after the
    Trainer's own clipping: set ``max_grad_norm=0`` in ``TrainingArguments`` (it warns otherwise).
    Steps with non-finite gradients are skipped and never enter the history. With a
    :class:`DynamicsCallback` on the same Trainer the Recorder runs this clipper (``attach``) and
    records its ClipInfo. ``last_info`` holds the latest step's ClipInfo.

    Args:
        p: percentile in [0, 100] (10 in the paper).
        window: keep only the last ``window`` norms (None keeps all).
        per_group: one history per optimizer parameter group.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        _warn_clipped(args, "AutoClip runs, so AutoClip sees clipped norms")
        self.start_clipper(_inner(optimizer), self._checkpointed(args, state, AUTOCLIP_STATE))
        _AUTOCLIP[_inner(optimizer)] = self

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        _unscale(optimizer)
        self.clip(_inner(optimizer), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.clipper is not None:
            torch.save(self.clipper.state_dict(), self.checkpoint_dir(args, state) / AUTOCLIP_STATE)


class DynamicsCallback(_TrainerBound, DynamicsCallbackBase, TrainerCallback):
    """Record the dynamics of a Hugging Face run into ``run_dir``, and log them into the Trainer's logs.

    Every optimizer step goes into the ``steps`` table; every ``every``-th step gets a ``metrics``
    row (and ``layers`` rows) with what ``quantities`` measure. The gradients are read in
    ``on_pre_optimizer_step``, after the Trainer's own clipping (``max_grad_norm > 0`` warns).
    The loss (the sum of ``training_step``'s losses over the step's micro-batches) and the
    probing quantities (smoothness, sharpness: ``compute_loss`` again on the same inputs) need a
    Trainer built with :class:`DynamicsTrainerMixin`, such as :class:`RecordingTrainer`, which
    also sends each metrics row through ``Trainer.log`` (``log=True``): into
    ``trainer.state.log_history`` and to every ``report_to`` integration. With a plain Trainer
    the loss and probing quantities are NaN and the rows only reach ``state.log_history``; it
    warns once. Attaching it never changes training.

    The Recorder starts with training: a new run, or, when ``train(resume_from_checkpoint=...)``
    resumes, the run continued from the Recorder state saved in that checkpoint folder (rows
    recorded after it are dropped and recorded again; a state of another ``every`` is refused).
    When training ends the run is closed; ``finish=False`` leaves it open for a later
    ``train(resume_from_checkpoint=...)``. When ``train()`` raises, the run stays open and
    unlocked (a plain Trainer: the next Trainer in this thread frees it, or call ``release()``).

    Args: see :class:`dynamics.integrations.core.DynamicsCallbackBase`.
    """

    integration = "huggingface"
    _warned_plain = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._training_starts()
        _warn_clipped(args, "DynamicsCallback reads the gradients, so grad_norm records clipped norms")
        if self.trainer is None and not self._warned_plain:
            self._warned_plain = True
            warnings.warn(
                "DynamicsCallback on a plain transformers.Trainer: the Trainer shows callbacks neither the loss nor "
                "the inputs, so the loss, smoothness and other probing quantities are NaN, and the dyn/ metrics go "
                "to trainer.state.log_history only (no report_to integration sees them). Train with "
                "dynamics.integrations.huggingface.RecordingTrainer, or mix DynamicsTrainerMixin into your Trainer.",
                UserWarning,
                stacklevel=2,
            )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.live:  # at the first step, not in on_train_begin: by then AutoClipCallback has announced itself
            self._start(args, state, model, _inner(optimizer))
        self._begin(epoch=int(state.epoch or 0))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        _unscale(optimizer)
        self._before_optimizer_step(_inner(optimizer))

    def on_step_end(self, args, state, control, **kwargs):
        self._end()

    def _start(self, args: TrainingArguments, state: TrainerState, model: Any, optimizer: Any) -> None:
        config = {
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm,
            "max_steps": args.max_steps,
            "seed": args.seed,
        }
        if self.trainer is not None:  # through Trainer.log: log_history and every report_to integration
            log = functools.partial(_trainer_log, self.trainer)
        else:
            log = functools.partial(_append_history, state)
        saved = self._checkpointed(args, state, RECORDER_STATE)
        self._open(model, optimizer, state.global_step, config, _AUTOCLIP.get(optimizer), saved, [log])

    def on_save(self, args, state, control, **kwargs):
        if self.live:
            saved = self._checkpoint_state()  # on every rank: it averages the pending losses
            if args.should_save:
                torch.save(saved, self.checkpoint_dir(args, state) / RECORDER_STATE)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish()


class DynamicsTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass so that :class:`DynamicsCallback` sees the loss and inputs.

    After each micro-batch it hands the callback the loss ``training_step`` returned and a
    function re-evaluating it (``compute_loss`` on the same inputs, normalized as the Trainer
    normalizes it for gradient accumulation). In ``train()`` it tells the callbacks the Trainer
    (their metrics go through ``Trainer.log``) and the checkpoint resumed, and frees the run if
    training raises. Example::

        class MyTrainer(DynamicsTrainerMixin, Trainer): ...
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        bound = [cb for cb in self.callback_handler.callbacks if isinstance(cb, _TrainerBound)]
        for cb in bound:
            cb.bind(self, resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            for cb in bound:
                if isinstance(cb, DynamicsCallback):
                    cb.release()  # the step it broke is dropped; the run stays resumable, unlocked
            raise
        finally:
            for cb in bound:
                cb.bind(None)

    def training_step(self, model, inputs, num_items_in_batch=None, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        reevaluate = functools.partial(self._dynamics_loss, model, inputs, num_items_in_batch)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, DynamicsCallback):
                cb.micro_batch_done()
                cb.add_micro_batch(loss, reevaluate)
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
