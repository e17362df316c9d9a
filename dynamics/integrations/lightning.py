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

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from autoclip import AutoClip, ClipInfo
from autoclip.percentile import check_p, check_window
from dynamics.integrations import skip_step
from dynamics.recorder import Recorder

__all__ = ["AutoClipCallback", "DynamicsCallback"]


def _optimizer(trainer: pl.Trainer) -> torch.optim.Optimizer:
    if len(trainer.optimizers) != 1:
        raise RuntimeError(f"dynamics callbacks need exactly one optimizer, this Trainer has {len(trainer.optimizers)}")
    return trainer.optimizers[0]


@contextmanager
def _no_logging(module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: probe passes must not log their losses."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


class AutoClipCallback(pl.Callback):
    """Clip the gradients of every optimizer step with AutoClip (the p-th percentile of the norms seen so far).

    It clips in ``on_before_optimizer_step``: after the backward passes of all accumulated
    micro-batches and after mixed precision unscaling, before Lightning's own clipping (leave
    ``gradient_clip_val`` unset: it would clip again). A step with non-finite gradients is
    skipped and never enters the history. With a :class:`DynamicsCallback` on the same Trainer the
    Recorder runs this clipper (once per step, after snapshotting the raw gradients) and records
    its ClipInfo. ``last_info`` holds the latest step's ClipInfo.

    Args:
        p: percentile in [0, 100] (10 in the paper).
        window: keep only the last ``window`` norms (None keeps all).
        per_group: one history per optimizer parameter group.
    """

    def __init__(self, p: float = 10, window: int | None = None, per_group: bool = False):
        self.p, self.window, self.per_group = check_p(p), check_window(window), per_group
        self.clipper: AutoClip | None = None
        self.last_info: ClipInfo | None = None
        self._state: dict[str, Any] | None = None  # loaded from a checkpoint before the clipper exists
        self._driver: DynamicsCallback | None = None  # the DynamicsCallback whose Recorder runs the clipper

    def clipper_for(self, trainer: pl.Trainer) -> AutoClip:
        """The AutoClip of this Trainer's optimizer (built on first use, with any checkpointed history)."""
        if self.clipper is None:
            self.clipper = AutoClip(
                _optimizer(trainer).param_groups, p=self.p, window=self.window, per_group=self.per_group
            )
            if self._state:
                self.clipper.load_state_dict(self._state)
        return self.clipper

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

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._driver is not None:
            return  # the Recorder clips, once, after its snapshot
        self.last_info = self.clipper_for(trainer).step()
        skip_step(optimizer, self.last_info)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict() if self.clipper is not None else dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict
        if self.clipper is not None:
            self.clipper.load_state_dict(state_dict)


class DynamicsCallback(pl.Callback):
    """Record step size, gradient norm, loss, smoothness and threshold of a Lightning run into ``run_dir``.

    Every optimizer step goes into the ``steps`` table; every ``every``-th step gets a ``metrics``
    row (and ``layers`` rows with ``layers=True``). The loss recorded is the sum over the step's
    micro-batches of ``training_step``'s loss divided by ``accumulate_grad_batches`` (what
    Lightning back-propagates); smoothness re-runs ``training_step`` on the step's batches with
    ``probes`` probes (``self.log`` is silenced during those passes; a ``training_step`` with
    other side effects sees them). Attaching it never changes training.

    The Recorder starts with training: a new run, or, when the Trainer resumes from a checkpoint
    holding this callback's state, the same run continued from it (rows recorded after that
    checkpoint are dropped and recorded again). When training ends the run is closed (Parquet
    tables, marked finished); ``finish=False`` leaves it open so a later ``fit(ckpt_path=...)``
    may record more steps into it. An exception leaves it open too. ``recorder`` is the Recorder.

    Args:
        run_dir: the run directory (new, or the one a resumed checkpoint belongs to).
        every: record a metrics row every ``every`` optimizer steps.
        probes: gradient probes for smoothness (0: no probes, smoothness NaN).
        layers: also record per-parameter norms.
        finish: close the run when training ends.
    """

    def __init__(self, run_dir: str | Path, every: int = 20, probes: int = 1, layers: bool = True, finish: bool = True):
        self.run_dir = Path(run_dir)
        self.every, self.probes, self.layers, self.finish = every, probes, layers, finish
        self.recorder: Recorder | None = None
        self._state: dict[str, Any] | None = None  # the Recorder state to resume, or the last one saved
        self._auto: AutoClipCallback | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._in_step = False
        self._stepped = False
        self._batches: list[tuple[Any, int]] = []
        self._loss: Tensor | None = None
        self._loss_known = True

    def _live(self) -> bool:
        return self.recorder is not None and not self.recorder.closed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("DynamicsCallback records automatic optimization only (automatic_optimization=True)")
        if self._live():
            return  # a second fit() with the same callback goes on recording the same run
        optimizer = _optimizer(trainer)
        self._auto = next((cb for cb in trainer.callbacks if isinstance(cb, AutoClipCallback)), None)
        clipper = self._auto.clipper_for(trainer) if self._auto is not None else None
        config = {
            "integration": "lightning",
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
        }
        self.recorder = Recorder(
            pl_module,
            optimizer,
            self.run_dir,
            clipper=clipper,
            every=self.every,
            probes=self.probes,
            layers=self.layers,
            config=config,
            resume=self._state or False,
        )
        if self._auto is not None:
            self._auto._driver = self
        self._reset_step()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        rec = self.recorder
        if not self._in_step:  # the first micro-batch of an optimizer step
            self._reset_step()
            self._in_step = True
            rec.begin(epoch=trainer.current_epoch)
        if self.probes and (rec.t + 1) % rec.every == 0:
            self._batches.append((batch, batch_idx))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        info = self.recorder.after_backward()
        if self._auto is not None:
            self._auto.last_info = info
            skip_step(optimizer, info)  # only AutoClip skips: recording alone never changes a step
        self._stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor):
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        else:
            self._loss_known = False  # training_step returned None: Lightning skipped this micro-batch
        if not self._stepped:
            return  # accumulating: the optimizer steps on a later micro-batch
        closure = self._closure(trainer, pl_module) if self._batches and self._loss_known else None
        self.recorder.end(self._loss if self._loss_known else None, closure=closure)
        self._reset_step()

    def _closure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], Tensor]:
        batches, scale = list(self._batches), trainer.accumulate_grad_batches

        def closure() -> Tensor:
            total = None
            with _no_logging(pl_module):
                for batch, batch_idx in batches:
                    out = trainer.strategy.training_step(batch, batch_idx)  # precision context and DDP included
                    loss = (out["loss"] if isinstance(out, Mapping) else out) / scale
                    total = loss if total is None else total + loss
            return total

        return closure

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._live():
            return
        if self.finish:
            self._state = self.recorder.state_dict()
            self.recorder.close()
        else:
            self._state = self.recorder.release()
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._live():
            self._state = self.recorder.release()  # the step the exception broke is not recorded
            self._detach()

    def _detach(self) -> None:
        if self._auto is not None:
            self._auto._driver = None
        self._reset_step()

    def state_dict(self) -> dict[str, Any]:
        if self._live():
            if self.recorder.in_step:
                raise RuntimeError(
                    "DynamicsCallback: a checkpoint was saved in the middle of an optimizer step; "
                    "save checkpoints between steps (ModelCheckpoint does)"
                )
            return {"recorder": self.recorder.state_dict()}
        return {"recorder": self._state} if self._state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._live():
            self.recorder.load_state_dict(state_dict["recorder"])
        else:
            self._state = state_dict["recorder"]
