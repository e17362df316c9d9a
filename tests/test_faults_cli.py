"""Faults of the machine and misuse at the command line: one line, the right exit code, nothing lost or stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dynamics import load_run
from tests.helpers import CLI_ENV, dyn

TINY = ["--data", "synthetic", "--hidden", "8", "--train-mixtures", "16", "--eval-mixtures", "2", "--every", "5"]


def _one_line(result, code, text):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def _no_partial_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "args, text",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--loss-scale", "nan"], "--loss-scale must be a finite number"),
        (["--n-samples", "100"], "--n-samples must be at least 256"),
        (["--sharpness-every", "7"], "--sharpness-every must be a multiple of --every"),
        (["--fsdp"], "--fsdp shards over processes"),
    ],
)
def test_nonsense_options_are_refused_before_anything_is_made(tmp_path, args, text):
    result = dyn("record", *TINY, *args, "--out", tmp_path / "run")
    _one_line(result, 2, text)
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line(dyn("record", *TINY, "--out", tmp_path / "file" / "run"), 2, "is a file, not a folder")
    _one_line(dyn("record", *TINY, "--out", tmp_path / ("x" * 300)), 2, "too long")


def test_resume_refuses_options_it_would_ignore(tmp_path):
    run = tmp_path / "run"
    assert dyn("record", *TINY, "--steps", "10", "--out", run).returncode == 0
    _one_line(dyn("record", "--resume", run, "--steps", "20"), 2, "drop --steps")


def test_n_samples_at_the_minimum_trains(tmp_path):
    result = dyn("record", *TINY, "--steps", "5", "--n-samples", "256", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert load_run(tmp_path / "run").status == "finished"


def test_a_run_without_checkpoint_restarts_in_place(tmp_path):
    run = tmp_path / "run"
    assert dyn("record", *TINY, "--steps", "10", "--out", run).returncode == 0
    reference = load_run(run).steps.drop(columns=[])
    # as if killed right after config.json: no checkpoint, a journal with stray rows, status running
    for name in ("checkpoint.pt", "metrics.parquet", "steps.parquet", "layers.parquet", "eval.parquet"):
        (run / name).unlink()
    import json

    config = json.loads((run / "config.json").read_text())
    config["status"] = "running"
    (run / "config.json").write_text(json.dumps(config))
    result = dyn("record", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert load_run(run).steps.equals(reference)


def test_sigterm_exits_143_with_the_resume_hint_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "record", *TINY, "--steps", "100000", "--checkpoint-every", "20", "--out", run],
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "journal").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "dyn: terminated (a recording resumes with: dyn record --resume RUN_DIR)"
    assert _no_partial_files(run) == []
    assert load_run(run).status == "running" and len(load_run(run).steps) > 0


def test_interrupt_hints_name_the_command_that_ran(monkeypatch, capsys):
    import click

    from cli.errors import run_group

    @click.group()
    def group():
        pass

    @group.command("plot")
    def plot():
        raise KeyboardInterrupt

    @group.command("sweep")
    def sweep():
        raise KeyboardInterrupt

    for command, hint in (("plot", "dyn: interrupted\n"), ("sweep", "rerun the same dyn sweep")):
        monkeypatch.setattr(sys, "argv", ["dyn", command])
        with pytest.raises(SystemExit) as exit_info:
            run_group(group)
        assert exit_info.value.code == 130
        err = capsys.readouterr().err
        assert hint in err and "dyn record --resume" not in err


def test_a_kill_during_the_final_compaction_does_not_write_the_final_evaluation_twice(tmp_path):
    run = tmp_path / "run"
    # record 12 steps (final evaluation at step 12, not a multiple of --eval-every), dying while
    # the eval table is compacted: everything journalled, config still "running"
    code = (
        "import os, sys\n"
        "import dynamics.journal as journal\n"
        "real = journal.compact\n"
        "def dying(directory, name, *rest):\n"
        "    if name == 'eval':\n"
        "        os._exit(9)\n"
        "    return real(directory, name, *rest)\n"
        "journal.compact = dying\n"
        "from cli.main import main\n"
        f"sys.argv = ['dyn', 'record', *{TINY!r}, '--steps', '12', '--eval-every', '5', '--out', {str(run)!r}]\n"
        "main()\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV)
    assert killed.returncode == 9, killed.stderr
    assert load_run(run).status == "running"
    result = dyn("record", "--resume", run)
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    steps = pq.read_table(run / "eval.parquet").column("step").to_pylist()
    assert steps == [5, 10, 12]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 700 KiB file system (tmpfs; root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_partial_file(tiny_disk):
    run = tiny_disk / "run"
    result = dyn("record", *TINY, "--hidden", "48", "--steps", "2000", "--every", "1", "--out", run)
    _one_line(result, 1, "the disk is full")
    assert "dyn record --resume" in result.stderr
    assert _no_partial_files(tiny_disk) == []
    if (run / "checkpoint.pt").exists():  # the last complete checkpoint is intact
        import torch

        state = torch.load(run / "checkpoint.pt", weights_only=False)
        assert state["t"] >= 0


def test_a_full_disk_while_saving_a_figure_leaves_no_file(tiny_disk, tmp_path):
    run = tmp_path / "run"
    assert dyn("record", *TINY, "--steps", "20", "--out", run).returncode == 0
    (tiny_disk / "filler").write_bytes(os.urandom(690 * 1024 - 4096))
    result = dyn("plot", run, "--out", tiny_disk / "fig.pdf")
    assert result.returncode in (1, 2), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_a_bug_inside_training_is_a_traceback_with_exit_1_not_bad_input(tmp_path):
    code = (
        "import sys\n"
        "from dynamics.tasks.separation import train\n"
        "def broken(self, t):\n"
        "    raise ValueError('a bug in the task')\n"
        "train.SeparationTask.closure = broken\n"
        "from cli.main import main\n"
        f"sys.argv = ['dyn', 'record', *{TINY!r}, '--steps', '5', '--out', {str(tmp_path / 'run')!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLI_ENV)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug in the task" in result.stderr
    assert "dyn: error" not in result.stderr


def test_sharpness_every_records_sharpness_on_its_steps(tmp_path):
    run = tmp_path / "run"
    result = dyn("record", *TINY, "--steps", "20", "--sharpness-every", "10", "--out", run)
    assert result.returncode == 0, result.stderr
    metrics = load_run(run).metrics.set_index("step")
    assert metrics.sharpness.loc[[10, 20]].notna().all() and metrics.sharpness.loc[[5, 15]].isna().all()
    assert (metrics.sharpness.loc[[10, 20]] > 0).all()


def test_load_run_reads_a_run_that_closes_while_it_is_read(tmp_path, monkeypatch):
    import dynamics.journal as journal

    run = tmp_path / "run"
    assert dyn("record", *TINY, "--steps", "10", "--out", run).returncode == 0
    import json

    config = json.loads((run / "config.json").read_text())
    config["status"] = "running"  # as seen by a reader just before the run finished closing
    (run / "config.json").write_text(json.dumps(config))
    (run / "journal").mkdir()
    calls = []

    def closing(directory, name, schema=None):
        calls.append(name)
        # the closing writer marks the run finished and removes its journal under our feet
        config["status"] = "finished"
        (run / "config.json").write_text(json.dumps(config))
        (run / "journal").rmdir() if (run / "journal").exists() else None
        raise FileNotFoundError(directory)

    monkeypatch.setattr(journal, "read_table", closing)
    loaded = load_run(run)
    assert calls and loaded.status == "finished" and len(loaded.steps) == 10


def test_force_replaces_a_crashed_run_and_refuses_a_live_one(tmp_path):
    import fcntl
    import json

    run = tmp_path / "run"
    first = dyn("record", *TINY, "--steps", "10", "--out", run)
    assert first.returncode == 0, first.stderr
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "status": "running"}))  # as if it had crashed
    _one_line(dyn("record", *TINY, "--steps", "10", "--out", run), 2, "already holds a run")
    with open(run / ".lock", "w") as held:  # another process records it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _one_line(dyn("record", *TINY, "--steps", "10", "--out", run, "--force"), 2, "being recorded by another")
    replaced = dyn("record", *TINY, "--steps", "5", "--out", run, "--force")
    assert replaced.returncode == 0, replaced.stderr
    fresh = load_run(run)
    assert fresh.config["run_id"] != config["run_id"] and fresh.steps.step.tolist() == [1, 2, 3, 4, 5]
    _one_line(dyn("record", "--resume", run, "--force"), 2, "give one of them")
