"""What several commands share: loading runs and checking figure paths, as one-line errors."""

from __future__ import annotations

from pathlib import Path

from cli.errors import fail

FIGURE_FORMATS = (".png", ".pdf", ".svg")


def load_runs(run_dirs):
    """Load run directories, turning any problem into one line and exit code 2."""
    from dynamics.run import RunError, load_run

    runs = []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except RunError as e:
            fail(str(e))
    return runs


def check_figure_path(out: Path, formats=FIGURE_FORMATS) -> None:
    """A figure path must have a known format and a folder that exists."""
    if out.suffix.lower() not in formats:
        fail(f"--out {out}: use one of {', '.join(formats)}")
    if not out.parent.exists():
        fail(f"--out {out}: folder {out.parent} does not exist")


def plottable_runs(run_dirs):
    """Loaded runs that have at least one recorded row."""
    runs = load_runs(run_dirs)
    for run in runs:
        if run.metrics.empty:
            fail(f"{run.path}: the run has no recorded rows yet")
    return runs
