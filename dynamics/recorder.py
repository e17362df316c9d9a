"""Recorder: a training step that also records the dynamics of any model into a run directory."""

from __future__ import annotations

import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoclip import Clipper, NoClip
from dynamics import distributed, journal
from dynamics.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dynamics.run import SCHEMA_VERSION, SCHEMAS, RunError, read_config, write_json
from dynamics.smoothness import norms, smoothness


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def describe_clipper(clipper: Clipper) -> dict[str, Any]:
    """The clipper's kind and settings, as config.json records them."""
    state = clipper.state_dict()
    settings = {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, type(None)))}
    settings.pop("steps", None)
    settings.pop("nonfinite_steps", None)
    return {"kind": type(clipper).__name__, "nonfinite": clipper.nonfinite, **settings}


class Recorder:
    """Runs training steps and records their dynamics every ``every`` steps.

    ``step(closure)`` zeroes the gradients, runs ``closure`` (the forward pass, returning
    the loss), backward, ``clipper.step()`` and ``optimizer.step()``, exactly as a plain
    loop would, and on steps t with t % every == 0 measures the step size, smoothness
    (``probes`` gradient probes along the update) and per-layer norms. Measuring never
    changes training: a recorded run ends with the same parameters, bit for bit, as an
    unrecorded one. Rows go to a crash-safe journal; ``close()`` compacts them to Parquet.

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
        resume: bool = False,
    ):
        if every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        if probes < 0:
            raise ValueError(f"probes must be >= 0, got {probes}")
        if direction not in ("update", "gradient"):
            raise ValueError(f"direction must be 'update' or 'gradient', got {direction!r}")
        self.model = model
        self.module = distributed.unwrap(model)
        self.optimizer = optimizer
        self.rank = distributed.rank()
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.clipper = clipper if clipper is not None else NoClip(self.params)
        self.every = every
        self.probes = probes
        self.direction = direction
        self.layers = layers
        self.run_dir = Path(run_dir)
        self.device = self.params[0].device
        self.t = 0
        self.epoch = 0
        self.last_info = None  # the ClipInfo of the latest step
        self.resumed: dict[str, Any] | None = None  # the ``extra`` of the checkpoint resumed from
        self._time_offset = 0.0
        self._lock_file = None
        self._losses: list[Tensor] = []
        self._pending: dict[str, list] = {"step": [], "grad_norm": [], "threshold": [], "clipped": []}
        if resume:
            self.config = self._resume()
        else:
            self.config = self._on_rank0(lambda: self._create(config or {}))
        self._journals = {
            name: journal.Journal(self.run_dir / "journal", name, SCHEMAS[name])
            for name in ("metrics", "steps", "layers", "eval")
        }
        self._start = time.perf_counter()

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

    # -- the run directory -----------------------------------------------------------------

    def _create(self, user_config: dict[str, Any]) -> dict[str, Any]:
        if (self.run_dir / "config.json").exists():
            raise RunError(f"{self.run_dir} already holds a run: resume it or choose another directory")
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise RunError(f"{self.run_dir} exists and is not empty: choose another directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        config = {
            **user_config,
            "every": self.every,
            "probes": self.probes,
            "direction": self.direction,
            "clipper": describe_clipper(self.clipper),
            "optimizer": {
                "kind": type(self.optimizer).__name__,
                **{k: v for k, v in self.optimizer.defaults.items() if isinstance(v, (int, float, str, bool))},
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
        write_json(self.run_dir / "config.json", config)
        return config

    def _check_resumable(self) -> dict[str, Any]:
        config = read_config(self.run_dir)
        if config.get("status") == "finished":
            raise RunError(f"{self.run_dir} is a finished run: nothing to resume")
        if not (self.run_dir / "checkpoint.pt").exists():
            raise RunError(f"{self.run_dir} has no checkpoint to resume from")
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
        config = self._on_rank0(self._check_resumable)
        state = load_checkpoint(self.run_dir / "checkpoint.pt", map_location="cpu")
        distributed.load_state_dicts(self.module, self.optimizer, state["model"], state["optimizer"])
        self.clipper.load_state_dict(state["clipper"])
        self.t, self.epoch = state["t"], state["epoch"]
        self._time_offset = state["time_s"]
        if self.rank == 0:
            journal.rewind(self.run_dir / "journal", state["journal"])
        set_rng_state(state["rng"][self.rank], self.device)
        self.resumed = state["extra"]
        return config

    # -- training ----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor], epoch: int | None = None) -> Tensor:
        """One training step on the batch ``closure`` evaluates; returns the detached loss."""
        if epoch is not None:
            self.epoch = epoch
        t = self.t + 1
        record = t % self.every == 0
        if record:
            rng_before = rng_state(self.device)  # replayed by the probes: same dropout masks
        self.optimizer.zero_grad()
        loss = closure()
        loss.backward()
        if record:
            with torch.no_grad():
                before = [p.detach().clone() for p in self.params]
                grad_before = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        info = self.last_info = self.clipper.step()
        if not info.skip:
            self.optimizer.step()
        self.t = t
        loss = loss.detach()
        self._losses.append(loss)
        self._pending["step"].append(t)
        self._pending["grad_norm"].append(info.grad_norm)
        self._pending["threshold"].append(info.threshold)
        self._pending["clipped"].append(info.clipped)
        if record:
            self._record(closure, info, before, grad_before, rng_before)
        return loss

    @torch.no_grad()
    def _record(self, closure, info, before, grad_before, rng_before) -> None:
        rng_after = rng_state(self.device)
        buffers = [b.detach().clone() for b in self.model.buffers()]
        update = torch._foreach_sub([p.detach() for p in self.params], before)
        layer_steps = norms(update)
        if self.probes > 0:
            smooth = smoothness(
                self.params, closure, before, grad_before, rng_before, self.probes, self.direction, self.device
            )
        else:
            smooth = torch.full((), math.nan, device=self.device)
        for b, saved in zip(self.model.buffers(), buffers):
            b.copy_(saved)  # BatchNorm statistics the probes' forward passes moved
        set_rng_state(rng_after, self.device)
        parts = [
            distributed.mean(torch.stack(self._losses).double()),
            torch.linalg.vector_norm(layer_steps).double().reshape(1),
            smooth.double().reshape(1),
        ]
        if self.layers:
            parts += [norms(grad_before).double(), layer_steps.double(), norms(self.params).double()]
        values = torch.cat([p.to(self.device) for p in parts]).tolist()  # the one transfer of a record
        n = len(self._losses)
        losses, (step_size, smooth_value), rest = values[:n], values[n : n + 2], values[n + 2 :]
        self._flush_steps(losses)
        if self.rank != 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self._journals["metrics"].write(
            {
                "step": [self.t],
                "epoch": [self.epoch],
                "time_s": [self.elapsed],
                "loss": [losses[-1]],
                "grad_norm": [info.grad_norm],
                "threshold": [info.threshold],
                "clip_coef": [info.clip_coef],
                "clipped": [info.clipped],
                "step_size": [step_size],
                "smoothness": [smooth_value],
                "lr": [float(lr)],
            }
        )
        if self.layers:
            k = len(self.names)
            self._journals["layers"].write(
                {
                    "step": [self.t] * k,
                    "name": self.names,
                    "grad_norm": rest[:k],
                    "step_size": rest[k : 2 * k],
                    "param_norm": rest[2 * k :],
                }
            )

    def _flush_steps(self, losses: list[float] | None = None) -> None:
        if not self._losses:
            return
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
        """Add a row to the ``eval`` table at the current step (e.g. ``si_sdri=9.1``); rank 0 writes."""
        if self.rank == 0:
            self._journals["eval"].write({"step": [self.t], **{k: [float(v)] for k, v in metrics.items()}})

    # -- checkpoints and closing -------------------------------------------------------------

    def checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        """Save everything needed to resume exactly here; ``extra`` is yours (e.g. data position)."""
        self._flush_steps()
        model_state, optimizer_state = distributed.state_dicts(self.module, self.optimizer)
        rngs = distributed.gather(rng_state(self.device))
        if self.rank != 0:
            return
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "clipper": self.clipper.state_dict(),
            "rng": rngs,  # one per rank
            "t": self.t,
            "epoch": self.epoch,
            "time_s": self.elapsed,
            "journal": journal.sizes(self.run_dir / "journal"),
            "extra": extra or {},
        }
        save_checkpoint(self.run_dir / "checkpoint.pt", state)

    def close(self, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint, compact the journal into Parquet files and mark the run finished."""
        self.checkpoint(extra)
        for j in self._journals.values():
            j.close()
        if self.rank != 0:
            return
        journal_dir = self.run_dir / "journal"
        for name in self._journals:
            journal.compact(journal_dir, name, self.run_dir / f"{name}.parquet", SCHEMAS[name])
        self.config.update(status="finished", steps=self.t, time_s=self.elapsed)
        write_json(self.run_dir / "config.json", self.config)
        shutil.rmtree(journal_dir, ignore_errors=True)
        if self._lock_file is not None:
            (self.run_dir / ".lock").unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            for j in self._journals.values():
                j.close()
