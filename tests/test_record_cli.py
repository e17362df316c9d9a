"""dyn record end to end: SIGKILL at random moments, resume, and bad input."""

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CLI_ENV, dyn

from dynamics import load_run

SMALL = [
    "--steps",
    "200",
    "--every",
    "10",
    "--checkpoint-every",
    "40",
    "--eval-every",
    "100",
    "--hidden",
    "16",
    "--train-mixtures",
    "24",
    "--eval-mixtures",
    "4",
    "--p",
    "10",
]


def _tables(run):
    return {
        t: getattr(run, t).drop(columns=["time_s"], errors="ignore") for t in ("metrics", "steps", "layers", "eval")
    }


def _is_prefix(part, whole):
    for name, frame in part.items():
        if frame.empty:
            continue
        ref = whole[name].iloc[: len(frame)].reset_index(drop=True)
        if not frame.reset_index(drop=True).equals(ref):
            return False
    return True


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    reference = subprocess.Popen(
        [sys.executable, "-m", "cli", "record", *SMALL, "--out", tmp_path / "whole"],
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    args = ["record", *SMALL, "--out", run_dir]
    partial = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *map(str, args)],
            env=CLI_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 2.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial.append(_tables(load_run(run_dir)))  # a killed run reads
        args = ["record", "--resume", run_dir]
    finished = dyn(*args)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == str(run_dir)
    assert reference.wait(timeout=120) == 0
    whole = _tables(load_run(tmp_path / "whole"))
    resumed = _tables(load_run(run_dir))
    for name in whole:
        assert resumed[name].equals(whole[name]), name
    assert len(whole["metrics"]) == 20 and len(whole["steps"]) == 200
    assert partial, "no kill happened before the run finished"
    for part in partial:
        # a killed run holds a prefix of the real rows: nothing garbled, nothing skipped
        assert _is_prefix(part, whole)
        steps = part["steps"].step.tolist()
        assert steps == list(range(1, len(steps) + 1))
        assert part["metrics"].step.tolist() == list(range(10, 10 * len(part["metrics"]) + 1, 10))


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    result = dyn(
        "record",
        "--steps",
        "20",
        "--every",
        "10",
        "--hidden",
        "8",
        "--train-mixtures",
        "8",
        "--eval-mixtures",
        "2",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--p", "101"], "--p must be in [0, 100]"),
        (["--p", "-1"], "--p must be in [0, 100]"),
        (["--p", "10", "--no-clip"], "choose one of"),
        (["--out", "{run}"], "already holds a run"),
        (["--resume", "{run}"], "finished run"),
        (["--resume", "{missing}"], "no such run directory"),
        (["--resume", "{plain}"], "not a run directory"),
        (["--data", "{plain}"], "WSJ0-2mix folder"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_bad_input_gets_one_line_exit_2_and_leaves_files_alone(finished_run, tmp_path, args, message):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    names = {"run": finished_run, "missing": tmp_path / "missing", "plain": plain}
    args = [a.format(**names) for a in args]
    before = _digest(finished_run), _digest(plain)
    result = dyn("record", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (_digest(finished_run), _digest(plain)) == before
    assert not (tmp_path / "missing").exists()
