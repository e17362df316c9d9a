"""Recorder: records the dynamics of any training loop into a run directory.

It observes a loop through three phase calls (``begin``, ``after_backward``, ``end``) or runs a
plain step itself (``step(closure)``); what it measures on record steps is a list of quantities.
A record step is measure -> one host transfer -> write rows (and hand the row to the loggers).
"""

from __future__ import annotations

import math
import numbers
import platform
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autoclip import ClipInfo, Clipper
from dynamics import arguments, checks, distributed
from dynamics.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dynamics.errors import ArgumentTypeError, CallOrderError, DynamicsError
from dynamics.quantities import DEFAULTS, Quantity, SetupContext, StepContext
from dynamics.run import SCHEMA_VERSION, RunDirectory, RunError, schemas
from dynamics.transfer import HostTransfer, column_tensor, column_values, host_int, local, on_device, stacked


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


@dataclass
class StepState:
    """What the Recorder keeps between ``begin()`` and ``end()`` of one optimizer step."""

    record: bool
    rng: dict | None = None  # the random state the step's forward pass starts from (record steps)
    before: list[Tensor] | None = None  # θt−1
    grads: list[Tensor] | None = None  # raw gradients before clipping
    micro_grads: list[list[Tensor]] = field(default_factory=list)  # cumulative, after each micro-batch
    lr: float = math.nan
    thread: int = 0


class Recorder:
    """Records the dynamics of a training loop every ``every`` steps into ``run_dir``.

    Attach it to your own loop with three calls per optimizer step::

        rec.begin()                      # before the forward pass (the first micro-batch)
        ...forward and backward, as you like (AMP, accumulation; rec.micro_batch() after each)...
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
    ``loggers`` are callables ``logger(metrics, step)`` that get each metrics row as
    ``{"dyn/<column>": value}`` (NaN left out): see ``dynamics.loggers``.

    Under torch.distributed (DistributedDataParallel, or FSDP2 ``fully_shard``) every rank
    runs the Recorder; rank 0 alone writes and logs. Losses are averaged over ranks, probe
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
        loggers: list[arguments.Logger] | None = None,
        overwrite: bool = False,
    ):
        self.every = checks.positive_int("every", every)
        self.probes = checks.nonnegative_int("probes", probes)
        self.direction = checks.direction(direction)
        checks.flag("layers", layers)
        checks.flag("overwrite", overwrite)
        arguments.check_objects(model, optimizer, run_dir, config, resume)
        self.model = model
        self.module = distributed.unwrap(model)
        self.optimizer = optimizer
        self.rank = distributed.rank()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise DynamicsError("the model has no trainable parameters to record")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        arguments.check_optimizer(optimizer, self.params)
        self.clipper = arguments.check_clipper(clipper, self.module, self.params, optimizer)
        arguments.check_unwrapped(optimizer)
        self.quantities = arguments.check_quantities(
            quantities if quantities is not None else self.default_quantities(layers=layers), self.every
        )
        self.loggers = arguments.check_loggers(loggers)
        self.schemas = schemas(
            [c for q in self.quantities if q.table == "metrics" for c in q.columns.items()],
            [c for q in self.quantities if q.table == "layers" for c in q.columns.items()],
        )
        self.run_dir = Path(run_dir)
        self.run = RunDirectory(self.run_dir, self.schemas) if self.rank == 0 else None
        self.device = self.params[0].device
        self.t = 0
        self.epoch = 0
        self.last_info: ClipInfo | None = None  # the ClipInfo of the latest step
        self.last_eval_step: int | None = None
        self.resumed: dict[str, Any] | None = None  # the ``extra`` of the checkpoint resumed from
        self._time_offset = 0.0
        self._closed = False
        self._phase: str | None = None  # None, "begun" or "clipped": where the current step is
        self._state: StepState | None = None
        self._losses: list[Tensor] = []
        self._pending: dict[str, list] = {"step": [], "grad_norm": [], "threshold": [], "clipped": []}
        self._clipped_since: int | Tensor = 0  # clipped steps since the previous record step
        self._steps_since = 0
        setup = SetupContext(self.model, optimizer, self.names, self.params)
        for q in self.quantities:
            q.setup(setup)
        self.config: dict[str, Any] = {}
        try:
            if resume is True:
                self.config = self._resume()
            elif isinstance(resume, dict):
                self.config = self._on_rank0(self._attach)
                self.load_state_dict(resume)
            else:
                self.config = self._on_rank0(lambda: self._create(config or {}, overwrite))
        except BaseException:
            # a refused start holds nothing: the run stays free for the next try (in this process too)
            self._closed = True
            if self.run is not None:
                self.run.release()
            raise
        self._start = time.perf_counter()

    @staticmethod
    def default_quantities(layers: bool = True) -> list[Quantity]:
        """Step size, smoothness (the Recorder's ``probes``) and, with ``layers``, per-layer norms."""
        return [q() for q in DEFAULTS if layers or q.table != "layers"]

    # -- the run directory (rank 0 writes; every rank shares the outcome) ------------------------

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

    def _create(self, user_config: dict[str, Any], overwrite: bool) -> dict[str, Any]:
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
            "versions": {"dyn": _version("dyn"), "torch": torch.__version__, "python": platform.python_version()},
            "command": user_config.get("command", sys.argv),
            "schema_version": SCHEMA_VERSION,
            "status": "running",
        }
        import json

        try:
            json.dumps(config, default=str, allow_nan=False)
        except ValueError as e:
            raise DynamicsError(f"config must be JSON without NaN or infinity: {e}") from None
        self.run.create(config, overwrite=overwrite)
        self.run.open_journals()
        return config

    def _attach(self) -> dict[str, Any]:
        config = self.run.attach()
        if config.get("world_size", 1) != distributed.world():
            self.run.release()
            raise RunError(
                f"{self.run_dir} was recorded on {config.get('world_size', 1)} processes: "
                f"resume it on as many, not {distributed.world()}"
            )
        if config.get("every", self.every) != self.every:
            self.run.release()
            raise RunError(
                f"{self.run_dir} records every {config['every']} steps: resume it with every={config['every']}, "
                f"not {self.every} (one table, one schedule)"
            )
        return config

    def _resume(self) -> dict[str, Any]:
        """Continue from RUN_DIR/checkpoint.pt; a run that never reached one restarts in place from step 0."""
        config = self._on_rank0(self._attach)
        has_checkpoint = self._on_rank0(lambda: (self.run_dir / "checkpoint.pt").exists())
        if not has_checkpoint:
            if self.rank == 0:
                self.run.clear_journal()
            return config
        path = self.run_dir / "checkpoint.pt"
        loaded: dict[str, Any] = {}
        # rank 0 checks the file and shares only the verdict; every rank then holds its own copy
        self._on_rank0(lambda: loaded.update(_readable_checkpoint(path)))
        state = loaded or load_checkpoint(path, map_location="cpu")
        self.config = config
        try:
            arguments.check_state(state, self.run_dir, config, self.every)  # before anything is loaded
        except RunError:
            raise
        except DynamicsError as e:  # the file's fault, not the caller's: a run error, as for a damaged file
            raise RunError(f"{path}: {e}") from None
        try:
            distributed.load_state_dicts(self.module, self.optimizer, state["model"], state["optimizer"])
            set_rng_state(state["rng"][self.rank], self.device)
        except Exception as e:
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise RunError(
                f"{path} does not fit this model and optimizer ({type(e).__name__}: {reason}): resume with the "
                "model and optimizer the run was recorded with"
            ) from None
        self.load_state_dict(state)
        self.resumed = state["extra"]
        return config

    # -- Recorder state in any checkpoint ----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, epoch, elapsed time, journal sizes, clipper and quantity state: put it in your checkpoint.

        Pending rows are flushed and the journal made durable first, so the sizes it records
        are on disk. Call it on every rank (it averages the pending losses over ranks), between
        steps, while the Recorder is open (``release()`` returns the last one).
        """
        self._check_open()
        if self._phase is not None:
            raise CallOrderError("state_dict() in the middle of a step: call it after end(), between steps")
        self._flush_steps()
        sizes = self._on_rank0(lambda: self.run.sizes())
        return {
            "version": arguments.STATE_VERSION,
            "run_id": self.config.get("run_id"),
            "every": self.every,
            "t": self.t,
            "epoch": self.epoch,
            "time_s": self.elapsed,
            "journal": sizes,
            "clipper": self.clipper.state_dict(),
            "quantities": {q.name: q.state_dict() for q in self.quantities},
            "last_eval_step": self.last_eval_step,
            "clip_count": [host_int(self._clipped_since), self._steps_since],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go back to a ``state_dict()``: the journal is cut back to its sizes, so every step is recorded once.

        The state is checked before anything is cut: a state of another run, of another schedule,
        from a newer dyn, or a journal shorter than the state says (rows lost) is refused.
        """
        self._check_open()
        if self._phase is not None:
            raise CallOrderError("load_state_dict() in the middle of a step: call it between end() and begin()")
        arguments.check_state(state, self.run_dir, self.config, self.every)
        # the clipper and quantities load first, and go back as they were if anything is refused: a refused
        # state cuts no journal row
        saved = self.clipper.state_dict(), {q.name: q.state_dict() for q in self.quantities}
        try:
            self._load_states(state)
            self._on_rank0(lambda: self.run.rewind(state["journal"]))
        except BaseException:
            self.clipper.load_state_dict(saved[0])
            for q in self.quantities:
                q.load_state_dict(saved[1][q.name])
            raise
        self._flush_steps(discard=True)
        self.t, self.epoch = int(state["t"]), int(state["epoch"])
        self.last_eval_step = state.get("last_eval_step")
        clipped, steps = state.get("clip_count", [0, 0])
        self._clipped_since, self._steps_since = int(clipped), int(steps)
        self._time_offset = float(state["time_s"])
        self._start = time.perf_counter()

    def _load_states(self, state: dict[str, Any]) -> None:
        try:
            self.clipper.load_state_dict(state["clipper"])
        except (KeyError, TypeError, ValueError) as e:
            raise DynamicsError(f"the Recorder state's clipper state does not fit this clipper: {e}") from None
        for q in self.quantities:
            if q.name in state.get("quantities", {}):
                try:
                    q.load_state_dict(state["quantities"][q.name])
                except Exception as e:
                    raise DynamicsError(
                        f"quantity {q.name!r} could not load its state ({type(e).__name__}: {e}): "
                        "pass a state saved by the same quantities"
                    ) from None

    # -- training ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CallOrderError(f"the Recorder of {self.run_dir} is closed: create a new one to record again")

    def _check_thread(self) -> None:
        if self._state is not None and self._state.thread != threading.get_ident():
            raise CallOrderError(
                "two threads are stepping one Recorder: give each training loop its own Recorder and run directory"
            )

    @property
    def recording(self) -> bool:
        """True between ``begin()`` and ``end()`` of a step that records (measures and writes a metrics row)."""
        return self._state is not None and self._state.record

    def begin(self, epoch: int | None = None) -> None:
        """Start a step: call before its forward pass (before the first micro-batch).

        On record steps it keeps the random state, so probes replay the same dropout
        masks. A second call before ``after_backward()`` is a no-op, so hooks that fire
        once per micro-batch may call it.
        """
        self._check_open()
        if epoch is not None:
            self.epoch = checks.nonnegative_int("epoch", epoch)
        if self._phase is not None:
            self._check_thread()
            return
        record = (self.t + 1) % self.every == 0
        self._phase = "begun"
        self._state = StepState(record, rng_state(self.device) if record else None, thread=threading.get_ident())

    def micro_batch(self) -> None:
        """Optional, after each micro-batch's backward: on record steps, keep the gradients accumulated so far.

        Quantities that compare micro-batches (``uses_micro_batches``, such as the gradient noise
        scale) read them as ``StepContext.micro_grads``. On other steps, or without such a
        quantity due, it does nothing.
        """
        self._check_open()
        self._check_thread()
        if self._phase != "begun":
            raise CallOrderError(
                "micro_batch() goes after a micro-batch's backward, between begin() and after_backward()"
            )
        if self._state.record and any(q.uses_micro_batches and q.should_compute(self.t + 1) for q in self.quantities):
            with torch.no_grad():
                self._state.micro_grads.append(_grads(self.params))

    def after_backward(self) -> ClipInfo:
        """After all backward passes of the step (after ``scaler.unscale_``): snapshot, then clip.

        Returns the clipper's ClipInfo; step the optimizer unless ``info.skip``.
        """
        self._check_open()
        self._check_thread()
        if self._phase != "begun":
            raise CallOrderError("call begin() before the forward pass, and after_backward() once per step")
        state = self._state
        if state.record:
            with torch.no_grad():
                state.before = [p.detach().clone() for p in self.params]
                state.grads = _grads(self.params)
            state.lr = float(self.optimizer.param_groups[0]["lr"])
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
        self._check_thread()
        if self._phase != "clipped":
            raise CallOrderError("call after_backward() after the backward pass, before end()")
        loss = self._loss_tensor(loss)
        if closure is not None and not callable(closure):
            raise ArgumentTypeError(
                f"closure must be a function returning the step's loss, got {type(closure).__name__}"
            )
        state, info = self._state, self.last_info
        self._phase, self._state = None, None
        self.t += 1
        self._losses.append(loss)
        self._pending["step"].append(self.t)
        self._pending["grad_norm"].append(info.grad_norm)
        self._pending["threshold"].append(info.threshold)
        self._pending["clipped"].append(info.clipped)
        clipped = info.clipped.double() if isinstance(info.clipped, Tensor) else info.clipped  # a count, not float32
        self._clipped_since = self._clipped_since + clipped
        self._steps_since += 1
        if state.record:
            self._record(closure, info, state)
        return loss

    def _loss_tensor(self, loss: Tensor | float | None) -> Tensor:
        if isinstance(loss, Tensor):
            _check_loss(loss)
            loss = loss.detach().reshape(())
            return loss if loss.device == self.device else loss.to(self.device)
        if loss is None:
            return torch.tensor(math.nan, device=self.device)
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise ArgumentTypeError(f"the loss must be a tensor, a number or None, got {type(loss).__name__} {loss!r}")
        return torch.tensor(float(loss), device=self.device)

    def step(self, closure: Callable[[], Tensor], epoch: int | None = None) -> Tensor:
        """One plain training step on the batch ``closure`` evaluates; returns the detached loss."""
        if not callable(closure):
            raise ArgumentTypeError(f"step() takes a closure returning the loss, got {type(closure).__name__}")
        self.begin(epoch)
        try:
            self.optimizer.zero_grad()
            loss = closure()
            if not isinstance(loss, Tensor):
                raise ArgumentTypeError(
                    f"the closure must return the loss as a tensor (to back-propagate), got {type(loss).__name__}"
                )
            _check_loss(loss, backward=True)
            loss.backward()
        except BaseException:
            self.abort_step()
            raise
        info = self.after_backward()
        if not info.skip:
            self.optimizer.step()
        return self.end(loss, closure)

    # -- a record step: measure -> one transfer -> write ------------------------------------

    @torch.no_grad()
    def _record(self, closure, info: ClipInfo, state: StepState) -> None:
        active = [q for q in self.quantities if q.should_compute(self.t)]
        results, moved = self._measure(active, closure, info, state)
        transfer = HostTransfer(self.device)
        moved_slot = transfer.add(moved)
        steps = self._pack_steps(transfer)
        row = {
            "grad_norm": info.grad_norm,
            "threshold": info.threshold,
            "clip_coef": info.clip_coef,
            "clipped": info.clipped,
            "clip_rate": self._clipped_since / self._steps_since,
        }
        slots = {k: transfer.add(v) for k, v in row.items() if isinstance(v, Tensor)}
        k = len(self.names)
        columns = {
            (q, column): transfer.add(column_tensor(q, column, results[q.name][column], k, self.device))
            for q in active
            for column in q.columns
        }
        host = transfer.fetch()  # the one transfer of a record step
        if host[moved_slot][0]:
            raise DynamicsError(
                f"a quantity changed the live parameters at step {self.t} (restored): compute() must leave "
                "ctx.params as they are; evaluate elsewhere with ctx.prober.at(theta) or on copies"
            )
        self._clipped_since, self._steps_since = 0, 0
        self._flush_steps(host, steps)
        if self.rank != 0:
            return
        row.update({name: host[slot][0].item() for name, slot in slots.items()})
        tables = {"metrics": {}, "layers": {}}
        for (q, column), slot in columns.items():
            tables[q.table][column] = column_values(host[slot], q.columns[column], q, column)
        metrics = {
            "step": [self.t],
            "epoch": [self.epoch],
            "time_s": [self.elapsed],
            "loss": [host[steps[0]][-1].item()],
            **{name: [bool(value) if name == "clipped" else float(value)] for name, value in row.items()},
            "lr": [state.lr],
            **tables["metrics"],
        }
        self.run.write("metrics", _fill(self.schemas["metrics"], metrics, 1))
        if tables["layers"]:
            layers = {"step": [self.t] * k, "name": self.names, **tables["layers"]}
            self.run.write("layers", _fill(self.schemas["layers"], layers, k))
        self._log(metrics)

    def _measure(self, active: list[Quantity], closure, info: ClipInfo, state: StepState) -> tuple[dict, Tensor]:
        """Every active quantity's results, and whether any moved the live parameters (a device flag).

        Buffers, RNG and parameters are put back as they were, whatever happens.
        """
        rng_after = rng_state(self.device)
        buffers = [b.detach().clone() for b in self.model.buffers()]
        live = [p.detach().clone() for p in self.params]
        ctx = StepContext(
            step=self.t,
            epoch=self.epoch,
            model=self.model,
            optimizer=self.optimizer,
            names=self.names,
            params=self.params,
            before=state.before,
            update=torch._foreach_sub([p.detach() for p in self.params], state.before),
            grads=state.grads,
            loss=self._losses[-1],
            info=info,
            closure=closure,
            probes=self.probes,
            direction=self.direction,
            rng=state.rng,
            device=self.device,
            micro_grads=state.micro_grads or None,
        )
        results = {}
        try:
            for q in active:
                try:
                    results[q.name] = q.compute(ctx)
                except DynamicsError:
                    raise
                except Exception as e:
                    raise DynamicsError(
                        f"quantity {q.name!r} failed at step {self.t} ({type(e).__name__}: {e}); the run stays "
                        "resumable from its last checkpoint: fix or drop the quantity and resume"
                    ) from e
        finally:
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)  # BatchNorm statistics the probes' forward passes moved
            moved = torch.stack([(local(p.detach()) != local(s)).any() for p, s in zip(self.params, live)]).any()
            for p, saved in zip(self.params, live):
                p.copy_(saved)
            set_rng_state(rng_after, self.device)
        for q in active:
            got = results[q.name]
            if not isinstance(got, dict) or set(got) != set(q.columns):
                keys = sorted(got) if isinstance(got, dict) else type(got).__name__
                raise DynamicsError(
                    f"{type(q).__name__}.compute returned {keys}, not its columns {sorted(q.columns)}: "
                    "return one value per declared column"
                )
        return results, moved

    def _log(self, metrics: dict[str, list]) -> None:
        """Hand the row to each logger as ``{"dyn/<column>": value}``, NaN left out; a failing logger is dropped."""
        if not self.loggers:
            return
        values = {
            f"dyn/{name}": float(v[0])
            for name, v in metrics.items()
            if name != "step" and v[0] is not None and not (isinstance(v[0], float) and math.isnan(v[0]))
        }
        for logger in list(self.loggers):
            try:
                logger(values, self.t)
            except Exception as e:
                self.loggers.remove(logger)
                warnings.warn(
                    f"logger {getattr(logger, '__name__', logger)!r} raised {type(e).__name__}: {e}; "
                    "it is dropped and training goes on",
                    UserWarning,
                    stacklevel=4,
                )

    def _pack_steps(self, transfer: HostTransfer) -> tuple[int, dict[str, int]]:
        """Put the pending steps rows' device values in ``transfer``: the losses (averaged over ranks) and an
        on-device clipper's ClipInfo fields. Returns their slots."""
        losses = transfer.add(distributed.mean(torch.stack(self._losses).double()))
        return losses, {k: transfer.add(stacked(v, self.device)) for k, v in self._pending.items() if on_device(v)}

    def _flush_steps(
        self, host: list[np.ndarray] | None = None, slots: tuple[int, dict[str, int]] | None = None, discard=False
    ) -> None:
        """Write the pending steps rows, from a record step's transfer (``host``, ``slots``) or, between
        record steps (a checkpoint), from a transfer of their own; ``discard`` drops them."""
        if self._losses and not discard:
            if host is None:
                transfer = HostTransfer(self.device)
                slots = self._pack_steps(transfer)
                host = transfer.fetch()
            losses, fields = slots
            if self.rank == 0:
                rows = {**self._pending, "loss": host[losses].tolist()}
                for name, slot in fields.items():
                    rows[name] = [bool(v) for v in host[slot]] if name == "clipped" else host[slot].tolist()
                self.run.write("steps", rows)
        self._losses = []
        self._pending = {k: [] for k in self._pending}

    @property
    def elapsed(self) -> float:
        """Wall seconds since the run started (across resumes)."""
        return self._time_offset + time.perf_counter() - self._start

    def log_eval(self, **metrics: float) -> None:
        """Add a row to the ``eval`` table at the current step (e.g. ``accuracy=0.91``); rank 0 writes.

        Each call may log other metrics: the table has a column per metric ever logged (null where absent).
        """
        self._check_open()
        if not metrics:
            raise DynamicsError("log_eval() needs at least one metric, e.g. rec.log_eval(accuracy=0.91)")
        if "step" in metrics:
            raise DynamicsError("log_eval(step=...): the step is the Recorder's own (rec.t); log the metrics alone")
        values = {}
        for name, value in metrics.items():
            if not name.strip():
                raise DynamicsError("log_eval(): a metric needs a name, e.g. rec.log_eval(accuracy=0.91)")
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise ArgumentTypeError(f"log_eval({name}=...) takes a number, got {type(value).__name__} {value!r}")
            if isinstance(value, numbers.Integral) and abs(int(value)) > 2**53:
                raise DynamicsError(
                    f"log_eval({name}={value}): eval columns hold float64, which holds integers exactly only up to "
                    "2**53; log it in a unit that keeps it below"
                )
            values[name] = [float(value)]
        self.last_eval_step = self.t
        if self.rank == 0:
            self.run.write("eval", {"step": [self.t], **values})

    # -- checkpoints and closing -------------------------------------------------------------

    def checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        """Save everything needed to resume exactly here into RUN_DIR/checkpoint.pt (atomically).

        ``extra`` is yours (e.g. a data position); it comes back as ``recorder.resumed``.
        """
        self._check_open()
        if self._phase is not None:
            raise CallOrderError("checkpoint() in the middle of a step: call it after end()")
        _check_extra(extra)
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
            raise CallOrderError("close() in the middle of a step: call end() first")
        _check_extra(extra)
        try:
            self.checkpoint(extra)
        except RunError:
            self._closed = True  # rows were lost under the Recorder: leave the run open, write nothing more
            if self.run is not None:
                self.run.release()
            raise
        self._closed = True
        if self.rank != 0:
            return
        self.config.update(status="finished", steps=self.t, time_s=self.elapsed)
        try:
            self.run.finish(self.config)
        except BaseException:
            self.run.release()  # not finished: the run stays open (and unlocked) for a resume
            raise

    def release(self) -> dict[str, Any]:
        """Stop recording but leave the run open (not finished) for a later resume; returns ``state_dict()``.

        The journal is made durable, its files closed and the run's lock released, so
        another Recorder (this process or a later one) can continue with ``resume=state``.
        """
        if self._closed:
            raise CallOrderError(f"the Recorder of {self.run_dir} is closed already")
        self.abort_step()
        try:
            return self.state_dict()
        finally:
            self._closed = True
            if self.run is not None:
                self.run.release()

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
        self._phase, self._state = None, None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif not self._closed:
            # an exception: the rows so far stay in the journal and the run stays resumable
            self._closed = True
            if self.run is not None:
                self.run.release()


def _check_loss(loss: Tensor, backward: bool = False) -> None:
    """A loss tensor: one real number with data (and, to back-propagate, a graph)."""
    if loss.numel() != 1:
        raise ArgumentTypeError(
            f"the loss must be one number, got a tensor of shape {tuple(loss.shape)}: reduce it (.mean() or .sum())"
        )
    if not (loss.is_floating_point() or loss.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ArgumentTypeError(f"the loss must be a real number, got a tensor of dtype {loss.dtype}")
    if loss.device.type == "meta":
        raise ArgumentTypeError("the loss is a meta tensor, which holds no value: compute it on a real device")
    if backward and not loss.requires_grad:
        raise ArgumentTypeError(
            "the closure's loss does not require grad, so there is nothing to back-propagate: compute it from the "
            "model's outputs with gradients enabled (not under torch.no_grad(), not .detach()ed)"
        )


def _check_extra(extra: Any) -> None:
    if extra is not None and not isinstance(extra, dict):
        raise ArgumentTypeError(f"extra must be a dict (it comes back as recorder.resumed), got {type(extra).__name__}")


def _grads(params: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def _fill(schema, columns: dict[str, list], n: int) -> dict[str, list]:
    """Every column of ``schema``: those a quantity did not measure this step are NaN (or null)."""
    return {f.name: columns.get(f.name, [math.nan if str(f.type).startswith("float") else None] * n) for f in schema}


CHECKPOINT_PARTS = {"model": dict, "optimizer": dict, "rng": list, "extra": dict}


def _readable_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents, with the parts a resume reads; a RunError for a damaged or foreign file."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except Exception as e:  # truncated, random bytes, zero bytes: torch raises many kinds
        raise RunError(f"{path} is damaged ({type(e).__name__}): the run cannot resume from it") from None
    if not isinstance(state, dict):
        raise RunError(f"{path} holds a {type(state).__name__}, not a dyn checkpoint: the run cannot resume from it")
    for part, kind in CHECKPOINT_PARTS.items():
        if not isinstance(state.get(part), kind):
            raise RunError(f"{path} is not a whole dyn checkpoint (its {part} is missing or not a {kind.__name__})")
    if not state["rng"] or not all(isinstance(r, dict) for r in state["rng"]):
        raise RunError(f"{path} is not a whole dyn checkpoint (its random states are missing)")
    return state
