"""Two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1): the run equals one
process with the same global batch, a run killed on both nodes resumes exactly, and a rendezvous that
cannot form ends in one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import free_port, lock_is_free

from cli.record import record
from dynamics import load_run

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# float64, so that what remains between one process and two nodes is reduction order, not float32 drift
TASK = [
    "--data",
    "synthetic",
    "--steps",
    "40",
    "--every",
    "5",
    "--checkpoint-every",
    "10",
    "--eval-every",
    "20",
    "--hidden",
    "8",
    "--train-mixtures",
    "16",
    "--eval-mixtures",
    "2",
    "--n-samples",
    "2048",
    "--p",
    "10",
    "--dtype",
    "float64",
]
RUN_FILES = ["checkpoint.pt", "config.json", "eval.parquet", "layers.parquet", "metrics.parquet", "steps.parquet"]


def _start(args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _torchrun_nodes(port: int, record_args) -> list[subprocess.Popen]:
    """Two torchrun agents, node ranks 0 and 1, one worker each: `python -m torch.distributed.run ... -m cli record`."""
    return [
        _start(
            [
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "-m",
                "cli",
                "record",
                *record_args,
            ]
        )
        for rank in (0, 1)
    ]


def _dyn_nodes(port: int, record_args) -> list[subprocess.Popen]:
    """The same through dyn's own launcher: `dyn record --nnodes 2 --rdzv-endpoint ...` on each node."""
    nodes = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "60"]
    return [_start(["-m", "cli", "record", *record_args, *nodes]) for _ in (0, 1)]


def _finish(procs, timeout=90) -> list[tuple[str, str]]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        outputs.append((out, err))
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 4, and two nodes (torchrun agents) with batch 2 each, trained at once."""
    base = tmp_path_factory.mktemp("nodes")
    single = _start(["-m", "cli", "record", *TASK, "--batch-size", "4", "--out", base / "one"])
    nodes = _torchrun_nodes(free_port(), [*TASK, "--batch-size", "2", "--out", base / "two"])
    outputs = _finish([*nodes, single])
    return {"one": load_run(base / "one"), "two": load_run(base / "two"), "stdout": [o for o, _ in outputs[:2]]}


def _columns(frame):
    return [c for c in frame.columns if c != "time_s" and frame[c].dtype.kind in "fiub"]


def test_two_nodes_equal_one_process_with_the_same_global_batch(runs):
    one, two = runs["one"], runs["two"]
    assert two.config["world_size"] == 2 and one.config["world_size"] == 1
    for table in ("metrics", "steps", "eval"):
        a, b = getattr(one, table), getattr(two, table)
        assert len(a) == len(b) > 0, table
        assert list(a.columns) == list(b.columns), table
        for column in _columns(a):
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            assert np.array_equal(np.isnan(x), np.isnan(y)), (table, column)
            scale = np.maximum(np.abs(x), np.finfo(float).tiny)
            assert np.nanmax(np.abs(x - y) / scale, initial=0.0) <= 1e-9, (table, column)
    assert one.metrics.step.tolist() == list(range(5, 41, 5))
    assert len(one.steps) == 40 and one.steps.clipped.any()


def test_only_global_rank_0_writes_and_prints_the_run(runs):
    two = runs["two"]
    assert sorted(p.name for p in two.path.iterdir()) == RUN_FILES
    printed = [out.strip() for out in runs["stdout"]]
    assert sorted(printed) == ["", str(two.path)]  # one node's worker is rank 0, the other prints nothing


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_a_two_node_run_killed_on_both_nodes_resumes_exactly(runs, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*TASK, "--batch-size", "2", "--out", run_dir]
    agents = _dyn_nodes(free_port(), args)
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 60
    first = None  # the step-0 checkpoint's inode; a new one means the checkpoint at step 10 is written
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            inode = checkpoint.stat().st_ino
        except FileNotFoundError:
            continue
        first = first or inode
        if inode != first:
            break
    assert all(a.poll() is None for a in agents), "a node ended before it could be killed"
    victims = [pid for a in agents for pid in [a.pid, *_descendants(a.pid)]]
    assert len(victims) >= 4  # two agents, two workers
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    for a in agents:
        a.communicate(timeout=30)
    for pid in victims[2:]:  # the workers are gone too (not only their agents)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
    partial = load_run(run_dir)
    assert partial.status == "running" and 10 <= len(partial.steps) < 40
    assert lock_is_free(run_dir)

    alone = CliRunner().invoke(record, ["--resume", str(run_dir)])  # on one process: refused, naming the fix
    assert alone.exit_code == 2 and "resume it on as many (--nnodes 2" in alone.output, alone.output

    _finish(_dyn_nodes(free_port(), ["--resume", run_dir]))
    whole, done = runs["two"], load_run(run_dir)
    assert done.status == "finished"
    for table in ("metrics", "steps", "layers", "eval"):
        a = getattr(whole, table).drop(columns=["time_s"], errors="ignore")
        b = getattr(done, table).drop(columns=["time_s"], errors="ignore")
        assert a.equals(b), table


def test_a_rendezvous_that_cannot_form_is_one_line_exit_1(tmp_path):
    cases = {
        "alone": (f"127.0.0.1:{free_port()}", "the 2 nodes did not all join at 127.0.0.1:"),  # no other node
        "nowhere": (f"nohost.invalid:{free_port()}", "could not reach the rendezvous at nohost.invalid:"),
    }
    procs = {
        name: _start(
            ["-m", "cli", "record", *TASK, "--out", tmp_path / name]
            + ["--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "2"]
        )
        for name, (endpoint, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, err
        assert len(lines) == 1 and lines[0].startswith("dyn: error: " + cases[name][1]), err
        assert not (tmp_path / name).exists()
