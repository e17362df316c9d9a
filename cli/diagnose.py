"""``dyn diagnose``: what went wrong in runs (spikes, non-finite steps, clipping, stability, dead tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import load_runs
from cli.errors import fail


def findings_of(run) -> list:
    """``dynamics.diagnose.diagnose(run)``, a run it cannot read being one line and exit code 2."""
    from dynamics.diagnose import diagnose
    from dynamics.errors import DynamicsError

    try:
        return diagnose(run)
    except DynamicsError as e:
        fail(str(e))


@click.command("diagnose")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of findings, each with its run.")
def diagnose(run_dirs, as_json):
    """Find what went wrong in runs, from their tables: loss spikes, gradient-norm explosions, non-finite
    steps, clipping saturation, an AutoClip that never clips, sharpness above the edge of stability (SGD),
    dead parameter tensors, step-size collapse.

    One block per run: its findings, each with kind, steps, value and one sentence of meaning (the
    rules and thresholds: docs/analysis.md). --json: a list of objects with run, kind, first_step,
    last_step, value and message. Needs each run's every-step table (steps.parquet).
    """
    from dynamics.summary import format_number

    runs = load_runs(run_dirs)
    found = [(run, findings_of(run)) for run in runs]
    if as_json:
        rows = [{"run": str(run.path), **f.to_dict()} for run, findings in found for f in findings]
        click.echo(json.dumps(rows, indent=2))
        return
    for i, (run, findings) in enumerate(found):
        if i:
            click.echo("")
        count = f"{len(findings)} finding{'s' if len(findings) != 1 else ''}" if findings else "no findings"
        click.echo(f"{run.path}: {count}")
        for f in findings:
            steps = f"step {f.first_step}" if f.first_step == f.last_step else f"steps {f.first_step}-{f.last_step}"
            click.echo(f"  {f.kind:<21} {steps:<17} value {format_number(f.value):<9} {f.message}")
