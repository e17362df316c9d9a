"""The paper's Fig. 1: step size, log training loss, and log gradient norm vs log smoothness."""

from __future__ import annotations

import math

import numpy as np

from dynamics.run import Run
from dynamics.summary import log_pairs
from figures import groups as arms
from figures import style


def pooled_log_pairs(group: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """log(grad_norm) and log(smoothness) of the kept rows of every run in the group, concatenated."""
    pairs = [log_pairs(run) for run in group]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def pooled_r(group: list[Run]) -> float:
    """Pearson r (``scipy.stats.linregress``) of the pooled logged rows; for one run, Fig. 1's r."""
    from scipy.stats import linregress

    x, y = pooled_log_pairs(group)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(linregress(x, y).rvalue)


def _threshold_x(group: list[Run]) -> float:
    """Where the threshold line goes: log(final threshold), averaged over seeds."""
    logs = [arms.final_log_threshold(run) for run in group]
    logs = [t for t in logs if math.isfinite(t)]
    return float(np.mean(logs)) if logs else math.nan


def _shared_extent(groups: list[list[Run]]) -> tuple[float, float, float, float]:
    xs, ys = [], []
    for group in groups:
        x, y = pooled_log_pairs(group)
        xs.append(x)
        ys.append(y)
        if style.draws_threshold(group[0]):
            t = _threshold_x(group)
            if math.isfinite(t):
                xs.append(np.array([t]))
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

    Runs that differ only in seed (``figures.groups.group_runs``) form one arm: its top curves
    are the mean over seeds with the 95% t-interval of the mean as a band, and its one hexbin
    pools the rows of all its seeds (r of the pooled rows; the threshold line at the mean of
    the seeds' log final thresholds). ``fig.hexbin_axes`` lists the hexbin panels, one per arm.

    Example::

        from dynamics import load_run
        fig = fig1([load_run("runs/noclip"), load_run("runs/autoclip-p10")])
        fig.savefig("fig1.png")
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not runs:
        raise ValueError("fig1 needs at least one run")
    groups = arms.group_runs(runs)
    colors = style.colors([g[0] for g in groups])
    labels = arms.arm_labels(groups)
    n = len(groups)
    columns = min(max(n, 2), max_columns)
    rows = math.ceil(n / columns)
    with sns.axes_style("white"):
        fig = plt.figure(figsize=(4.6 * columns, 3.4 * (1 + rows)), layout="constrained")
        grid = fig.add_gridspec(1 + rows, 2 * columns)
        half = columns
        ax_step = fig.add_subplot(grid[0, :half])
        ax_loss = fig.add_subplot(grid[0, half:])
        for group, color, lab in zip(groups, colors, labels):
            arms.draw_arm(ax_step, group, "step_size", color, lab)
            arms.draw_arm(ax_loss, group, "loss", color, lab, transform=np.log)
        ax_step.set(xlabel="Iterations", ylabel="Step size")
        ax_loss.set(xlabel="Iterations", ylabel="log(training loss)")
        for ax in (ax_step, ax_loss):
            ax.legend(loc="upper right", fontsize="small")
            ax.margins(x=0)
        extent = _shared_extent(groups)
        fig.hexbin_axes = []
        for i, (group, color, lab) in enumerate(zip(groups, colors, labels)):
            r, c = divmod(i, columns)
            ax = fig.add_subplot(grid[1 + r, 2 * c : 2 * c + 2])
            x, y = pooled_log_pairs(group)
            cmap = sns.light_palette(color, as_cmap=True)
            ax.hexbin(x, y, gridsize=gridsize, cmap=cmap, mincnt=1, extent=extent, linewidths=0.2)
            title = lab if len(group) == 1 else f"{lab}: {arms.seeds_note(group)} pooled"
            ax.set(xlim=extent[:2], ylim=extent[2:], xlabel="log(gradient norm)", ylabel="log(smoothness)", title=title)
            rv = pooled_r(group)
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
            t = _threshold_x(group)
            if style.draws_threshold(group[0]) and math.isfinite(t):
                line_label = style.threshold_label(group[0])
                if len(group) > 1:
                    line_label = f"mean {line_label}"
                ax.axvline(t, color="black", ls=":", lw=1.5, label=line_label, gid="threshold")
                ax.legend(loc="upper right", fontsize="small")
            fig.hexbin_axes.append(ax)
    return fig
