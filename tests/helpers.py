"""Small models and loops shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from autoclip import Clipper


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Regression batches whose gradient norms vary a lot (every 7th batch is scaled up)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        x = torch.randn(8, 6, generator=g, dtype=dtype) * (20.0 if t % 7 == 3 else 1.0)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


def train(
    model: torch.nn.Module,
    data: list,
    clipper_factory=None,
    lr: float = 1e-2,
    optimizer: torch.optim.Optimizer | None = None,
    clipper: Clipper | None = None,
):
    """A plain loop: zero_grad, forward, backward, clip, step. Returns the infos."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    if clipper is None and clipper_factory is not None:
        clipper = clipper_factory(model.parameters())
    infos = []
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clipper is not None:
            info = clipper.step()
            infos.append(info)
            if info.skip:
                continue
        optimizer.step()
    return infos


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def total_norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])).item()


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def dyn(*args, **kw) -> subprocess.CompletedProcess:
    """Run `dyn ARGS...` as a user would (a fresh process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, env=CLI_ENV, **kw
    )


def naive_block_t_interval(x, y, block, n_resamples=2000, level=0.95, seed=0):
    """The studentized moving-block bootstrap of Pearson r written the long way (row indices, per-row
    influence values), as an oracle for dynamics.stats.block_bootstrap_r: resamples of ceil(n / block)
    whole blocks, t* = (atanh r* - atanh r) / se*, se from each resample's block sums of r's influence
    function, the series' se from all overlapping blocks."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    k, m = -(-n // block), n - block + 1

    def r_and_influence(xs, ys):
        u, v = (xs - xs.mean()) / xs.std(), (ys - ys.mean()) / ys.std()
        r = np.mean(u * v)
        return r, u * v - r / 2 * (u * u + v * v)

    r, psi = r_and_influence(x, y)
    sums = np.array([psi[s : s + block].sum() for s in range(m)])
    z, se = np.arctanh(r), np.sqrt(np.mean(sums**2) / block / n) / (1 - r * r)
    ts = []
    for starts in np.random.default_rng(seed).integers(0, m, size=(n_resamples, k)):
        idx = (starts[:, None] + np.arange(block)).ravel()
        rs, ps = r_and_influence(x[idx], y[idx])
        se_star = np.sqrt((ps.reshape(k, block).sum(axis=1) ** 2).sum()) / (k * block) / (1 - rs * rs)
        ts.append((np.arctanh(rs) - z) / se_star)
    low, high = np.quantile(ts, [(1 - level) / 2, (1 + level) / 2])
    return float(np.tanh(z - high * se)), float(np.tanh(z - low * se))


def assert_equal_params(a, b) -> None:
    """Two lists of tensors are equal, bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def tables_without_time(run_dir) -> dict:
    """A run's metrics, steps and layers tables without their wall-clock column (equal across reruns)."""
    from dynamics import load_run

    run = load_run(run_dir)
    return {
        name: getattr(run, name).drop(columns=["time_s"], errors="ignore") for name in ("metrics", "steps", "layers")
    }


def backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Fresh gradients of the mean squared error of ``model`` on (x, y)."""
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()


def save_load(state):
    """``state`` through torch.save / torch.load(weights_only=True), in memory."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def dyn_in_process(*args) -> tuple[int, str]:
    """(exit code, stderr) of ``dyn ARGS...`` run as the console script runs it, in this process (a fresh
    process would cost seconds of imports)."""
    import contextlib
    import io
    import signal
    import sys
    from unittest import mock

    from cli.errors import run_group
    from cli.main import dyn

    err, sigterm = io.StringIO(), signal.getsignal(signal.SIGTERM)
    with mock.patch.object(sys, "argv", ["dyn", *map(str, args)]), contextlib.redirect_stderr(err):
        try:
            run_group(dyn)
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)  # run_group installs its own handler
    return code, err.getvalue()


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def sgd_recorder(tmp_path, name: str = "run", model: torch.nn.Module | None = None, **kw):
    """(model, optimizer, Recorder): make_model() (or ``model``) under SGD lr 0.05, recording into tmp_path/name."""
    from dynamics import Recorder

    model = model or make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, Recorder(model, opt, tmp_path / name, **kw)


def train_recorded(rec, model: torch.nn.Module, data) -> None:
    """rec.step() on every (x, y) of ``data`` with the mean squared error."""
    for x, y in data:
        rec.step(lambda x=x, y=y: mse(model, x, y))


# -- scenarios on two gloo processes: the test file runs itself as each rank --------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenarios(rank: int, out_dir, world: int, scenarios: dict, *args) -> None:
    """The worker side: join the gloo group, run each ``scenario(*args)`` in order and pickle its result
    (or its traceback) to OUT_DIR/NAME.rankR.pkl. A failure on every rank (a deterministic bug) leaves the
    ranks in step: it is recorded and the next scenario runs."""
    import datetime
    import pickle
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for name, scenario in scenarios.items():
            try:
                result = {"ok": scenario(*args)}
            except Exception:
                result = {"error": traceback.format_exc()}
            with open(Path(out_dir) / f"{name}.rank{rank}.pkl", "wb") as f:
                pickle.dump(result, f)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(script, out_dir, world: int, timeout_s: float):
    """The parent side: run ``python SCRIPT RANK OUT_DIR`` for every rank, wait (killing them all if one
    dies or the time runs out), keep each rank's output in OUT_DIR/rankR.log; returns OUT_DIR."""
    import time

    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    procs = []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "wb")  # closed below
        command = [sys.executable, os.path.abspath(script), str(rank), str(out_dir)]
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout_s
    try:
        while any(proc.poll() is None for proc, _ in procs) and time.monotonic() < deadline:
            if any(proc.poll() not in (None, 0) for proc, _ in procs):  # one died: the other would hang
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.05)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return out_dir


def scenario_results(out_dir, name: str, world: int) -> list:
    """Scenario ``name``'s result on every rank, or a test failure that shows the worker's traceback or log."""
    import pickle

    import pytest

    results = []
    for rank in range(world):
        path = out_dir / f"{name}.rank{rank}.pkl"
        if not path.exists():
            log = (out_dir / f"rank{rank}.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"scenario {name!r} left no result on rank {rank}; worker log:\n{log}")
        result = pickle.loads(path.read_bytes())
        if "error" in result:
            pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{result['error']}")
        results.append(result["ok"])
    return results


# -- files and locks ---------------------------------------------------------------------------------


def read_only_folder(parent: Path) -> Path | None:
    """``parent/ro`` made mode 0o555 if no file can be created in it, else /sys if that refuses (root
    ignores modes), else None."""
    folder = Path(parent) / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            os.close(os.open(candidate / "dyn-probe", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except OSError:
            return candidate
        os.unlink(candidate / "dyn-probe")
    return None


def lock_is_free(run_dir: Path) -> bool:
    """Whether nobody holds the run directory's lock (taken and released at once if free)."""
    import fcntl

    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return True
