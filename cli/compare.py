"""``dyn compare`` and ``dyn info``: what runs did, in numbers."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import click

from cli.common import check_figure_path, load_runs
from cli.errors import fail


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict], columns) -> None:
    cells = [[_fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print a CSV table.")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Also draw an overlay figure (.png, .pdf or .svg).",
)
def compare(run_dirs, as_json, as_csv, out):
    """Compare runs: final loss, step size, r-value, clipping, threshold, SI-SDRi."""
    if as_json and as_csv:
        fail("choose one of --json and --csv")
    if out is not None:
        check_figure_path(out)
    from dynamics.summary import COLUMNS, json_safe, summarize

    runs = load_runs(run_dirs)
    names = [r.name for r in runs]
    for run, name in zip(runs, names):
        if names.count(name) > 1:
            run.config["name"] = str(run.path)
        if run.metrics.empty:
            fail(f"{run.path}: the run has no recorded rows yet")
    rows = [summarize(r) for r in runs]
    if as_json:
        click.echo(json.dumps([{k: json_safe(v) for k, v in r.items()} for r in rows], indent=2))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print_table(rows, COLUMNS)
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
        from figures.compare import comparison_figure

        comparison_figure(runs).savefig(out, dpi=150)
        click.echo(f"figure: {out}", err=True)


@click.command("info")
@click.argument("run_dir", type=click.Path(path_type=Path))
def info(run_dir):
    """What a run is (clipper, task, status) and what it recorded."""
    from dynamics.summary import summarize

    (run,) = load_runs((run_dir,))
    c = run.config
    clipper = c.get("clipper", {})
    settings = ", ".join(f"{k}={v}" for k, v in clipper.items() if k != "kind")
    click.echo(f"run        {run.path}")
    click.echo(f"status     {run.status}")
    click.echo(f"clipper    {clipper.get('kind', '?')} ({settings})")
    click.echo(f"optimizer  {c.get('optimizer', {}).get('kind', '?')}, lr {c.get('optimizer', {}).get('lr', '?')}")
    model = c.get("model", {})
    n = model.get("parameters")
    click.echo(f"model      {model.get('kind', '?')}, {f'{n:,}' if isinstance(n, int) else '?'} parameters")
    if "task" in c:
        t = c["task"]
        data = t.get("data") or "synthetic mixtures"
        world = c.get("world_size", 1)
        procs = f" x {world} processes" + (" (FSDP2)" if t.get("fsdp") else " (DDP)") if world > 1 else ""
        click.echo(
            f"task       separation, loss {t.get('loss', 'mi')}, BLSTM {t['layers']}x{t['hidden']}, "
            f"batch {t['batch_size']}{procs}, {data}"
        )
    click.echo(
        f"recorded   every {c.get('every')} steps, {c.get('probes')} probe(s); "
        f"{len(run.metrics)} metrics rows, {len(run.steps)} steps, {len(run.eval)} evaluations"
    )
    if not run.metrics.empty:
        s = summarize(run)
        click.echo(
            f"last step  {s['steps']}, loss {_fmt(s['final_loss'])}, threshold {_fmt(s['final_threshold'])}, "
            f"clipped {100 * s['clipped_fraction']:.1f}% of steps"
        )
        click.echo(
            f"dynamics   step size mean {_fmt(s['step_size_mean'])} (cv {_fmt(s['step_size_cv'])}), "
            f"r(log grad norm, log smoothness) {_fmt(s['r_value'])}, final SI-SDRi {_fmt(s['final_si_sdri'])} dB"
        )
