"""The paper's Fig. 1: step size, log training loss, and log gradient norm vs log smoothness."""

from __future__ import annotations

import math

import numpy as np

from dynamics.run import Run
from dynamics.summary import log_pairs, r_value
from figures import style


def _shared_extent(runs: list[Run]) -> tuple[float, float, float, float]:
    xs, ys = [], []
    for run in runs:
        x, y = log_pairs(run)
        xs.append(x)
        ys.append(y)
        if style.draws_threshold(run):
            xs.append(np.log([run.metrics.threshold.iloc[-1]]))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    pad_x, pad_y = 0.03 * (np.ptp(x) or 1.0), 0.03 * (np.ptp(y) or 1.0)
    return (x.min() - pad_x, x.max() + pad_x, y.min() - pad_y, y.max() + pad_y)


def fig1(runs: list[Run], gridsize: int = 30, max_columns: int = 3):
    """Fig. 1 of the paper for any number of runs; returns a matplotlib Figure.

    Top: step size and log(training loss) against iteration, every run overlaid. Bottom:
    one hexbin per run of log(gradient norm) against log(smoothness), natural logs, sharing
    axes, with the Pearson r (``scipy.stats.linregress``) in the panel and, for a clipped
    run, the dotted line at log(threshold at the end of training).

    Example::

        from dynamics import load_run
        fig = fig1([load_run("runs/noclip"), load_run("runs/autoclip-p10")])
        fig.savefig("fig1.png")
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not runs:
        raise ValueError("fig1 needs at least one run")
    colors = style.colors(runs)
    labels = style.unique_labels(runs)
    n = len(runs)
    columns = min(max(n, 2), max_columns)
    rows = math.ceil(n / columns)
    with sns.axes_style("white"):
        fig = plt.figure(figsize=(4.6 * columns, 3.4 * (1 + rows)), layout="constrained")
        grid = fig.add_gridspec(1 + rows, 2 * columns)
        half = columns
        ax_step = fig.add_subplot(grid[0, :half])
        ax_loss = fig.add_subplot(grid[0, half:])
        for run, color, lab in zip(runs, colors, labels):
            m = run.metrics
            ax_step.plot(m.step, m.step_size, color=color, lw=1.0, label=lab)
            with np.errstate(divide="ignore", invalid="ignore"):
                ax_loss.plot(m.step, np.log(m.loss.to_numpy(dtype=float)), color=color, lw=1.0, label=lab)
        ax_step.set(xlabel="Iterations", ylabel="Step size")
        ax_loss.set(xlabel="Iterations", ylabel="log(training loss)")
        for ax in (ax_step, ax_loss):
            ax.legend(loc="upper right", fontsize="small")
            ax.margins(x=0)
        extent = _shared_extent(runs)
        fig.hexbin_axes = []
        for i, (run, color, lab) in enumerate(zip(runs, colors, labels)):
            r, c = divmod(i, columns)
            ax = fig.add_subplot(grid[1 + r, 2 * c : 2 * c + 2])
            x, y = log_pairs(run)
            cmap = sns.light_palette(color, as_cmap=True)
            ax.hexbin(x, y, gridsize=gridsize, cmap=cmap, mincnt=1, extent=extent, linewidths=0.2)
            ax.set(xlim=extent[:2], ylim=extent[2:], xlabel="log(gradient norm)", ylabel="log(smoothness)", title=lab)
            rv = r_value(run)
            ax.text(
                0.03,
                0.95,
                f"r = {rv:.2f}" if math.isfinite(rv) else "r = n/a",
                transform=ax.transAxes,
                va="top",
                ha="left",
                fontsize="medium",
                gid="r_value",
            )
            if style.draws_threshold(run):
                t = math.log(run.metrics.threshold.iloc[-1])
                ax.axvline(t, color="black", ls=":", lw=1.5, label=style.threshold_label(run), gid="threshold")
                ax.legend(loc="upper right", fontsize="small")
            fig.hexbin_axes.append(ax)
    return fig
