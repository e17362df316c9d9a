"""Recorder: records the dynamics of any training loop into a run directory.

It observes a loop through three phase calls (``begin``, ``after_backward``, ``end``) or runs a
plain step itself (``step(closure)``); what it measures on record steps is a list of quantities.
"""

from __future__ import annotations

import json
import math
import numbers
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoclip import ClipInfo, Clipper, NoClip
from dynamics import distributed, journal
from dynamics.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dynamics.quantities import ARROW_TYPES, DEFAULTS, Quantity, SetupContext, StepContext
from dynamics.run import (
    METRICS_BASE,
    METRICS_LAST,
    SCHEMA_VERSION,
    RunError,
    check_new_run_dir,
    read_config,
    schemas,
    write_json,
)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def describe_clipper(clipper: Clipper) -> dict[str, Any]:
    """The clipper's kind and settings, as config.json records them."""
    state = clipper.state_dict()
    settings = {k: v for k, v in state.items() if v is None or _plain(v)}
    settings.pop("steps", None)
    settings.pop("nonfinite_steps", None)
    return {"kind": type(clipper).__name__, "nonfinite": clipper.nonfinite, **settings}


def _plain(value: Any) -> bool:
    """A setting config.json can hold as it is: a string, bool, int or finite float."""
    return isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Recorder:
    """Records the dynamics of a training loop every ``every`` steps into ``run_dir``.

    Attach it to your own loop with three calls per optimizer step::

        rec.begin()                      # before the forward pass (the first micro-batch)
        ...forward and backward, as you like (AMP, accumulation)...
        info = rec.after_backward()      # after all backward passes (after scaler.unscale_): clips
        if not info.skip:
            optimizer.step()             # or scaler.step(optimizer)
        rec.end(loss, closure=...)       # after the step; closure re-evaluates the step's loss

    or let it run a plain step: ``rec.step(closure)`` zeroes the gradients, runs ``closure``
    (the forward pass, returning the loss), backward, ``clipper.step()`` and
    ``optimizer.step()``. On steps t with t % every == 0 it measures its ``quantities``
    (default: step size, smoothness with ``probes`` gradient probes along the update, and
    per-layer norms). Measuring never changes training: a recorded run ends with the same
    parameters, bit for bit, as an unrecorded one. Rows go to a crash-safe journal;
    ``close()`` compacts them to Parquet. ``state_dict()`` rides in your own checkpoint.

    Under torch.distributed (DistributedDataParallel, or FSDP2 ``fully_shard``) every rank
    runs the Recorder; rank 0 alone writes. Losses are averaged over ranks, probe
    gradients are averaged by the wrapper's own backward, norms of sharded tensors are
    global, and checkpoints hold full state dicts and every rank's RNG state.

    Example::

        rec = Recorder(model, optimizer, "runs/demo", clipper=AutoClip(model.parameters(), p=10))
        for x, y in loader:
            loss = rec.step(lambda: loss_fn(model(x), y))
        rec.close()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        run_dir: str | Path,
        clipper: Clipper | None = None,
        every: int = 20,
        probes: int = 1,
        config: dict[str, Any] | None = None,
        direction: str = "update",
        layers: bool = True,
        resume: bool | dict[str, Any] = False,
        quantities: list[Quantity] | None = None,
    ):
        self.every = _positive_int("every", every)
        if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 0:
            raise ValueError(f"probes must be an integer >= 0, got {probes!r}")
        if direction not in ("update", "gradient"):
            raise ValueError(f"direction must be 'update' or 'gradient', got {direction!r}")
        self.model = model
        self.module = distributed.unwrap(model)
        self.optimizer = optimizer
        self.rank = distributed.rank()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to record")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not held & {id(p) for p in self.params}:
            raise ValueError("the optimizer holds none of the model's parameters: build it from model.parameters()")
        self.clipper = clipper if clipper is not None else NoClip(self.params)
        self.probes = int(probes)
        self.direction = direction
        self.quantities = self._check_quantities(
            list(quantities) if quantities is not None else self.default_quantities(layers=layers)
        )
        self.schemas = schemas(
            [c for q in self.quantities if q.table == "metrics" for c in q.columns.items()],
            [c for q in self.quantities if q.table == "layers" for c in q.columns.items()],
        )
        self.run_dir = Path(run_dir)
        self.device = self.params[0].device
        self.t = 0
        self.epoch = 0
        self.last_info: ClipInfo | None = None  # the ClipInfo of the latest step
        self.last_eval_step: int | None = None
        self.resumed: dict[str, Any] | None = None  # the ``extra`` of the checkpoint resumed from
        self._time_offset = 0.0
        self._lock_file = None
        self._closed = False
        self._phase: str | None = None  # None, "begun" or "clipped": where the current step is
        self._step_state: dict[str, Any] = {}
        self._losses: list[Tensor] = []
        self._pending: dict[str, list] = {"step": [], "grad_norm": [], "threshold": [], "clipped": []}
        setup = SetupContext(self.model, optimizer, self.names, self.params)
        for q in self.quantities:
            q.setup(setup)
        self._journals: dict[str, journal.Journal] = {}
        if resume is True:
            self.config = self._resume()
        elif isinstance(resume, dict):
            self.config = self._on_rank0(self._check_attachable)
            self._open_journals()
            self.load_state_dict(resume)
        elif resume is False:
            self.config = self._on_rank0(lambda: self._create(config or {}))
        else:
            raise ValueError("resume must be False, True (from RUN_DIR/checkpoint.pt) or a Recorder state_dict()")
        self._open_journals()
        self._start = time.perf_counter()

    @staticmethod
    def default_quantities(layers: bool = True) -> list[Quantity]:
        """Step size, smoothness (the Recorder's ``probes``) and, with ``layers``, per-layer norms."""
        return [q() for q in DEFAULTS if layers or q.table != "layers"]

    def _check_quantities(self, quantities: list[Quantity]) -> list[Quantity]:
        taken = {"metrics": {n for n, _ in METRICS_BASE + METRICS_LAST}, "layers": {"step", "name"}}
        names = set()
        for q in quantities:
            if not isinstance(q, Quantity):
                raise TypeError(f"quantities must be Quantity instances, got {q!r}")
            if q.table not in taken:
                raise ValueError(f"{type(q).__name__}.table must be 'metrics' or 'layers', got {q.table!r}")
            if not q.name or q.name in names:
                raise ValueError(f"quantity names must be unique and non-empty: {q.name!r} in {quantities}")
            names.add(q.name)
            if q.every is not None and _positive_int(f"{type(q).__name__}.every", q.every) % self.every:
                raise ValueError(
                    f"{type(q).__name__}(every={q.every}) must measure on record steps: "
                    f"make every a multiple of the Recorder's every={self.every}"
                )
            for column, kind in q.columns.items():
                if kind not in ARROW_TYPES:
                    raise ValueError(f"column {column!r} of {type(q).__name__}: type must be one of {ARROW_TYPES}")
                if column in taken[q.table]:
                    raise ValueError(f"column {column!r} of {type(q).__name__} is already in the {q.table} table")
                taken[q.table].add(column)
        return quantities

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and share its result, or its RunError, with every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except RunError as e:
                error = str(e)
        result, error = distributed.broadcast((result, error))
        if error is not None:
            raise RunError(error)
        return result

    def _open_journals(self) -> None:
        for j in self._journals.values():
            j.close()
        self._journals = {
            name: journal.Journal(self.run_dir / "journal", name, self.schemas[name])
            for name in ("metrics", "steps", "layers", "eval")
        }

    # -- the run directory -----------------------------------------------------------------

    def _create(self, user_config: dict[str, Any]) -> dict[str, Any]:
        check_new_run_dir(self.run_dir)
        config = {
            **user_config,
            "run_id": uuid.uuid4().hex,
            "every": self.every,
            "probes": self.probes,
            "direction": self.direction,
            "quantities": [repr(q) for q in self.quantities],
            "tables": {
                name: [[f.name, str(f.type)] for f in schema] for name, schema in self.schemas.items() if schema
            },
            "clipper": describe_clipper(self.clipper),
            "optimizer": {
                "kind": type(self.optimizer).__name__,
                **{k: v for k, v in self.optimizer.defaults.items() if _plain(v)},
            },
            "model": {"kind": type(self.module).__name__, "parameters": sum(p.numel() for p in self.params)},
            "world_size": distributed.world(),
            "versions": {
                "dyn": _version("dyn"),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "command": user_config.get("command", sys.argv),
            "schema_version": SCHEMA_VERSION,
            "status": "running",
        }
        try:
            json.dumps(config, default=str, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"config must be JSON without NaN or infinity: {e}") from None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create {self.run_dir}: {e.strerror or e}") from None
        self._lock()
        write_json(self.run_dir / "config.json", config)
        return config

    def _check_attachable(self) -> dict[str, Any]:
        config = read_config(self.run_dir)
        if config.get("status") == "finished":
            raise RunError(f"{self.run_dir} is a finished run: nothing to resume")
        if config.get("world_size", 1) != distributed.world():
            raise RunError(
                f"{self.run_dir} was recorded on {config.get('world_size', 1)} processes: "
                f"resume it on as many, not {distributed.world()}"
            )
        self._lock()
        return config

    def _lock(self) -> None:
        """Hold RUN_DIR/.lock while recording: a second writer (say, a resume while the first
        process still runs) is refused instead of interleaving rows. The OS drops the lock
        when the process dies, however it dies."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        self._lock_file = open(self.run_dir / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise RunError(f"{self.run_dir} is being recorded by another process") from None

    def _resume(self) -> dict[str, Any]:
        """Continue from RUN_DIR/checkpoint.pt; a run that never reached one restarts in place from step 0."""
        config = self._on_rank0(self._check_attachable)
        has_checkpoint = self._on_rank0(lambda: (self.run_dir / "checkpoint.pt").exists())
        if not has_checkpoint:
            if self.rank == 0:
                shutil.rmtree(self.run_dir / "journal", ignore_errors=True)
            return config
        path = self.run_dir / "checkpoint.pt"
        loaded: dict[str, Any] = {}
        # rank 0 checks the file and shares only the verdict; every rank then holds its own copy
        self._on_rank0(lambda: loaded.update(_readable_checkpoint(path)))
        state = loaded or load_checkpoint(path, map_location="cpu")
        distributed.load_state_dicts(self.module, self.optimizer, state["model"], state["optimizer"])
        self.config = config
        self.load_state_dict(state)
        set_rng_state(state["rng"][self.rank], self.device)
        self.resumed = state["extra"]
        return config

    # -- Recorder state in any checkpoint ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, epoch, elapsed time, journal sizes, clipper and quantity state: put it in your checkpoint.

        Pending rows are flushed and the journal made durable first, so the sizes it records
        are on disk. Call it on every rank (it averages the pending losses over ranks).
        """
        self._flush_steps()
        sizes = {}
        if self.rank == 0:
            for j in self._journals.values():
                j.sync()
            sizes = journal.sizes(self.run_dir / "journal")
        return {
            "run_id": self.config.get("run_id"),
            "t": self.t,
            "epoch": self.epoch,
            "time_s": self.elapsed,
            "journal": sizes,
            "clipper": self.clipper.state_dict(),
            "quantities": {q.name: q.state_dict() for q in self.quantities},
            "last_eval_step": self.last_eval_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to a ``state_dict()``: the journal is cut back to its sizes, so every step is recorded once.

        The journal is checked before anything is cut: a checkpoint of another run, or a
        journal shorter than the checkpoint says (rows lost), is refused with a RunError.
        """
        if self._phase is not None:
            raise RuntimeError("load_state_dict() in the middle of a step: call it between end() and begin()")
        run_id = state.get("run_id")
        if run_id is not None and self.config.get("run_id") not in (None, run_id):
            raise RunError(f"{self.run_dir}: the checkpoint belongs to another run (run id {run_id})")
        journal_dir = self.run_dir / "journal"
        if self.rank == 0:
            problem = journal.check(journal_dir, state["journal"])
            if problem is not None:
                raise RunError(f"{self.run_dir}: {problem}; the checkpoint cannot be resumed without losing rows")
        self._flush_steps(discard=True)
        for j in self._journals.values():
            j.close()
        if self.rank == 0:
            journal.rewind(journal_dir, state["journal"])
        self._open_journals()
        self.clipper.load_state_dict(state["clipper"])
        for q in self.quantities:
            if q.name in state.get("quantities", {}):
                q.load_state_dict(state["quantities"][q.name])
        self.t, self.epoch = int(state["t"]), int(state["epoch"])
        self.last_eval_step = state.get("last_eval_step")
        self._time_offset = float(state["time_s"])
        self._start = time.perf_counter()

    # -- training ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the Recorder of {self.run_dir} is closed: create a new one to record again")

    def begin(self, epoch: int | None = None) -> None:
        """Start a step: call before its forward pass (before the first micro-batch).

        On record steps it keeps the random state, so probes replay the same dropout
        masks. A second call before ``after_backward()`` is a no-op, so hooks that fire
        once per micro-batch may call it.
        """
        self._check_open()
        if epoch is not None:
            self.epoch = epoch
        if self._phase is not None:
            return
        record = (self.t + 1) % self.every == 0
        self._phase = "begun"
        self._step_state = {"record": record, "rng": rng_state(self.device) if record else None}

    def after_backward(self) -> ClipInfo:
        """After all backward passes of the step (after ``scaler.unscale_``): snapshot, then clip.

        Returns the clipper's ClipInfo; step the optimizer unless ``info.skip``.
        """
        self._check_open()
        if self._phase != "begun":
            raise RuntimeError("call begin() before the forward pass, and after_backward() once per step")
        if self._step_state["record"]:
            with torch.no_grad():
                self._step_state["before"] = [p.detach().clone() for p in self.params]
                self._step_state["grads"] = [
                    torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params
                ]
            self._step_state["lr"] = float(self.optimizer.param_groups[0]["lr"])
        info = self.last_info = self.clipper.step()
        self._phase = "clipped"
        return info

    def end(self, loss: Tensor | float | None, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """Finish the step after the optimizer step; on record steps, measure and write a row.

        ``loss`` is the step's loss (summed over micro-batches, or None if unknown). ``closure``
        re-evaluates that same loss (all micro-batches) for the probes; without it, probing
        quantities (smoothness, sharpness) are NaN. Returns the detached loss tensor.
        """
        self._check_open()
        if self._phase != "clipped":
            raise RuntimeError("call after_backward() after the backward pass, before end()")
        state, info = self._step_state, self.last_info
        self._phase, self._step_state = None, {}
        if isinstance(loss, Tensor):
            loss = loss.detach()
        else:
            loss = torch.tensor(math.nan if loss is None else float(loss), device=self.device)
        self.t += 1
        self._losses.append(loss)
        self._pending["step"].append(self.t)
        self._pending["grad_norm"].append(info.grad_norm)
        self._pending["threshold"].append(info.threshold)
        self._pending["clipped"].append(info.clipped)
        if state["record"]:
            self._record(closure, info, state)
        return loss

    def step(self, closure: Callable[[], Tensor], epoch: int | None = None) -> Tensor:
        """One plain training step on the batch ``closure`` evaluates; returns the detached loss."""
        self.begin(epoch)
        self.optimizer.zero_grad()
        loss = closure()
        loss.backward()
        info = self.after_backward()
        if not info.skip:
            self.optimizer.step()
        return self.end(loss, closure)

    @torch.no_grad()
    def _record(self, closure, info: ClipInfo, state: dict[str, Any]) -> None:
        rng_after = rng_state(self.device)
        buffers = [b.detach().clone() for b in self.model.buffers()]
        before = state["before"]
        ctx = StepContext(
            step=self.t,
            epoch=self.epoch,
            model=self.model,
            optimizer=self.optimizer,
            names=self.names,
            params=self.params,
            before=before,
            update=torch._foreach_sub([p.detach() for p in self.params], before),
            grads=state["grads"],
            loss=self._losses[-1],
            info=info,
            closure=closure,
            probes=self.probes,
            direction=self.direction,
            rng=state["rng"],
            device=self.device,
        )
        active = [q for q in self.quantities if q.every is None or self.t % q.every == 0]
        try:
            results = {q.name: q.compute(ctx) for q in active}
        finally:
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)  # BatchNorm statistics the probes' forward passes moved
            set_rng_state(rng_after, self.device)
        k = len(self.names)
        parts = [distributed.mean(torch.stack(self._losses).double())]
        for q in active:
            for column in q.columns:
                value = torch.as_tensor(results[q.name][column], device=self.device).double()
                parts.append(value.reshape(k if q.table == "layers" else 1))
        values = torch.cat([p.to(self.device) for p in parts]).tolist()  # the one transfer of a record
        n = len(self._losses)
        losses, rest = values[:n], iter(values[n:])
        self._flush_steps(losses)
        if self.rank != 0:
            return
        columns = {"metrics": {}, "layers": {}}
        for q in active:
            for column, kind in q.columns.items():
                count = k if q.table == "layers" else 1
                columns[q.table][column] = [_typed(next(rest), kind) for _ in range(count)]
        row = {
            "step": [self.t],
            "epoch": [self.epoch],
            "time_s": [self.elapsed],
            "loss": [losses[-1]],
            "grad_norm": [info.grad_norm],
            "threshold": [info.threshold],
            "clip_coef": [info.clip_coef],
            "clipped": [info.clipped],
            "lr": [state["lr"]],
        }
        self._journals["metrics"].write(_fill(self.schemas["metrics"], {**row, **columns["metrics"]}, 1))
        if columns["layers"]:
            layers = {"step": [self.t] * k, "name": self.names, **columns["layers"]}
            self._journals["layers"].write(_fill(self.schemas["layers"], layers, k))

    def _flush_steps(self, losses: list[float] | None = None, discard: bool = False) -> None:
        if self._losses and not discard:
            if losses is None:
                losses = distributed.mean(torch.stack(self._losses).double()).tolist()
            if self.rank == 0:
                self._journals["steps"].write({**self._pending, "loss": losses})
        self._losses = []
        self._pending = {k: [] for k in self._pending}

    @property
    def elapsed(self) -> float:
        """Wall seconds since the run started (across resumes)."""
        return self._time_offset + time.perf_counter() - self._start

    def log_eval(self, **metrics: float) -> None:
        """Add a row to the ``eval`` table at the current step (e.g. ``accuracy=0.91``); rank 0 writes."""
        self._check_open()
        self.last_eval_step = self.t
        if self.rank == 0:
            self._journals["eval"].write({"step": [self.t], **{k: [float(v)] for k, v in metrics.items()}})

    # -- checkpoints and closing -------------------------------------------------------------

    def checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        """Save everything needed to resume exactly here into RUN_DIR/checkpoint.pt (atomically).

        ``extra`` is yours (e.g. a data position); it comes back as ``recorder.resumed``.
        """
        self._check_open()
        recorder_state = self.state_dict()
        model_state, optimizer_state = distributed.state_dicts(self.module, self.optimizer)
        rngs = distributed.gather(rng_state(self.device))
        if self.rank != 0:
            return
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "rng": rngs,  # one per rank
            "extra": extra or {},
            **recorder_state,
        }
        save_checkpoint(self.run_dir / "checkpoint.pt", state)

    def close(self, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint, compact the journal into Parquet files and mark the run finished (once)."""
        if self._closed:
            return
        if self._phase is not None:
            raise RuntimeError("close() in the middle of a step: call end() first")
        self.checkpoint(extra)
        self._closed = True
        for j in self._journals.values():
            j.close()
        if self.rank != 0:
            return
        journal_dir = self.run_dir / "journal"
        for name in self._journals:
            journal.compact(journal_dir, name, self.run_dir / f"{name}.parquet", self.schemas[name])
        self.config.update(status="finished", steps=self.t, time_s=self.elapsed)
        write_json(self.run_dir / "config.json", self.config)
        shutil.rmtree(journal_dir, ignore_errors=True)
        if self._lock_file is not None:
            (self.run_dir / ".lock").unlink(missing_ok=True)
        self._release_files()

    def release(self) -> dict[str, Any]:
        """Stop recording but leave the run open (not finished) for a later resume; returns ``state_dict()``.

        The journal is made durable, its files closed and the run's lock released, so
        another Recorder (this process or a later one) can continue with ``resume=state``.
        """
        if self._closed:
            raise RuntimeError(f"the Recorder of {self.run_dir} is closed already")
        self.abort_step()
        state = self.state_dict()
        self._closed = True
        self._release_files()
        return state

    @property
    def closed(self) -> bool:
        """True after ``close()`` or ``release()``."""
        return self._closed

    @property
    def in_step(self) -> bool:
        """True between ``begin()`` and ``end()``."""
        return self._phase is not None

    def abort_step(self) -> None:
        """Forget a step that broke between ``begin()`` and ``end()`` (an exception): it is not recorded."""
        self._phase, self._step_state = None, {}

    def _release_files(self) -> None:
        for j in self._journals.values():
            j.close()
        if self._lock_file is not None:
            self._lock_file.close()  # the OS lock goes with the file
            self._lock_file = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif not self._closed:
            # an exception: the rows so far stay in the journal and the run stays resumable
            self._closed = True
            self._release_files()


def _typed(value: float, kind: str) -> Any:
    if kind == "bool":
        return bool(value)
    if kind == "int64":
        return int(value) if math.isfinite(value) else None
    return value


def _fill(schema, columns: dict[str, list], n: int) -> dict[str, list]:
    """Every column of ``schema``: those a quantity did not measure this step are NaN (or null)."""
    return {f.name: columns.get(f.name, [math.nan if str(f.type).startswith("float") else None] * n) for f in schema}


def _readable_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path, map_location="cpu")
    except Exception as e:  # truncated, random bytes, zero bytes: torch raises many kinds
        raise RunError(f"{path} is damaged ({type(e).__name__}): the run cannot resume from it") from None
