"""``dyn sweep``: the paper's Table 1, SI-SDR for every loss at every percentile p."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from cli.errors import EXIT_ENVIRONMENT, RESUME_HINTS, Terminated, fail
from cli.record import task_options

SWEEP_STEPS = 2000  # per run; the default grid (35 runs) took 55 minutes on 2 cores with --jobs 2
# Options the sweep sets itself, per run: the grid's axes and the run's own folder.
GRID = ("p", "loss", "seed", "clip_norm", "clip_value", "no_clip", "window", "nproc", "fsdp", "steps")
LAUNCHERS = ("local", "submitit-local", "slurm")
SLURM_OPTIONS = ("slurm_partition", "slurm_time", "gpus_per_run")
POLL_S = 0.2  # how often the sweep looks at its runs
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # submitit's local executor kills a job after its timeout (default 2 minutes)
SLURM_REQUEUES = 20  # a run longer than --slurm-time goes on in up to this many requeued jobs


def _parse_list(text: str, name: str, parse, example: str) -> list:
    try:
        values = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--{name} {text}: give values separated by commas, e.g. {example}")
    if not values:
        fail(f"--{name}: no value given (e.g. {example})")
    return list(dict.fromkeys(values))


def run_name(loss: str, p: float, seed: int | None = None) -> str:
    return f"{loss}-p{p:g}" + (f"-s{seed}" if seed is not None else "")


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("status", "running")
    except (OSError, ValueError):
        return "new"


def _training_args(kw: dict) -> list[str]:
    args = []
    for name, value in kw.items():
        if value is None or value is False:
            continue
        flag = f"--{name.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]
    return args


def changed_settings(previous: dict, settings: dict) -> list[str]:
    """The options whose values differ between a sweep's manifest and this call; an option newer than the
    manifest counts as left at its default there."""
    from dynamics.tasks.separation.options import declared_options

    defaults = {name: default for name, _, _, default in declared_options()}
    return sorted(k for k in settings if previous.get(k, defaults.get(k)) != settings[k])


def _child_dies_with_parent() -> None:
    """Linux: a run still training when its parent is killed (even with SIGKILL) gets SIGTERM, which
    leaves it resumable. SLURM's early-warning signal (USR2, which submitit handles in the job's own
    process) is ignored here, so that it cannot kill the run before submitit has requeued the job."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class RunFailed(RuntimeError):
    """A run of the sweep ended with a non-zero exit code (its log says why)."""


class RecordJob:
    """One run of a sweep: ``dyn record`` started afresh, or resumed if it was interrupted, output in ``log``.

    Whether to start or resume is decided when the job runs, so a job that SLURM requeues (or a
    rerun of the sweep) resumes the run. A callable, so that submitit can pickle it and run it on a
    node; ``checkpoint`` is submitit's hook for a job about to time out or be preempted: the same
    job is requeued, and resumes.
    """

    def __init__(self, run_dir: Path, start: list[str], threads: int, log: Path):
        self.run_dir, self.start, self.threads, self.log = run_dir, start, threads, log

    @property
    def name(self) -> str:
        return self.run_dir.name

    def command(self) -> list[str] | None:
        """The ``python -m cli record ...`` command line that continues this run; None when it is finished."""
        status = _status(self.run_dir)
        if status == "finished":
            return None
        args = self.start if status == "new" else ["record", "--resume", str(self.run_dir)]
        return [sys.executable, "-m", "cli", *args, "--threads", str(self.threads)]

    def popen(self, log, command: list[str] | None = None) -> subprocess.Popen | None:
        """Start ``command`` (default: :meth:`command`) with its output in ``log``; None if the run is finished."""
        command = command or self.command()
        if command is None:
            return None
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_dies_with_parent)

    def __call__(self) -> str:
        command = self.command()
        if command is None:
            return f"{self.name}: finished already"
        print(f"{self.name}: {shlex.join(command)}; its output in {self.log}", flush=True)  # into the job's log
        with open(self.log, "a") as log:
            proc = self.popen(log, command)
            try:
                code = proc.wait()
            except BaseException:  # cancelled, requeued or timed out: stop the run resumably (SIGTERM)
                _stop(proc)
                raise
        if code != 0:
            raise RunFailed(f"{self.name}: dyn record exited with code {code}; see {self.log}")
        return f"{self.name}: finished"

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Cancelled(Exception):
    """The sweep was interrupted; ``count`` jobs it had submitted were cancelled."""

    def __init__(self, count: int, signal_name: str):
        super().__init__(count, signal_name)
        self.count, self.signal_name = count, signal_name


class SubmissionFailed(Exception):
    """The cluster refused a job; the ``cancelled`` jobs submitted before it were cancelled."""

    def __init__(self, name: str, cancelled: int, error: Exception):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # sbatch's own complaint, when submitit quotes it, is the most useful line
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else repr(error))
        super().__init__(f"submitting {name} failed: {reason[:300]} (cancelled the {cancelled} job(s) before it)")


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, disable=not sys.stderr.isatty())


class LocalLauncher:
    """Runs on this machine, ``jobs`` at a time, one process each (``--launcher local``)."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def run(self, todo: list[RecordJob]) -> list[RecordJob]:
        """Train every run; the failed ones."""
        bar = _progress(len(todo))
        running: list[tuple[RecordJob, subprocess.Popen | None, object]] = []
        failed: list[RecordJob] = []
        queue = list(todo)
        try:
            while queue or running:
                while queue and len(running) < self.jobs:
                    job = queue.pop(0)
                    log = open(job.log, "a")
                    running.append((job, job.popen(log), log))
                time.sleep(POLL_S)
                for item in list(running):
                    job, proc, log = item
                    if proc is None or proc.poll() is not None:
                        log.close()
                        running.remove(item)
                        bar.update(1)
                        if proc is not None and proc.returncode != 0:
                            failed.append(job)
        except BaseException:
            # interrupted: stop the runs in flight (SIGTERM: each leaves a resumable run), then pass it on
            for _, proc, _log in running:
                if proc is not None:
                    proc.terminate()
            for _, proc, log in running:
                if proc is not None:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                log.close()
            raise
        finally:
            bar.close()
        return failed


class SubmititLauncher:
    """Each run a job of a submitit executor (SLURM, or local processes), at most ``jobs`` at a time (None: all).

    Ctrl-C (or SIGTERM) cancels the jobs it submitted that have not ended.
    """

    def __init__(self, executor, jobs: int | None, per_job: dict | None = None, stderr: Path | None = None):
        self.executor, self.jobs, self.per_job, self.stderr = executor, jobs, per_job or {}, stderr

    def _submit(self, job: RecordJob):
        if self.per_job:
            self.executor.update_parameters(**{k: f(job) for k, f in self.per_job.items()})
        if self.stderr is None:
            return self.executor.submit(job)
        # the local executor's job controller inherits our stderr, and writes a traceback there
        # when it is cancelled: give it a file of its own instead
        self.stderr.parent.mkdir(parents=True, exist_ok=True)
        saved = os.dup(2)
        try:
            with open(self.stderr, "a") as f:
                os.dup2(f.fileno(), 2)
            return self.executor.submit(job)
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def run(self, todo: list[RecordJob]) -> list[RecordJob]:
        bar = _progress(len(todo))
        running: dict = {}  # submitit job -> RecordJob
        failed: list[RecordJob] = []
        queue = list(todo)
        try:
            while queue or running:
                while queue and (self.jobs is None or len(running) < self.jobs):
                    job = queue.pop(0)
                    with _SignalsAfter():  # a job submitted is a job known, to cancel
                        try:
                            running[self._submit(job)] = job
                        except Exception as e:  # sbatch refused it (a partition, a limit), or failed
                            for submitted in running:
                                submitted.cancel(check=False)
                            raise SubmissionFailed(job.name, len(running), e) from None
                time.sleep(POLL_S)
                for submitted, job in list(running.items()):
                    if submitted.done():
                        del running[submitted]
                        bar.update(1)
                        if _job_error(submitted) is not None:
                            failed.append(job)
        except (KeyboardInterrupt, Terminated) as e:
            for submitted in running:
                submitted.cancel(check=False)
            _wait_for_local_jobs(list(running))
            raise Cancelled(len(running), "SIGTERM" if isinstance(e, Terminated) else "SIGINT") from None
        finally:
            bar.close()
        return failed


class _SignalsAfter:
    """Hold SIGINT and SIGTERM back while the block runs, then act on them: Ctrl-C in the middle of a
    submission comes after the job is recorded as submitted."""

    def __enter__(self):
        self.caught: int | None = None
        self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame) -> None:
        self.caught = self.caught or signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.caught is not None and exc[0] is None:
            raise KeyboardInterrupt if self.caught == signal.SIGINT else Terminated()


def _job_error(submitted) -> BaseException | None:
    try:
        return submitted.exception()
    except Exception as e:  # the job ended without a result (killed): its own error
        return e


def _wait_for_local_jobs(submitted, timeout: float = 30.0) -> None:
    """A cancelled local job stops its run (SIGTERM, resumable) within seconds: wait, so that a rerun finds
    the runs free. SLURM jobs are the cluster's to stop."""
    deadline = time.monotonic() + timeout
    for job in submitted:
        process = getattr(job, "_process", None)
        if process is not None:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def _check_launcher(ctx: click.Context, launcher: str, jobs: int | None, slurm: dict) -> None:
    """Options that do not fit the launcher: one line, exit 2. A launcher this machine cannot use: exit 1."""
    from cli.record import given_options

    given = given_options(ctx, SLURM_OPTIONS)
    if launcher != "slurm" and given:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
        fail(f"{flags}: for --launcher slurm only (got --launcher {launcher})")
    if jobs is not None and jobs < 1:
        fail(f"--jobs must be a positive integer, got {jobs}")
    if launcher == "slurm":
        if slurm["slurm_time"] is None:
            fail("--launcher slurm needs --slurm-time MINUTES: each run's job time limit")
        if slurm["slurm_time"] < 1:
            fail(f"--slurm-time must be a positive number of minutes, got {slurm['slurm_time']}")
        if slurm["gpus_per_run"] is not None and slurm["gpus_per_run"] < 0:
            fail(f"--gpus-per-run must be an integer >= 0, got {slurm['gpus_per_run']}")
        if slurm["slurm_partition"] is not None and not slurm["slurm_partition"].strip():
            fail("--slurm-partition: give a partition name")
    if launcher != "local":
        if importlib.util.find_spec("submitit") is None:
            _environment(f"--launcher {launcher} needs submitit: pip install 'dyn[cluster]'")
        missing = [c for c in ("sbatch", "srun") if launcher == "slurm" and shutil.which(c) is None]
        if missing:
            _environment(
                f"--launcher slurm needs SLURM's {' and '.join(missing)} on PATH: run the sweep on the cluster's "
                "login node"
            )


def _environment(message: str) -> None:
    click.echo(f"dyn: error: {message}", err=True)
    sys.exit(EXIT_ENVIRONMENT)


def _launcher(launcher: str, jobs: int | None, logs: Path, slurm: dict, threads: int, device: str):
    """The launcher that trains the runs; submitit writes its job files and logs under ``logs/submitit``."""
    if launcher == "local":
        return LocalLauncher(jobs or 1)
    import submitit

    folder = logs / "submitit"
    if launcher == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        # the local executor shows a job the GPUs it was given (none by default): give each the ones here
        gpus = _cuda_devices() if device.startswith("cuda") else 0
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=gpus)
        return SubmititLauncher(executor, jobs or 1, stderr=folder / "controllers.log")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=SLURM_REQUEUES)
    params = {
        "time": slurm["slurm_time"],
        "partition": slurm["slurm_partition"],
        "gpus_per_node": slurm["gpus_per_run"],
        "cpus_per_task": threads,
        "nodes": 1,
        "ntasks_per_node": 1,
    }
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return SubmititLauncher(executor, jobs, per_job={"job_name": lambda job: f"dyn-{job.name}"})


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


@click.command("sweep")
@click.option("--p", "p_list", default="0,1,10,25,50,90,100", show_default=True, help="Percentiles, comma-separated.")
@click.option(
    "--loss", "loss_list", default="dc,wkm,mi,chimera,snr", show_default=True, help="Losses, comma-separated."
)
@click.option(
    "--seeds", "seed_list", default=None, help="Seeds, comma-separated (e.g. 0,1,2): every grid point once per seed."
)
@click.option(
    "--jobs",
    type=int,
    default=None,
    help="Runs trained at once (one process or job each). Default: 1, or with --launcher slurm every run "
    "(the cluster's queue decides).",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sweep"), show_default=True)
@click.option(
    "--steps", type=int, default=None, help=f"Optimizer steps per run [default: {SWEEP_STEPS}, or the preset's]."
)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads per run.")
@click.option(
    "--launcher",
    type=click.Choice(LAUNCHERS),
    default="local",
    show_default=True,
    help="Where runs train: local processes (--jobs at a time), jobs of submitit's local executor, "
    "or SLURM jobs through submitit.",
)
@click.option("--slurm-partition", default=None, help="--launcher slurm: the partition every run's job goes to.")
@click.option(
    "--slurm-time", type=int, default=None, help="--launcher slurm: each run's job time limit in minutes (required)."
)
@click.option("--gpus-per-run", type=int, default=None, help="--launcher slurm: GPUs of each run's job.")
@click.option(
    "--preset",
    type=click.Choice(["paper"]),
    default=None,
    help="Every run starts from this dyn record preset ('paper': the Fig. 1 sizes on CUDA); options given win.",
)
@task_options(exclude=GRID)
@click.pass_context
def sweep(
    ctx,
    p_list,
    loss_list,
    seed_list,
    jobs,
    out,
    steps,
    threads,
    launcher,
    slurm_partition,
    slurm_time,
    gpus_per_run,
    preset,
    **kw,
):
    """Train every (loss, p[, seed]) point as an ordinary recorded run, then write Table 1.

    Finished runs are skipped and interrupted ones resumed, so rerunning an interrupted
    sweep finishes it (whichever --launcher ran it before). Writes OUT/table1.md,
    OUT/table1.csv and OUT/table1.png; with several seeds each cell is the mean over seeds
    with its 95% t-interval. Logs: OUT/logs/RUN.log per run, submitit's job files and
    logs in OUT/logs/submitit.
    """
    from cli.record import given_options
    from dynamics.tasks.separation.options import LOSSES, PRESETS, TaskOptions, with_preset

    slurm = {"slurm_partition": slurm_partition, "slurm_time": slurm_time, "gpus_per_run": gpus_per_run}
    _check_launcher(ctx, launcher, jobs, slurm)
    ps = sorted(_parse_list(p_list, "p", float, "0,1,10,100"))
    bad = [p for p in ps if not 0.0 <= p <= 100.0]
    if bad:
        fail(f"--p must be in [0, 100], got {bad[0]!r}")
    losses = _parse_list(loss_list, "loss", str, ",".join(LOSSES))
    unknown = [x for x in losses if x not in LOSSES]
    if unknown:
        fail(f"--loss: unknown loss {unknown[0]}; choose from {','.join(LOSSES)}")
    seeds = None if seed_list is None else _parse_list(seed_list, "seeds", int, "0,1,2")
    if seeds is not None and min(seeds) < 0:
        fail(f"--seeds must be integers >= 0, got {min(seeds)}")
    if threads < 1:
        fail(f"--threads must be a positive integer, got {threads}")
    given = given_options(ctx, kw)
    if steps is None:
        steps = PRESETS[preset]["steps"] if preset else SWEEP_STEPS
    kw = {k: v for k, v in with_preset(preset, kw, given).items() if k not in GRID}
    try:
        opts = TaskOptions(**kw, steps=steps, p=ps[0], loss=losses[0]).checked()
        opts.check_effective(given)
        opts.check_environment(device=launcher != "slurm")  # a SLURM job's device is on its node
    except ValueError as e:
        fail(str(e))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in {**kw, "steps": steps}.items()}
    manifest = out / "sweep.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            fail(f"{manifest}: not a dyn sweep manifest")
        changed = changed_settings(previous, settings)
        if changed:
            fail(f"--out {out} holds a sweep with other settings ({', '.join(changed)}): choose another --out")
    elif out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if p.name != "logs")):
        fail(f"--out {out} exists and holds no sweep")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    manifest.write_text(json.dumps({"settings": settings, "p": ps, "loss": losses, "seeds": seeds}, indent=2) + "\n")

    # every run gets what the user typed (and the preset): defaults stay defaults, as in dyn record
    typed = _training_args({k: kw[k] for k in given if k in kw}) + (["--preset", preset] if preset else [])
    grid = [(loss, p, seed) for loss in losses for p in ps for seed in (seeds or [None])]
    todo, skipped = [], 0
    for loss, p, seed in grid:
        run_dir = (out / run_name(loss, p, seed)).absolute()  # a job may start in another folder
        if _status(run_dir) == "finished":
            skipped += 1
            continue
        point = ["--loss", loss, "--p", f"{p!r}"] + ([] if seed is None else ["--seed", str(seed)])
        start = ["record", *point, "--out", str(run_dir), "--steps", str(steps), *typed]
        todo.append(RecordJob(run_dir, start, threads, (logs / f"{run_dir.name}.log").absolute()))
    runner = _launcher(launcher, jobs, logs, slurm, threads, opts.device)
    at_once = "all" if getattr(runner, "jobs", None) is None else runner.jobs
    click.echo(
        f"sweep: {len(grid)} runs, {skipped} finished already, {len(todo)} to train, {at_once} at a time ({launcher})",
        err=True,
    )
    try:
        failed = runner.run(todo)
    except SubmissionFailed as e:
        _environment(str(e))
    except Cancelled as e:
        click.echo(
            f"dyn: interrupted ({e.signal_name}): cancelled {e.count} submitted job(s); {RESUME_HINTS['sweep']}",
            err=True,
        )
        sys.exit(130 if e.signal_name == "SIGINT" else 143)
    table = write_table(out, losses, ps, seeds)
    click.echo(table)
    if failed:
        fail(f"{len(failed)} run(s) failed; see {', '.join(str(job.log) for job in failed)}")


def write_table(out: Path, losses: list[str], ps: list[float], seeds: list[int] | None = None) -> str:
    """Table 1 (SI-SDR in dB, held-out mixtures) as Markdown and CSV, and a heatmap; returns the Markdown.

    With several seeds a cell is the mean over the seeds' final SI-SDR and its 95% t-interval.
    """
    import csv
    import math

    from dynamics.run import RunError, load_run
    from dynamics.stats import mean_interval
    from figures.table1 import LOSS_NAMES, table1_figure

    rows = []
    for loss in losses:
        for p in ps:
            finals = {"si_sdr": [], "si_sdri": []}
            names = []
            for seed in seeds or [None]:
                run_dir = out / run_name(loss, p, seed)
                names.append(run_dir.name)
                try:
                    run = load_run(run_dir)
                except RunError:
                    continue
                if run.status == "finished" and len(run.eval):
                    for column in finals:
                        finals[column].append(float(run.eval[column].iloc[-1]))
            row = {"loss": loss, "p": p, "n_seeds": len(finals["si_sdr"]), "run": " ".join(names)}
            for column, values in finals.items():
                mean, low, high = mean_interval(values) if values else (math.nan, math.nan, math.nan)
                row.update({column: mean, f"{column}_ci_low": low, f"{column}_ci_high": high})
            rows.append(row)
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = LOSS_NAMES
    cell = {(r["loss"], r["p"]): r for r in rows}
    value = {key: r["si_sdr"] for key, r in cell.items()}

    def text(r) -> str:
        if not math.isfinite(r["si_sdr"]):
            return "-"
        if r["n_seeds"] < 2:
            return f"{r['si_sdr']:.1f}"
        return f"{r['si_sdr']:.1f} [{r['si_sdr_ci_low']:.1f}, {r['si_sdr_ci_high']:.1f}]"

    lines = ["| p | " + " | ".join(names[x] for x in losses) + " |", "|---" * (len(losses) + 1) + "|"]
    for p in ps:
        lines.append(f"| {p:g} | " + " | ".join(text(cell[x, p]) for x in losses) + " |")
    markdown = "\n".join(lines)
    seeds_text = f" Mean over seeds {', '.join(map(str, seeds))} [95% t-interval]." if seeds and len(seeds) > 1 else ""
    (out / "table1.md").write_text(
        "SI-SDR (dB) on held-out mixtures at the end of training, for each loss and AutoClip percentile p."
        + seeds_text
        + "\n\n"
        + markdown
        + "\n"
    )
    from cli.common import save_figure

    save_figure(table1_figure(losses, ps, value), out / "table1.png")
    return markdown
