"""Recording on several processes (gloo, CPU): the same numbers as one process, rank 0 writes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from dynamics import load_run

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# float64, so that what remains between 1 and 2 processes is reduction order, not float32 drift
TASK = [
    "--steps",
    "100",
    "--every",
    "10",
    "--checkpoint-every",
    "30",
    "--eval-every",
    "50",
    "--hidden",
    "12",
    "--train-mixtures",
    "32",
    "--eval-mixtures",
    "4",
    "--p",
    "10",
    "--dtype",
    "float64",
]
COLUMNS = ["loss", "grad_norm", "threshold", "step_size", "smoothness"]


def record(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "cli", "record", *map(str, args)], env=ENV, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 8, two DDP processes with batch 4 each, two FSDP2 processes."""
    base = tmp_path_factory.mktemp("dist")
    single = subprocess.Popen(
        [sys.executable, "-m", "cli", "record", *TASK, "--batch-size", "8", "--out", base / "one"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ddp = record(*TASK, "--batch-size", "4", "--nproc", "2", "--out", base / "ddp")
    assert ddp.returncode == 0, ddp.stderr
    fsdp = record(*TASK, "--batch-size", "4", "--nproc", "2", "--fsdp", "--out", base / "fsdp")
    assert fsdp.returncode == 0, fsdp.stderr
    assert single.wait(timeout=120) == 0, single.stderr.read()
    return {name: load_run(base / name) for name in ("one", "ddp", "fsdp")}


def _relative(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300))


def test_two_ddp_processes_match_one_process_with_twice_the_batch(runs):
    one, ddp = runs["one"], runs["ddp"]
    assert ddp.config["world_size"] == 2 and one.config["world_size"] == 1
    assert one.metrics.step.tolist() == ddp.metrics.step.tolist() == list(range(10, 101, 10))
    for column in COLUMNS:
        assert _relative(one.metrics[column], ddp.metrics[column]) < 1e-5, column
    assert _relative(one.steps.grad_norm, ddp.steps.grad_norm) < 1e-5
    assert _relative(one.eval.si_sdri, ddp.eval.si_sdri) < 1e-5


def test_fsdp2_and_ddp_give_the_same_grad_norm_and_threshold(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert fsdp.config["task"]["fsdp"] and fsdp.config["world_size"] == 2
    assert len(fsdp.steps) == 100
    for column in ("grad_norm", "threshold"):
        assert _relative(ddp.steps[column], fsdp.steps[column]) < 1e-10, column
    for column in COLUMNS:
        assert _relative(ddp.metrics[column], fsdp.metrics[column]) < 1e-8, column
    # per-layer norms of sharded parameters are global, not one shard's
    assert _relative(ddp.layers.param_norm, fsdp.layers.param_norm) < 1e-10


def test_two_process_run_killed_and_resumed_equals_uninterrupted(runs, tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "record", *TASK, "--batch-size", "4", "--nproc", "2", "--out", run_dir],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while not (run_dir / "journal" / "metrics.00000.arrows").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers at once
    proc.wait()
    partial = load_run(run_dir)
    assert 0 < len(partial.steps) < 100
    resumed = record("--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    whole, done = runs["ddp"], load_run(run_dir)
    for table in ("metrics", "steps", "layers", "eval"):
        a = getattr(whole, table).drop(columns=["time_s"], errors="ignore")
        b = getattr(done, table).drop(columns=["time_s"], errors="ignore")
        assert a.equals(b), table


WORKER = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    from autoclip import AutoClip
    from dynamics import Recorder
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rec = Recorder(model, opt, sys.argv[1], clipper=AutoClip(model.parameters(), p=10), every=5)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data
    thresholds = []
    for t in range(40):
        x = torch.randn(8, 4, generator=g) * (1 + 5 * (t % 7 == 0))
        rec.step(lambda: (model(x) - x.sum(1, keepdim=True)).pow(2).mean())
        thresholds.append(rec.clipper.threshold)
    rec.close()
    wrote = sum(j.rows for j in rec.run.journals.values()) if rec.run is not None else 0
    json.dump({"thresholds": thresholds, "rows_written": wrote}, open(f"{sys.argv[2]}.{rank}.json", "w"))
    torch.distributed.destroy_process_group()
    """
)


def test_every_rank_gets_the_same_threshold_and_only_rank_0_writes(tmp_path):
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            script,
            tmp_path / "run",
            tmp_path / "rank",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank.{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]
    assert ranks[0]["rows_written"] > 0 and ranks[1]["rows_written"] == 0
    run = load_run(tmp_path / "run")
    assert run.metrics.step.tolist() == list(range(5, 41, 5))
    assert run.steps.threshold.tolist() == ranks[0]["thresholds"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "eval.parquet",
        "layers.parquet",
        "metrics.parquet",
        "steps.parquet",
    ]
