"""dyn record end to end: SIGKILL at random moments, resume, bad input, the paper preset and a time limit."""

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLI_ENV, dyn, dyn_in_process

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


# -- input checks: each fails before anything is trained or made ----------------------------------------

QUICK = ["--data", "synthetic", "--hidden", "8", "--train-mixtures", "8", "--eval-mixtures", "2", "--n-samples", "512"]


@pytest.fixture
def dyn_here():
    """`dyn ARGS...` in this process, through the same entry point as the command line: (exit code, stderr lines)."""

    def run(*args):
        code, err = dyn_in_process(*args)
        return code, err.strip().splitlines()

    return run


def _refused(result, *texts):
    code, lines = result
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("dyn: error: "), lines
    for text in texts:
        assert text in lines[0], lines


@pytest.mark.parametrize("seed", [str(2**64), str(2**63)])
def test_a_seed_torch_cannot_take_is_refused_with_its_value(tmp_path, seed):
    result = dyn("record", *QUICK, "--steps", "4", "--every", "2", "--seed", seed, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"dyn: error: --seed must be in [0, {2**63 - 1}], got {seed}"
    assert not (tmp_path / "run").exists()


def test_a_negative_seed_is_refused_with_its_value(tmp_path, dyn_here):
    _refused(dyn_here("record", *QUICK, "--seed", "-1", "--out", tmp_path / "run"), "--seed", "got -1")
    assert not (tmp_path / "run").exists()


def test_a_meta_device_is_refused_before_training(tmp_path):
    result = dyn("record", *QUICK, "--steps", "4", "--every", "2", "--device", "meta", "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dyn: error: --device meta: meta tensors hold no values, so nothing can train there; use cpu or cuda"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "device, text",
    [
        pytest.param(
            "cuda",
            "no cuda device is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        pytest.param(
            "mps", "no mps device is available", marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="")
        ),
        ("cuda:99", ""),
        ("cpu:3", "this machine has 1 cpu device(s)"),
        ("gpu", "not a torch device"),
        ("", "not a torch device"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_in_one_line(tmp_path, dyn_here, device, text):
    _refused(dyn_here("record", *QUICK, "--device", device, "--out", tmp_path / "run"), f"--device {device}:", text)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, text",
    [
        (["--every", "11"], "--every 11 is beyond --steps 10: no step would be recorded"),
        (["--sharpness-every", "20", "--every", "5"], "--sharpness-every 20 is beyond --steps 10"),
        (["--eval-every", "11"], "--eval-every 11 is beyond --steps 10"),
        (["--checkpoint-every", "11"], "--checkpoint-every 11 is beyond --steps 10"),
        (["--p", "10", "--window", "10"], "--window 10 keeps at least as many gradient norms as --steps 10"),
        (["--probes", "0", "--direction", "gradient"], "--direction aims the smoothness probes"),
        (["--train-mixtures", "4", "--data", "{folder}"], "--train-mixtures sizes the built-in data"),
        (["--eval-mixtures", "4", "--data", "{folder}"], "--eval-mixtures sizes the built-in data"),
    ],
)
def test_an_option_that_can_never_take_effect_is_refused(tmp_path, dyn_here, args, text):
    args = [a.format(folder=tmp_path) for a in args]
    base = ["--hidden", "8", "--n-samples", "512", "--steps", "10"]
    _refused(dyn_here("record", *base, *args, "--out", tmp_path / "run"), text)
    assert not (tmp_path / "run").exists()


def test_options_left_at_their_defaults_are_never_refused_as_ineffective():
    from dynamics.tasks.separation.options import TaskOptions

    # --steps 10 with the default --every 20, --eval-every 1000, --checkpoint-every 200: what was not asked for
    # explicitly is not the user's mistake
    TaskOptions(steps=10).checked().check_effective(given=["steps"])
    with pytest.raises(ValueError, match="--every 20 is beyond --steps 10"):
        TaskOptions(steps=10).checked().check_effective(given=["steps", "every"])


@pytest.mark.parametrize(
    "args, shown",
    [
        (["--p", "100.0001"], "--p must be in [0, 100], got 100.0001"),
        (["--p", "-0.0001"], "--p must be in [0, 100], got -0.0001"),
        (["--lr", "-1e-9"], "--lr must be positive, got -1e-09"),
        (["--loss-scale", "-0.25"], "--loss-scale must be positive, got -0.25"),
        (["--clip-norm", "-2.5"], "--clip-norm must be positive, got -2.5"),
        (["--clip-value", "0"], "--clip-value must be positive, got 0.0"),
        (["--time-limit", "-0.5"], "--time-limit must be positive, got -0.5"),
        (["--n-samples", "255"], "--n-samples must be at least 256, got 255"),
        (["--lr", "1e999"], "--lr must be a finite number, got inf"),
        (["--nnodes", "0"], "--nnodes must be a positive integer, got 0"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-timeout", "0.0"], "got 0.0"),
    ],
)
def test_a_numeric_message_shows_the_value_given_not_a_rounded_one(tmp_path, dyn_here, args, shown):
    _refused(dyn_here("record", *QUICK, *args, "--out", tmp_path / "run"), shown)


@pytest.mark.parametrize(
    "args, text",
    [
        (["--rdzv-endpoint", "h:29500"], "--rdzv-endpoint: for several nodes only"),
        (["--rdzv-timeout", "5"], "--rdzv-timeout: for several nodes only"),
        (["--nnodes", "2"], "--nnodes needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "h"], "--rdzv-endpoint must be HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:70000"], "--rdzv-endpoint must be HOST:PORT"),
    ],
)
def test_node_options_without_their_partner_are_refused(tmp_path, dyn_here, args, text):
    _refused(dyn_here("record", *QUICK, *args, "--out", tmp_path / "run"), text)


def test_resume_refuses_a_preset(finished_run, dyn_here):
    _refused(dyn_here("record", "--resume", finished_run, "--preset", "paper"), "drop --preset")


# -- the paper preset --------------------------------------------------------------------------------------


def test_the_paper_preset_resolves_to_the_papers_fig1_settings():
    from dynamics.tasks.separation.model import Stft
    from dynamics.tasks.separation.options import TaskOptions, with_preset

    opts = TaskOptions(**with_preset("paper", {}, given=())).checked()
    # Fig. 1: mask inference, 2 BLSTM layers x 300 units, Adam 1e-3, batch 25, recorded every 20 iterations
    assert (opts.loss, opts.layers, opts.hidden, opts.lr, opts.batch_size, opts.every) == ("mi", 2, 300, 1e-3, 25, 20)
    assert Stft()(torch.zeros(opts.n_samples)).shape[0] == 400  # "a sequence length of 400 frames"
    assert opts.n_samples == 25536  # the paper's own sample count for it
    assert opts.steps == 100 * 20000 // 25  # 100 epochs of WSJ0-2mix's 20000 training mixtures at batch 25
    assert opts.train_mixtures == 20000 and opts.eval_mixtures == 3000  # WSJ0-2mix tr and tt sizes
    assert opts.device == "cuda" and opts.p == 10.0  # the clipped arm by default; --p 100 is the other
    assert opts.sharpness_every and opts.sharpness_every % opts.every == 0
    assert opts.time_limit is None and opts.seed == 0


def test_the_task_measures_sharpness_by_finite_differences(tmp_path, monkeypatch):
    # cuDNN's LSTM has no double backward: the preset's sharpness must not need one
    from dynamics.tasks.separation import train

    made = []

    class Recording(train.Sharpness):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self.hvp)

    monkeypatch.setattr(train, "Sharpness", Recording)
    opts = train.TaskOptions(
        data="synthetic",
        steps=2,
        every=1,
        sharpness_every=2,
        hidden=4,
        batch_size=2,
        train_mixtures=2,
        eval_mixtures=1,
        n_samples=512,
    )
    train.record(opts, tmp_path / "run")
    assert made == ["fd"]
    assert np.isfinite(load_run(tmp_path / "run").metrics.sharpness.iloc[-1])


def test_options_given_with_the_paper_preset_win_over_it(tmp_path, dyn_here):
    # on CPU: the preset's device and sizes overridden, its other settings kept
    small = ["--device", "cpu", "--hidden", "8", "--batch-size", "2", "--n-samples", "512", "--steps", "2"]
    small += ["--every", "1", "--train-mixtures", "4", "--eval-mixtures", "2", "--data", "synthetic"]
    code, lines = dyn_here("record", "--preset", "paper", *small, "--out", tmp_path / "run")
    assert code == 0, lines
    run = load_run(tmp_path / "run")
    task = run.config["task"]
    given = {"device": "cpu", "hidden": 8, "batch_size": 2, "n_samples": 512, "steps": 2, "every": 1}
    assert {k: task[k] for k in given} == given
    kept = {"eval_every": 8000, "checkpoint_every": 1000, "sharpness_every": 2000, "lr": 1e-3, "layers": 2}
    assert {k: task[k] for k in kept} == kept
    assert run.config["preset"] == "paper" and run.status == "finished"


def test_the_paper_preset_asks_for_a_gpu(tmp_path, dyn_here):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    _refused(dyn_here("record", "--preset", "paper", "--out", tmp_path / "run"), "--device cuda: no cuda device")
    assert not (tmp_path / "run").exists()


def test_a_time_limit_ends_the_run_cleanly_before_its_steps(tmp_path, dyn_here):
    args = ["--steps", "100000", "--every", "2", "--time-limit", "0.02"]  # 1.2 s
    code, lines = dyn_here("record", *QUICK, *args, "--out", tmp_path / "run")
    assert code == 0, lines
    run = load_run(tmp_path / "run")
    done = len(run.steps)
    assert run.status == "finished" and 0 < done < 100000
    assert run.steps.step.tolist() == list(range(1, done + 1))
    assert run.eval.step.tolist()[-1] == done  # the final evaluation, at the step it stopped
    assert 1.0 <= run.metrics.time_s.iloc[-1] < 60  # stopped at the limit, not long after
