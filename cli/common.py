"""What several commands share: loading runs and checking figure paths, as one-line errors."""

from __future__ import annotations

from pathlib import Path

from cli.errors import environment_failure, fail

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
    """A known format, and a path a file can be created at: checked before any drawing."""
    if out.suffix.lower() not in formats:
        fail(f"--out {out}: use one of {', '.join(formats)}")
    from figures.files import FigurePathError, check_writable

    try:
        check_writable(out)
    except FigurePathError as e:
        fail(f"--out {e}")
    except OSError as e:
        environment_failure_at(out, e)


def environment_failure_at(out: Path, error: OSError) -> None:
    """Disk full, permission lost, I/O error while writing the figure ``out``: one line, exit code 1."""
    environment_failure(error, "free space or fix permissions and retry", path=out)


def save_figure(fig, out: Path) -> None:
    """Save atomically (no partial file under ``out``), errors as one line; the figure is closed."""
    import matplotlib.pyplot as plt

    from figures.files import FigurePathError, save_figure

    try:
        save_figure(fig, out, dpi=150)
    except FigurePathError as e:
        fail(f"--out {e}")
    except OSError as e:
        environment_failure_at(out, e)
    finally:
        plt.close(fig)


def plottable_runs(run_dirs):
    """Loaded runs that have at least one recorded row."""
    runs = load_runs(run_dirs)
    for run in runs:
        if run.metrics.empty:
            fail(f"{run.path}: the run has no recorded rows yet")
    return runs
