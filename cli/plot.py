"""``dyn plot`` and ``dyn animate``: the paper's Fig. 1 and its animated threshold."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import check_figure_path, plottable_runs
from cli.errors import fail


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=Path("fig1.png"),
    show_default=True,
    help="Output file: .png, .pdf or .svg.",
)
def plot(run_dirs, out):
    """Draw the paper's Fig. 1 for one or more runs."""
    check_figure_path(out)
    runs = plottable_runs(run_dirs)
    import matplotlib

    matplotlib.use("Agg")
    from figures.fig1 import fig1

    fig1(runs).savefig(out, dpi=150)
    click.echo(str(out))


@click.command("animate")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), default=Path("threshold.gif"), show_default=True, help="Output GIF."
)
@click.option("--frames", type=int, default=100, show_default=True, help="Number of frames.")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds the animation lasts.")
def animate(run_dir, out, frames, duration):
    """Animate the threshold moving over training (a GIF)."""
    check_figure_path(out, (".gif",))
    if frames < 1:
        fail(f"--frames must be a positive integer, got {frames}")
    if not duration > 0:
        fail(f"--duration must be positive, got {duration:g}")
    (run,) = plottable_runs((run_dir,))
    from figures.animation import threshold_animation

    try:
        threshold_animation(run, out, frames=frames, duration=duration)
    except ValueError as e:
        fail(str(e))
    click.echo(str(out))
