"""`dyn sweep` on submitit: its local executor for real, SLURM through stand-in sbatch/sacct/scancel, and bad input."""

import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CLI_ENV, dyn, lock_is_free, tables_without_time

from dynamics import load_run

pytest.importorskip("submitit")

TINY = [
    "--loss",
    "mi",
    "--every",
    "4",
    "--hidden",
    "8",
    "--data",
    "synthetic",
    "--train-mixtures",
    "8",
    "--eval-mixtures",
    "2",
    "--n-samples",
    "1024",
]


def _start_sweep(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "sweep", *map(str, args)],
        env=env or CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_submitit_local_trains_each_run_as_a_job_and_a_rerun_skips_them(tmp_path):
    out = tmp_path / "sweep"
    args = ["--launcher", "submitit-local", "--p", "10,100", *TINY, "--steps", "8", "--jobs", "2", "--out", out]
    # the same run recorded directly: a job must run exactly what dyn record runs
    direct = subprocess.Popen(
        [sys.executable, "-m", "cli", "record", *TINY, "--p", "10", "--steps", "8", "--out", tmp_path / "direct"],
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = dyn("sweep", *args, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "2 to train, 2 at a time (submitit-local)" in first.stderr
    assert direct.wait(timeout=60) == 0, direct.stderr.read()
    for name in ("mi-p10", "mi-p100"):
        assert load_run(out / name).status == "finished"
    sweep_run, direct_run = tables_without_time(out / "mi-p10"), tables_without_time(tmp_path / "direct")
    for table in sweep_run:
        assert sweep_run[table].equals(direct_run[table]), table
    job_logs = sorted((out / "logs" / "submitit").glob("*_log.out"))
    assert len(job_logs) == 2 and all("mi-p1" in p.read_text() for p in job_logs)  # each job's own log
    assert (out / "table1.png").read_bytes()[:4] == b"\x89PNG"

    files = sorted((out / "logs" / "submitit").iterdir())
    stamps = {n: (out / n / "metrics.parquet").stat().st_mtime_ns for n in ("mi-p10", "mi-p100")}
    second = dyn("sweep", *args, timeout=60)
    assert second.returncode == 0, second.stderr
    assert "2 finished already, 0 to train" in second.stderr
    assert sorted((out / "logs" / "submitit").iterdir()) == files  # no job submitted
    assert {n: (out / n / "metrics.parquet").stat().st_mtime_ns for n in stamps} == stamps


def test_ctrl_c_cancels_the_submitted_jobs_and_leaves_the_runs_resumable(tmp_path):
    out = tmp_path / "sweep"
    args = ["--launcher", "submitit-local", "--p", "10,100", *TINY, "--steps", "100000", "--jobs", "2"]
    sweep = _start_sweep(*args, "--checkpoint-every", "5", "--out", out)
    runs = [out / "mi-p10", out / "mi-p100"]
    _wait_for(lambda: all((r / "journal").exists() for r in runs), what="both runs to train")
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dyn: interrupted (SIGINT): cancelled 2 submitted job(s); rerun the same dyn sweep")
    assert "Traceback" not in err
    _wait_for(lambda: all(lock_is_free(r) for r in runs), timeout=20, what="the cancelled runs to stop")
    for r in runs:
        run = load_run(r)
        assert run.status == "running" and 0 < len(run.steps) < 100000  # stopped, resumable


FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keeps the submission script, answers as sbatch does
n=$(ls "{spool}" | wc -l)
cp "$1" "{spool}/job$n.sh"
echo "Submitted batch job $((1000 + n))"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
"""
FAKE_SCANCEL = """#!/bin/sh
echo "$@" >> "{cancelled}"
"""
FAKE_SRUN = """#!/bin/sh
exit 1  # submitit looks for srun on the login node; the jobs would run it on theirs
"""


def _fake_slurm(tmp_path, sbatch=FAKE_SBATCH):
    """A bin folder of stand-ins for SLURM's commands: (environment with it on PATH, spool, cancelled file)."""
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    cancelled = tmp_path / "cancelled.txt"
    for name, text in (("sbatch", sbatch), ("sacct", FAKE_SACCT), ("scancel", FAKE_SCANCEL), ("srun", FAKE_SRUN)):
        path = bin_dir / name
        path.write_text(text.format(spool=spool, cancelled=cancelled))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**CLI_ENV, "PATH": f"{bin_dir}{os.pathsep}{CLI_ENV['PATH']}"}, spool, cancelled


def test_slurm_jobs_carry_partition_time_and_gpus_and_ctrl_c_cancels_them(tmp_path):
    env, spool, cancelled = _fake_slurm(tmp_path)
    slurm = ["--launcher", "slurm", "--slurm-partition", "debug", "--slurm-time", "30", "--gpus-per-run", "1"]
    # the paper preset asks for CUDA: the login node needs no GPU, the jobs' nodes have them
    sweep = _start_sweep(*slurm, "--preset", "paper", "--p", "10,100", *TINY, "--out", tmp_path / "sweep", env=env)
    _wait_for(lambda: len(list(spool.iterdir())) == 2, what="two sbatch submissions")
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, err
    assert "2 to train, all at a time (slurm)" in err
    assert err.strip().splitlines()[-1].startswith("dyn: interrupted (SIGINT): cancelled 2 submitted job(s)")
    assert sorted(cancelled.read_text().split()) == ["1000", "1001"]
    scripts = sorted(p.read_text() for p in spool.iterdir())
    for script, name in zip(scripts, ("mi-p10", "mi-p100")):
        for line in ("#SBATCH --partition=debug", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1"):
            assert line in script
        assert f"#SBATCH --job-name=dyn-{name}" in script
        assert f"{tmp_path / 'sweep' / 'logs' / 'submitit'}" in script  # job logs under the sweep
    jobs = [pickle.loads(p.read_bytes()).function for p in (tmp_path / "sweep" / "logs" / "submitit").glob("*.pkl")]
    assert sorted(job.name for job in jobs) == ["mi-p10", "mi-p100"]
    for job in jobs:  # what each job will run: the preset with the options typed, the preset's 80000 steps
        assert job.start[job.start.index("--steps") + 1] == "80000"
        assert job.start[-2:] == ["--preset", "paper"] and "--hidden" in job.start and "--every" in job.start


REFUSING_SBATCH = """#!/bin/sh
n=$(ls "{spool}" | wc -l)
cp "$1" "{spool}/job$n.sh"
if [ "$n" -ge 1 ]; then
    echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
    exit 1
fi
echo "Submitted batch job $((1000 + n))"
"""


def test_a_job_the_cluster_refuses_is_one_line_and_the_jobs_before_it_are_cancelled(tmp_path):
    env, spool, cancelled = _fake_slurm(tmp_path, REFUSING_SBATCH)
    slurm = ["--launcher", "slurm", "--slurm-partition", "nope", "--slurm-time", "30"]
    sweep = _start_sweep(*slurm, "--p", "10,100", *TINY, "--out", tmp_path / "sweep", env=env)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        "dyn: error: submitting mi-p100 failed: sbatch: error: Batch job submission failed: "
        "Invalid partition name specified (cancelled the 1 job(s) before it)"
    )
    assert "Traceback" not in err and cancelled.read_text().split() == ["1000"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--launcher", "cluster"], 2, "Invalid value for '--launcher'"),
        (["--slurm-partition", "gpu"], 2, "--slurm-partition: for --launcher slurm only (got --launcher local)"),
        (
            ["--launcher", "submitit-local", "--slurm-time", "5", "--gpus-per-run", "1"],
            2,
            "--slurm-time, --gpus-per-run: for --launcher slurm only",
        ),
        (["--launcher", "slurm"], 2, "--launcher slurm needs --slurm-time MINUTES"),
        (["--launcher", "slurm", "--slurm-time", "0"], 2, "--slurm-time must be a positive number of minutes, got 0"),
        (["--launcher", "slurm", "--slurm-time", "60"], 1, "--launcher slurm needs SLURM's sbatch and srun on PATH"),
        (["--jobs", "0"], 2, "--jobs must be a positive integer, got 0"),
    ],
)
def test_sweep_launcher_misuse_is_one_line_and_makes_nothing(tmp_path, args, code, message):
    env = {**CLI_ENV, "PATH": str(tmp_path)}  # no sbatch here
    result = subprocess.run(
        [sys.executable, "-m", "cli", "sweep", *args, "--out", str(tmp_path / "sweep")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's task through /proc")
def test_a_job_warned_of_its_end_is_requeued_and_resumes_its_run(tmp_path):
    # SLURM warns a job (USR2) before its time limit or a preemption; submitit then asks the job to
    # checkpoint and requeues it, and its local executor restarts a job that asks to be requeued.
    import submitit

    from cli.sweep import RecordJob

    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    start = ["record", *TINY, "--p", "10", "--steps", "120", "--every", "20", "--checkpoint-every", "40"]
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(RecordJob(run_dir, [*start, "--out", str(run_dir)], 1, log))
    _wait_for(lambda: (run_dir / "journal").exists(), what="the run to start")
    (task,) = _children(job._process.pid)  # the controller's one task runs RecordJob
    os.kill(task, signal.SIGUSR2)  # what SLURM sends; submitit's local controller does not forward it
    _wait_for(job.done, timeout=120, what="the requeued job to finish")
    assert job.result() == "run: finished"
    run = load_run(run_dir)
    assert run.status == "finished" and run.steps.step.tolist() == list(range(1, 121))
    ran = "".join(p.read_text() for p in (tmp_path / "jobs").glob("*_log.out"))  # each start, in the job's log
    assert "cli record --loss mi" in ran and f"cli record --resume {run_dir}" in ran, ran
