"""``dyn plot`` and ``dyn animate``: the paper's Fig. 1, per-layer heatmaps, any metrics columns,
and the animated threshold."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import check_figure_path, environment_failure_at, plottable_runs, save_figure
from cli.errors import fail

AUTO = "\0auto"  # --layers given without a column
FIG1_COLUMNS = ("step_size", "loss", "grad_norm", "smoothness")  # what Fig. 1's panels draw


@click.command("plot")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Output file: .png, .pdf or .svg.  [default: fig1.png, layers.png or columns.png]",
)
@click.option(
    "--layers",
    "layers",
    is_flag=False,
    flag_value=AUTO,
    default=None,
    metavar="[COLUMN]",
    help="Per-layer heatmap of log10(COLUMN) over training, one panel per run "
    "(default column: update_ratio if recorded, else grad_norm).",
)
@click.option(
    "--depth",
    type=int,
    default=None,
    metavar="N",
    help="With --layers: one row per module, its name's first N dot-separated parts; a module's norm is "
    "the root-sum-square of its tensors'.  [default: the deepest N with at most 40 rows]",
)
@click.option(
    "--match",
    default=None,
    metavar="REGEX",
    help="With --layers: only tensors whose name contains a match of REGEX (before grouping).",
)
@click.option(
    "--columns",
    default=None,
    metavar="A,B,...",
    help="Metrics columns against iteration, one panel each (e.g. sharpness,step_size).",
)
def plot(run_dirs, out, layers, depth, match, columns):
    """Draw the paper's Fig. 1 for one or more runs (runs that differ only in seed: mean with a
    95% band, one pooled hexbin), or with --layers / --columns other views of them."""
    if layers is not None and columns is not None:
        fail("choose one of --layers and --columns")
    if layers is None and (depth is not None or match is not None):
        option = "--depth" if depth is not None else "--match"
        fail(f"{option} goes with --layers, e.g. dyn plot RUN_DIR --layers --depth 3")
    if depth is not None and depth < 1:
        fail(f"--depth must be a positive integer (the name parts kept per row), got {depth}")
    if match is not None:
        import re

        try:
            re.compile(match)
        except re.error as e:
            fail(f"--match {match!r} is not a valid regular expression ({e})")
    if layers is not None and layers != AUTO and Path(layers).is_dir():
        # `dyn plot --layers RUN_DIR ...`: the option took the first run for its column
        run_dirs, layers = (Path(layers), *run_dirs), AUTO
    if not run_dirs:
        fail("give at least one RUN_DIR, e.g. dyn plot runs/autoclip-p10")
    if out is None:
        out = Path("layers.png" if layers is not None else "columns.png" if columns is not None else "fig1.png")
    check_figure_path(out)
    wanted = None
    if columns is not None:
        wanted = [c.strip() for c in columns.split(",") if c.strip()]
        if not wanted:
            fail("--columns: name at least one metrics column, e.g. --columns sharpness,step_size")
    runs = plottable_runs(run_dirs)
    if layers is None and wanted is None:
        for run in runs:
            if not any(c in run.metrics.columns for c in FIG1_COLUMNS):
                fail(
                    f"{run.path}: its metrics table has none of the columns Fig. 1 draws ({', '.join(FIG1_COLUMNS)}); "
                    "draw its own columns with --columns"
                )
    if wanted is not None:
        from figures.columns import check_columns

        try:
            check_columns(runs, wanted)
        except ValueError as e:
            fail(f"--columns: {e}")
    from figures import style

    style.pyplot()  # off-screen drawing, chosen once for every view
    try:
        if layers is not None:
            from figures.layers import layers_figure

            fig = layers_figure(runs, None if layers == AUTO else layers, depth=depth, match=match)
        elif wanted is not None:
            from figures.columns import columns_figure

            fig = columns_figure(runs, wanted)
        else:
            from figures.fig1 import fig1

            fig = fig1(runs)
    except ValueError as e:
        fail(str(e))
    save_figure(fig, out)
    click.echo(str(out))


@click.command("animate")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), default=Path("threshold.gif"), show_default=True, help="Output GIF."
)
@click.option("--frames", type=int, default=100, show_default=True, help="Number of frames (1 to 1000).")
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds the animation lasts.")
def animate(run_dir, out, frames, duration):
    """Animate the threshold moving over training (a GIF)."""
    from figures.animation import check_animation, threshold_animation

    check_figure_path(out, (".gif",))
    try:
        check_animation(frames, duration)
    except ValueError as e:
        fail(f"--{e}")
    (run,) = plottable_runs((run_dir,))
    try:
        threshold_animation(run, out, frames=frames, duration=duration)
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        environment_failure_at(out, e)
    click.echo(str(out))
