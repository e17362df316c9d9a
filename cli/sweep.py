"""``dyn sweep``: the paper's Table 1, SI-SDR for every loss at every percentile p."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

from cli.errors import fail
from cli.record import LOSSES, TRAINING_NAMES, TRAINING_OPTIONS, check_training

SWEEP_STEPS = 2000  # per run; the default grid (35 runs) took 55 minutes on 2 cores with --jobs 2


def _parse_ps(text: str) -> list[float]:
    try:
        ps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--p {text}: give percentiles separated by commas, e.g. 0,1,10,100")
    if not ps:
        fail("--p: no percentile given")
    bad = [p for p in ps if not 0.0 <= p <= 100.0]
    if bad:
        fail(f"--p must be in [0, 100], got {bad[0]:g}")
    return sorted(set(ps))


def _parse_losses(text: str) -> list[str]:
    losses = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in losses if x not in LOSSES]
    if unknown or not losses:
        fail(f"--loss: unknown loss {unknown[0] if unknown else '(none)'}; choose from {','.join(LOSSES)}")
    return list(dict.fromkeys(losses))


def run_name(loss: str, p: float) -> str:
    return f"{loss}-p{p:g}"


def _status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("status", "running")
    except (OSError, ValueError):
        return "new"


def _training_args(kw: dict) -> list[str]:
    args = []
    for name in TRAINING_NAMES:
        value = kw.get(name)
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _sweep_options(command):
    for option in reversed(TRAINING_OPTIONS):
        if option(lambda: None).__click_params__[0].name != "steps":
            command = option(command)
    return command


@click.command("sweep")
@click.option("--p", "p_list", default="0,1,10,25,50,90,100", show_default=True, help="Percentiles, comma-separated.")
@click.option(
    "--loss", "loss_list", default="dc,wkm,mi,chimera,snr", show_default=True, help="Losses, comma-separated."
)
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs trained at once (one process each).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sweep"), show_default=True)
@click.option("--steps", type=int, default=SWEEP_STEPS, show_default=True, help="Optimizer steps per run.")
@_sweep_options
def sweep(p_list, loss_list, jobs, out, **kw):
    """Train every (loss, p) pair as an ordinary recorded run, then write Table 1.

    Finished runs are skipped and interrupted ones resumed, so rerunning an interrupted
    sweep finishes it. Writes OUT/table1.md, OUT/table1.csv and OUT/table1.png.
    """
    ps, losses = _parse_ps(p_list), _parse_losses(loss_list)
    if jobs < 1:
        fail(f"--jobs must be a positive integer, got {jobs}")
    check_training(kw)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}
    manifest = out / "sweep.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())["settings"]
        except (ValueError, KeyError):
            fail(f"{manifest}: not a dyn sweep manifest")
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            fail(f"--out {out} holds a sweep with other settings ({', '.join(changed)}): choose another --out")
    elif out.exists() and any(p for p in out.iterdir() if p.name != "logs"):
        fail(f"--out {out} exists and holds no sweep")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    manifest.write_text(json.dumps({"settings": settings, "p": ps, "loss": losses}, indent=2) + "\n")

    grid = [(loss, p) for loss in losses for p in ps]
    todo, skipped = [], 0
    for loss, p in grid:
        run_dir = out / run_name(loss, p)
        status = _status(run_dir)
        if status == "finished":
            skipped += 1
            continue
        if status == "new":
            args = ["record", "--loss", loss, "--p", f"{p:g}", "--out", str(run_dir), *_training_args(kw)]
        else:
            args = ["record", "--resume", str(run_dir), "--threads", str(kw["threads"])]
        todo.append((run_dir, args))
    click.echo(f"sweep: {len(grid)} runs, {skipped} finished already, {len(todo)} to train, {jobs} at a time", err=True)
    failed = _run_all(todo, jobs, out / "logs")
    table = write_table(out, losses, ps)
    click.echo(table)
    if failed:
        fail(f"{len(failed)} run(s) failed; see {', '.join(str(out / 'logs' / (d.name + '.log')) for d in failed)}")


def _run_all(todo: list[tuple[Path, list[str]]], jobs: int, logs: Path) -> list[Path]:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="run", file=sys.stderr, disable=not sys.stderr.isatty())
    running: list[tuple[Path, subprocess.Popen, object]] = []
    failed: list[Path] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            run_dir, args = queue.pop(0)
            log = open(logs / f"{run_dir.name}.log", "a")
            proc = subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=log, stderr=subprocess.STDOUT)
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
    bar.close()
    return failed


def write_table(out: Path, losses: list[str], ps: list[float]) -> str:
    """Table 1 (SI-SDR in dB, held-out mixtures) as Markdown and CSV, and a heatmap; returns the Markdown."""
    import csv
    import math

    from dynamics.run import RunError, load_run

    rows = []
    for loss in losses:
        for p in ps:
            run_dir = out / run_name(loss, p)
            si_sdr = si_sdri = math.nan
            try:
                run = load_run(run_dir)
                if run.status == "finished" and len(run.eval):
                    si_sdr, si_sdri = float(run.eval.si_sdr.iloc[-1]), float(run.eval.si_sdri.iloc[-1])
            except RunError:
                pass
            rows.append({"loss": loss, "p": p, "si_sdr": si_sdr, "si_sdri": si_sdri, "run": run_dir.name})
    with open(out / "table1.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["loss", "p", "si_sdr", "si_sdri", "run"])
        writer.writeheader()
        writer.writerows(rows)
    names = {"dc": "L_DC", "wkm": "L_WKM", "mi": "L_MI", "chimera": "L_MI+WKM", "snr": "L_SNR"}
    value = {(r["loss"], r["p"]): r["si_sdr"] for r in rows}
    lines = ["| p | " + " | ".join(names[x] for x in losses) + " |", "|---" * (len(losses) + 1) + "|"]
    for p in ps:
        cells = [f"{value[x, p]:.1f}" if math.isfinite(value[x, p]) else "-" for x in losses]
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    markdown = "\n".join(lines)
    (out / "table1.md").write_text(
        "SI-SDR (dB) on held-out mixtures at the end of training, for each loss and AutoClip percentile p.\n\n"
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
