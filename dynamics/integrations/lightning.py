"""Lightning callbacks: record a ``lightning.pytorch.Trainer``'s training dynamics, clip with AutoClip.

Example::

    import lightning.pytorch as pl
    from dynamics.integrations.lightning import AutoClipCallback, DynamicsCallback

    trainer = pl.Trainer(max_steps=200, callbacks=[DynamicsCallback("runs/lit", every=20), AutoClipCallback(p=10)])
    trainer.fit(module, loader)

Both callbacks keep their state in Lightning checkpoints, so ``trainer.fit(..., ckpt_path=...)`` continues
the run: every step is recorded once. Only automatic optimization (one optimizer) is supported.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from autoclip import AutoClip
from dynamics.errors import DynamicsError
from dynamics.integrations.core import AutoClipCallbackBase, DynamicsCallbackBase

__all__ = ["AutoClipCallback", "DynamicsCallback"]


def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    if len(trainer.optimizers) != 1:
        raise DynamicsError(
            f"dynamics callbacks need exactly one optimizer, this Trainer has {len(trainer.optimizers)}"
        )
    return trainer.optimizers[0]


def _autoclip(trainer: pl.Trainer) -> AutoClipCallback | None:
    """The Trainer's AutoClipCallback (Lightning refuses two), its clipper built."""
    found = next((cb for cb in trainer.callbacks if isinstance(cb, AutoClipCallback)), None)
    if found is not None:
        found.clipper_for(trainer)
    return found


@contextmanager
def _no_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: probe passes must not log their losses."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


def _loss(outputs: Any) -> Tensor | None:
    """The micro-batch's loss from ``training_step``'s outputs (None: Lightning skipped the micro-batch)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss if isinstance(loss, Tensor) else None


def _training_loss(trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
    """``training_step`` again on a micro-batch, as Lightning back-propagates it (precision, DDP, accumulation)."""
    with _no_logging(module):
        out = trainer.strategy.training_step(batch, batch_idx)
    return _loss(out) / trainer.accumulate_grad_batches


def _config(trainer: pl.Trainer) -> dict[str, Any]:
    """The Trainer's settings config.json records."""
    return {
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "precision": str(trainer.precision),
        "max_steps": trainer.max_steps,
        "max_epochs": trainer.max_epochs,
    }


def _log_metrics(logger: Any, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    logger.log_metrics(metrics, step=trainer.global_step)


class AutoClipCallback(AutoClipCallbackBase, pl.Callback):
    """Clip the gradients of every optimizer step with AutoClip (the p-th percentile of the norms seen so far).

    It clips in ``on_before_optimizer_step``: after the backward passes of all accumulated
    micro-batches and after mixed precision unscaling, before Lightning's own clipping (leave
    ``gradient_clip_val`` unset: it would clip again). A step with non-finite gradients is
    skipped and never enters the history. With a :class:`DynamicsCallback` on the same Trainer
    the Recorder runs this clipper (``attach``) and records its ClipInfo. ``last_info`` holds
    the latest step's ClipInfo.

    Args:
        p: percentile in [0, 100] (10 in the paper).
        window: keep only the last ``window`` norms (None keeps all).
        per_group: one history per optimizer parameter group.
    """

    def __init__(self, p: float = 10, window: int | None = None, per_group: bool = False):
        super().__init__(p, window, per_group)
        self._loaded: dict[str, Any] | None = None  # a checkpoint's state, until the clipper takes it

    def clipper_for(self, trainer: pl.Trainer) -> AutoClip:
        """The AutoClip of this Trainer's optimizer (with a checkpoint's history when resuming)."""
        clipper, self._loaded = self.start_clipper(_optimizer(trainer), self._loaded), None
        return clipper

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.gradient_clip_val:
            warnings.warn(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips again after AutoClipCallback: "
                "set gradient_clip_val=None to clip with AutoClip alone",
                UserWarning,
                stacklevel=2,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clipper_for(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.clip(optimizer, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict() if self.clipper is not None and not self._loaded else dict(self._loaded or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict


class DynamicsCallback(DynamicsCallbackBase, pl.Callback):
    """Record the dynamics of a Lightning run into ``run_dir``, and log them to the Trainer's loggers.

    Every optimizer step goes into the ``steps`` table; every ``every``-th step gets a ``metrics``
    row (and ``layers`` rows) with what ``quantities`` measure. The loss recorded is the sum over
    the step's micro-batches of ``training_step``'s loss divided by ``accumulate_grad_batches``
    (what Lightning back-propagates); probing quantities (smoothness, sharpness) re-run
    ``training_step`` on the step's batches (``self.log`` is silenced during those passes). With
    ``log=True`` each metrics row goes to every ``trainer.loggers`` as ``dyn/<column>`` at
    ``step=trainer.global_step``. Attaching it never changes training.

    The Recorder starts with training: a new run, or, when the Trainer resumes from a checkpoint
    holding this callback's state, the same run continued from it (rows recorded after that
    checkpoint are dropped and recorded again; a checkpoint of another ``every`` is refused).
    When training ends the run is closed; ``finish=False`` leaves it open for a later
    ``fit(ckpt_path=...)``. An exception leaves it open and unlocked. ``recorder`` is the Recorder.

    Args: see :class:`dynamics.integrations.core.DynamicsCallbackBase`.
    """

    integration = "lightning"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_starts()
        if not pl_module.automatic_optimization:
            raise DynamicsError("DynamicsCallback records automatic optimization only (automatic_optimization=True)")
        loggers = [functools.partial(_log_metrics, logger, trainer) for logger in trainer.loggers]
        optimizer, autoclip = _optimizer(trainer), _autoclip(trainer)
        self._open(pl_module, optimizer, trainer.global_step, _config(trainer), autoclip, loggers=loggers)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._begin(epoch=trainer.current_epoch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.micro_batch_done()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._before_optimizer_step(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.add_micro_batch(_loss(outputs), functools.partial(_training_loss, trainer, pl_module, batch, batch_idx))
        self._end()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.release()

    def state_dict(self) -> dict[str, Any]:
        state = self._checkpoint_state()
        return {"recorder": state} if state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("recorder")
