"""``dyn compare`` and ``dyn info``: what runs did, in numbers."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from cli.common import check_figure_path, load_runs, save_figure
from cli.errors import fail


def print_table(rows: list[dict], columns) -> None:
    from dynamics.summary import format_number

    cells = [[format_number(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _r_note(runs) -> str:
    from dynamics.analysis import RELAXED_RESAMPLES
    from dynamics.stats import DEFAULT_RESAMPLES
    from dynamics.summary import r_block

    blocks = sorted({r_block(run) for run in runs})
    span = f"{blocks[0]}" if len(blocks) == 1 else f"{blocks[0]}-{blocks[-1]}"
    return (
        f"r_ci: 95% studentized moving-block bootstrap of the record rows, {DEFAULT_RESAMPLES} resamples (seeded), "
        f"block length {span} rows (Politis-White); l0_ci, l1_ci: 95% percentile intervals of the same "
        f"moving-block bootstrap ({RELAXED_RESAMPLES} resamples) of the median regression "
        "smoothness ~ l0 + l1 * grad_norm"
    )


GROUPS_NOTE = (
    "groups: runs whose configs differ only in seed; intervals: 95% Student t over seeds"
    " (NaN for one seed), the difference of two groups: Welch"
)


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
@click.option("--csv", "as_csv", is_flag=True, help="Print a CSV table.")
@click.option(
    "--groups",
    is_flag=True,
    help="One entry per group of runs that differ only in seed, with intervals over seeds (see below).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Also draw an overlay figure (.png, .pdf or .svg).",
)
def compare(run_dirs, as_json, as_csv, groups, out):
    """Compare runs: final loss, step size, r-value, relaxed smoothness, clipping, threshold, final evaluation.

    One row per run: run, steps, final_loss, step_size_mean, step_size_cv, r_value, r_ci_low,
    r_ci_high, l0, l1, l0_ci_low, l0_ci_high, l1_ci_low, l1_ci_high, clipped_fraction, clip_rate,
    clip_rate_last10, mean_clip_coef, mean_clip_coef_last10, lr_scale, lr_scale_last10,
    final_threshold, then final_<column> for every column of the runs' eval
    tables (empty/null where a run has none). r_ci_low and r_ci_high: a 95% interval of r_value
    from a studentized moving-block bootstrap over the recorded rows (bootstrap-t on Fisher's z;
    2000 resamples, seeded, so reruns print the same numbers; block length by Politis and White's
    rule, stated on stderr). l0, l1: relaxed smoothness, smoothness <= l0 + l1 * grad_norm fitted by
    median regression with l0, l1 >= 0, with 95% moving-block bootstrap intervals. Clipping, from
    every step (whole run, and _last10 for the last 10% of steps): clip_rate (= clipped_fraction),
    the fraction of steps clipped; mean_clip_coef, the mean threshold / grad_norm of clipped steps;
    lr_scale, the mean of min(1, threshold / grad_norm), the factor clipping puts on the step.

    --groups: runs whose configs differ only in seed (and names, output paths, command line,
    versions, timing) form a group. One entry per group: name, n_seeds, and <column>_mean,
    <column>_ci_low, <column>_ci_high for each numeric column (95% Student t interval over the
    seeds; none with one seed). With exactly two groups A and B, a third entry "A - B" holds the
    differences of the means with Welch's interval. The method is stated on stderr.
    """
    if as_json and as_csv:
        fail("choose one of --json and --csv")
    if out is not None:
        check_figure_path(out)
    from dynamics.summary import columns_of, fill_columns, json_safe, summarize, summarize_groups

    runs = load_runs(run_dirs)
    names = [r.name for r in runs]
    for run, name in zip(runs, names):
        if names.count(name) > 1:
            run.config["name"] = str(run.path)
        if run.metrics.empty:
            fail(f"{run.path}: the run has no recorded rows yet")
    rows = fill_columns([summarize(r) for r in runs])
    if groups:
        try:
            rows = summarize_groups(runs, rows)
        except ValueError as e:
            fail(str(e))
    columns = list(rows[0]) if groups else columns_of(rows)
    if as_json:
        click.echo(json.dumps([{k: json_safe(v) for k, v in r.items()} for r in rows], indent=2))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif groups:
        print_groups(rows)
    else:
        print_table(rows, columns)
    click.echo(GROUPS_NOTE if groups else _r_note(runs), err=True)
    if out is not None:
        from figures.compare import comparison_figure

        save_figure(comparison_figure(runs), out)
        click.echo(f"figure: {out}", err=True)


def print_groups(rows: list[dict]) -> None:
    """Groups as a table, one column per group (and the difference), each cell "mean [ci_low, ci_high]"."""
    from dynamics.summary import format_interval

    measures = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")]
    heads = [r["name"] if r["n_seeds"] is None else f"{r['name']} ({r['n_seeds']} seeds)" for r in rows]
    table = [
        {"": m} | {h: format_interval(r[f"{m}_mean"], r[f"{m}_ci_low"], r[f"{m}_ci_high"]) for h, r in zip(heads, rows)}
        for m in measures
    ]
    print_table(table, ["", *heads])


@click.command("info")
@click.argument("run_dir", type=click.Path(path_type=Path))
def info(run_dir):
    """What a run is (clipper, task, status) and what it recorded."""
    from dynamics.summary import final_eval, format_interval, format_number, summarize

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
    if "task_description" in c or "task" in c:
        world = c.get("world_size", 1)
        procs = f" x {world} processes" if world > 1 else ""
        click.echo(f"task       {_task_line(c)}{procs}")
    click.echo(
        f"recorded   every {c.get('every')} steps, {c.get('probes')} probe(s); "
        f"{len(run.metrics)} metrics rows, {len(run.steps)} steps, {len(run.eval)} evaluations"
    )
    if not run.metrics.empty:
        s = summarize(run)
        click.echo(
            f"last step  {s['steps']}, loss {format_number(s['final_loss'])}, "
            f"threshold {format_number(s['final_threshold'])}, clipped {100 * s['clipped_fraction']:.1f}% of steps"
        )
        click.echo(
            f"dynamics   step size mean {format_number(s['step_size_mean'])} "
            f"(cv {format_number(s['step_size_cv'])}), "
            f"r(log grad norm, log smoothness) {format_interval(s['r_value'], s['r_ci_low'], s['r_ci_high'])}"
        )
    finals = final_eval(run) if not run.eval.empty else {}
    if finals:
        values = ", ".join(f"{k[len('final_') :]} {format_number(v)}" for k, v in finals.items())
        click.echo(f"final eval {values} (step {int(run.eval.step.iloc[-1])})")
    _print_findings(run)


def _print_findings(run) -> None:
    """The findings count of ``dyn diagnose`` and one line per kind (or why there are none to count)."""
    from dynamics.diagnose import diagnose
    from dynamics.errors import DynamicsError

    try:
        findings = diagnose(run)
    except DynamicsError:
        click.echo("findings   n/a (no every-step table to diagnose)")
        return
    click.echo(f"findings   {len(findings) or 'none'}{' (dyn diagnose for details)' if findings else ''}")
    kinds: dict[str, list] = {}
    for f in findings:
        kinds.setdefault(f.kind, []).append(f)
    for kind, items in kinds.items():
        click.echo(f"  {kind:<21} {len(items)}, first at step {items[0].first_step}")


def _task_line(config: dict) -> str:
    """The task in one line: its own description if it wrote one, else its settings."""
    from dynamics.summary import format_number

    if config.get("task_description"):
        return str(config["task_description"])
    task = config["task"]
    if not isinstance(task, dict):
        return str(task)
    return ", ".join(
        f"{k}={format_number(v)}" for k, v in task.items() if v is not None and not isinstance(v, (dict, list))
    )
