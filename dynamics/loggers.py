"""Loggers that send the Recorder's metrics into your own dashboard: TensorBoard, Weights & Biases, MLflow.

Each function returns a callable ``logger(metrics, step)`` for ``Recorder(..., loggers=[...])``: after every
record step it gets ``{"dyn/<column>": value}`` (NaN left out) and the step. The library does the writing;
each logger is a few lines over it. The libraries are optional extras, imported when a logger is made.

Example::

    from dynamics import Recorder
    from dynamics import loggers

    rec = Recorder(model, optimizer, "runs/demo", loggers=[loggers.tensorboard("tb/demo")])
"""

from __future__ import annotations

import os
from typing import Any

from dynamics.errors import DynamicsError


def _missing(extra: str, error: ImportError) -> DynamicsError:
    return DynamicsError(f"the {extra} logger needs the {extra} extra: pip install 'dyn[{extra}]' ({error})")


class TensorBoardLogger:
    """Writes each metric with ``SummaryWriter.add_scalar`` and flushes after every call, so the
    events are on disk even if the program never closes the logger (or is killed)."""

    def __init__(self, writer: Any, owned: bool):
        self.writer = writer
        self.owned = owned  # a writer the caller passed in is theirs to close

    def __repr__(self) -> str:
        return f"tensorboard({getattr(self.writer, 'log_dir', self.writer)!r})"

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Flush, and close the writer if this logger made it."""
        if self.owned:
            self.writer.close()
        else:
            self.writer.flush()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tensorboard(log_dir: str | os.PathLike | Any) -> TensorBoardLogger:
    """A logger that writes TensorBoard event files into ``log_dir`` (created if missing).

    ``log_dir`` may also be a ``torch.utils.tensorboard.SummaryWriter`` you already write to (for
    example Lightning's ``TensorBoardLogger.experiment``); the metrics then go beside your own.
    Needs the ``tensorboard`` extra. ``close()`` closes a writer the logger made.

    Example::

        rec = Recorder(model, optimizer, "runs/demo", loggers=[tensorboard("tb/demo")])
        # tensorboard --logdir tb
    """
    if hasattr(log_dir, "add_scalar") and hasattr(log_dir, "flush"):
        return TensorBoardLogger(log_dir, owned=False)
    if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
        raise DynamicsError(
            f"log_dir must be a folder path or a SummaryWriter, got {type(log_dir).__name__} {log_dir!r}"
        )
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise _missing("tensorboard", e) from None
    try:
        writer = SummaryWriter(log_dir=os.fspath(log_dir))
    except OSError as e:  # a file where the folder should be, or a folder no one may write
        raise DynamicsError(f"cannot write TensorBoard files into {log_dir}: {e.strerror or e}") from None
    return TensorBoardLogger(writer, owned=True)


class WandbLogger:
    """Logs each call's metrics as one ``run.log(metrics, step=step)``."""

    def __init__(self, run: Any):
        self.run = run

    def __repr__(self) -> str:
        return f"wandb(run={getattr(self.run, 'name', None) or self.run!r})"

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)  # a copy: W&B may keep the dict


def wandb(run: Any = None) -> WandbLogger:
    """A logger into a Weights & Biases run: ``run``, or the one ``wandb.init()`` started.

    W&B's step only goes up: log your own metrics with ``step=`` the same optimizer step (or W&B
    drops the rows that go back, with a warning). Needs the ``wandb`` extra.

    Example::

        import wandb as wb

        wb.init(project="demo")
        rec = Recorder(model, optimizer, "runs/demo", loggers=[wandb()])
    """
    if run is None:
        try:
            import wandb as wandb_library
        except ImportError as e:
            raise _missing("wandb", e) from None
        run = wandb_library.run
        if run is None:
            raise DynamicsError("no W&B run to log to: call wandb.init() first, or pass run=wandb.init(...)")
    if not callable(getattr(run, "log", None)):
        raise DynamicsError(f"run must be a W&B run (what wandb.init() returns), got {type(run).__name__}")
    return WandbLogger(run)


class MlflowLogger:
    """Logs each call's metrics as one ``mlflow.log_metrics(metrics, step=step)`` batch."""

    def __init__(self, library: Any):
        self.mlflow = library

    def __repr__(self) -> str:
        return "mlflow()"

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(metrics), step=step)


def mlflow() -> MlflowLogger:
    """A logger into the active MLflow run (as ``mlflow.log_metrics``: one is started if none is active).

    The tracking URI is MLflow's own setting (``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI``).
    Needs the ``mlflow`` extra.

    Example::

        import mlflow as ml

        with ml.start_run():
            rec = Recorder(model, optimizer, "runs/demo", loggers=[mlflow()])
            ...
    """
    try:
        import mlflow as mlflow_library
    except ImportError as e:
        raise _missing("mlflow", e) from None
    return MlflowLogger(mlflow_library)
