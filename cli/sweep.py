"""``dyn sweep``: the paper's Table 1, SI-SDR for every loss at every percentile p."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from cli.errors import fail
from cli.record import task_options

SWEEP_STEPS = 2000  # per run; the default grid (35 runs) took 55 minutes on 2 cores with --jobs 2
# Options the sweep sets itself, per run: the grid's axes and the run's own folder.
GRID = ("p", "loss", "seed", "clip_norm", "clip_value", "no_clip", "window", "nproc", "fsdp", "steps")


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


@click.command("sweep")
@click.option("--p", "p_list", default="0,1,10,25,50,90,100", show_default=True, help="Percentiles, comma-separated.")
@click.option(
    "--loss", "loss_list", default="dc,wkm,mi,chimera,snr", show_default=True, help="Losses, comma-separated."
)
@click.option(
    "--seeds", "seed_list", default=None, help="Seeds, comma-separated (e.g. 0,1,2): every grid point once per seed."
)
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs trained at once (one process each).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sweep"), show_default=True)
@click.option("--steps", type=int, default=SWEEP_STEPS, show_default=True, help="Optimizer steps per run.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads per run.")
@task_options(exclude=GRID)
def sweep(p_list, loss_list, seed_list, jobs, out, steps, threads, **kw):
    """Train every (loss, p[, seed]) point as an ordinary recorded run, then write Table 1.

    Finished runs are skipped and interrupted ones resumed, so rerunning an interrupted
    sweep finishes it. Writes OUT/table1.md, OUT/table1.csv and OUT/table1.png; with
    several seeds each cell is the mean over seeds with its 95% t-interval.
    """
    from dynamics.tasks.separation.options import LOSSES, TaskOptions

    ps = sorted(_parse_list(p_list, "p", float, "0,1,10,100"))
    bad = [p for p in ps if not 0.0 <= p <= 100.0]
    if bad:
        fail(f"--p must be in [0, 100], got {bad[0]:g}")
    losses = _parse_list(loss_list, "loss", str, ",".join(LOSSES))
    unknown = [x for x in losses if x not in LOSSES]
    if unknown:
        fail(f"--loss: unknown loss {unknown[0]}; choose from {','.join(LOSSES)}")
    seeds = None if seed_list is None else _parse_list(seed_list, "seeds", int, "0,1,2")
    if seeds is not None and min(seeds) < 0:
        fail(f"--seeds must be integers >= 0, got {min(seeds)}")
    for name, value in (("jobs", jobs), ("threads", threads)):
        if value < 1:
            fail(f"--{name} must be a positive integer, got {value}")
    try:
        opts = TaskOptions(**kw, steps=steps, p=ps[0], loss=losses[0]).checked()
        opts.check_environment()
    except ValueError as e:
        fail(str(e))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in {**kw, "steps": steps}.items()}
    manifest = out / "sweep.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            fail(f"{manifest}: not a dyn sweep manifest")
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            fail(f"--out {out} holds a sweep with other settings ({', '.join(changed)}): choose another --out")
    elif out.exists() and (not out.is_dir() or any(p for p in out.iterdir() if p.name != "logs")):
        fail(f"--out {out} exists and holds no sweep")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    manifest.write_text(json.dumps({"settings": settings, "p": ps, "loss": losses, "seeds": seeds}, indent=2) + "\n")

    grid = [(loss, p, seed) for loss in losses for p in ps for seed in (seeds or [None])]
    todo, skipped = [], 0
    for loss, p, seed in grid:
        run_dir = out / run_name(loss, p, seed)
        status = _status(run_dir)
        if status == "finished":
            skipped += 1
            continue
        if status == "new":
            point = ["--loss", loss, "--p", f"{p:g}"] + ([] if seed is None else ["--seed", str(seed)])
            args = ["record", *point, "--out", str(run_dir), "--steps", str(steps), *_training_args(kw)]
        else:
            args = ["record", "--resume", str(run_dir)]
        todo.append((run_dir, [*args, "--threads", str(threads)]))
    click.echo(f"sweep: {len(grid)} runs, {skipped} finished already, {len(todo)} to train, {jobs} at a time", err=True)
    failed = _run_all(todo, jobs, out / "logs")
    table = write_table(out, losses, ps, seeds)
    click.echo(table)
    if failed:
        fail(f"{len(failed)} run(s) failed; see {', '.join(str(out / 'logs' / (d.name + '.log')) for d in failed)}")


def _child_dies_with_parent() -> None:
    """Linux: a run still training when the sweep is killed (even with SIGKILL) is stopped too."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _run_all(todo: list[tuple[Path, list[str]]], jobs: int, logs: Path) -> list[Path]:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="run", file=sys.stderr, disable=not sys.stderr.isatty())
    running: list[tuple[Path, subprocess.Popen, object]] = []
    failed: list[Path] = []
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run_dir, args = queue.pop(0)
                log = open(logs / f"{run_dir.name}.log", "a")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "cli", *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_child_dies_with_parent,
                )
                running.append((run_dir, proc, log))
            time.sleep(0.2)
            for item in list(running):
                run_dir, proc, log = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    bar.update(1)
                    if proc.returncode != 0:
                        failed.append(run_dir)
    except BaseException:
        # interrupted: stop the runs in flight (SIGTERM: each leaves a resumable run), then pass it on
        for _, proc, _log in running:
            proc.terminate()
        for _, proc, log in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        raise
    finally:
        bar.close()
    return failed


def write_table(out: Path, losses: list[str], ps: list[float], seeds: list[int] | None = None) -> str:
    """Table 1 (SI-SDR in dB, held-out mixtures) as Markdown and CSV, and a heatmap; returns the Markdown.

    With several seeds a cell is the mean over the seeds' final SI-SDR and its 95% t-interval.
    """
    import csv
    import math

    from dynamics.run import RunError, load_run
    from dynamics.stats import mean_interval

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
    names = {"dc": "L_DC", "wkm": "L_WKM", "mi": "L_MI", "chimera": "L_MI+WKM", "snr": "L_SNR"}
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
    _heatmap(out / "table1.png", losses, ps, value, names)
    return markdown


def _heatmap(path: Path, losses, ps, value, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    grid = np.array([[value[x, p] for x in losses] for p in ps])
    fig, ax = plt.subplots(figsize=(1.4 * len(losses) + 2, 0.5 * len(ps) + 1.6), layout="constrained")
    sns.heatmap(
        grid,
        annot=True,
        fmt=".1f",
        cmap="rocket_r",
        ax=ax,
        cbar_kws={"label": "SI-SDR (dB)"},
        xticklabels=[names[x] for x in losses],
        yticklabels=[f"{p:g}" for p in ps],
        mask=~np.isfinite(grid),
    )
    ax.set(xlabel="loss", ylabel="AutoClip p", title="SI-SDR on held-out mixtures")
    fig.savefig(path, dpi=150)
    plt.close(fig)
