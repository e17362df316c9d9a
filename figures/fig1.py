"""The paper's Fig. 1: step size, log training loss, and log gradient norm vs log smoothness."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynamics.analysis import RelaxedSmoothness, relaxed_smoothness
from dynamics.run import Run
from dynamics.summary import log_pairs
from figures import groups as arms
from figures import style

FIT_COLOR = "#404040"


def pooled_log_pairs(group: list[Run]) -> tuple[np.ndarray, np.ndarray]:
    """log(grad_norm) and log(smoothness) of the kept rows of every run in the group, concatenated."""
    pairs = [log_pairs(run) for run in group]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r as ``scipy.stats.linregress`` gives it; NaN for fewer than 3 rows or a constant."""
    from scipy.stats import linregress

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(linregress(x, y).rvalue)


def pooled_r(group: list[Run]) -> float:
    """Pearson r (``scipy.stats.linregress``) of the pooled logged rows; for one run, Fig. 1's r."""
    return pearson_r(*pooled_log_pairs(group))


def pooled_fit(group: list[Run]) -> RelaxedSmoothness:
    """L0 + L1 * ||g|| fitted to the finite (gradient norm, smoothness) rows of every run in the group
    (the median quantile regression of ``dynamics.analysis.relaxed_smoothness``, no interval)."""
    g, s = [], []
    for run in group:
        m = run.metrics
        if "grad_norm" in m.columns and "smoothness" in m.columns:
            g.append(m.grad_norm.to_numpy(dtype=float))
            s.append(m.smoothness.to_numpy(dtype=float))
    return relaxed_smoothness(np.concatenate(g or [[]]), np.concatenate(s or [[]]), n_resamples=0)


@dataclass
class _Panel:
    """One arm's hexbin panel, its numbers computed once: the pooled log pairs, r, the threshold line's
    position (NaN when none is drawn) and the relaxed-smoothness fit."""

    group: list[Run]
    x: np.ndarray
    y: np.ndarray
    r: float
    threshold_x: float
    fit: RelaxedSmoothness

    @classmethod
    def of(cls, group: list[Run]) -> _Panel:
        x, y = pooled_log_pairs(group)
        threshold = _threshold_x(group) if style.draws_threshold(group[0]) else math.nan
        return cls(group, x, y, pearson_r(x, y), threshold, pooled_fit(group))


def _threshold_x(group: list[Run]) -> float:
    """Where the threshold line goes: log(final threshold), averaged over seeds."""
    logs = [arms.final_log_threshold(run) for run in group]
    logs = [t for t in logs if math.isfinite(t)]
    return float(np.mean(logs)) if logs else math.nan


def _shared_extent(panels: list[_Panel]) -> tuple[float, float, float, float]:
    xs = [p.x for p in panels] + [np.array([p.threshold_x]) for p in panels if math.isfinite(p.threshold_x)]
    x, y = np.concatenate(xs), np.concatenate([p.y for p in panels])
    if len(y) == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    pad_x, pad_y = 0.03 * (np.ptp(x) or 1.0), 0.03 * (np.ptp(y) or 1.0)
    return (x.min() - pad_x, x.max() + pad_x, y.min() - pad_y, y.max() + pad_y)


def _draw_fit(ax, fit: RelaxedSmoothness, extent) -> None:
    """The fitted L0 + L1 e^x as log(L0 + L1 e^x) across the panel (gid "relaxed_smoothness"), with its
    numbers under r; not in the legend, which holds the threshold line."""
    if not (math.isfinite(fit.l0) and math.isfinite(fit.l1)):
        return
    grid = np.linspace(extent[0], extent[1], 200)
    ax.plot(grid, fit.curve(grid), color=FIT_COLOR, lw=1.3, label="_relaxed_smoothness", gid="relaxed_smoothness")
    ax.text(
        0.03,
        0.86,
        f"— log(L0 + L1·e^x): L0 = {fit.l0:.3g}, L1 = {fit.l1:.3g}",
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize="small",
        color=FIT_COLOR,
        gid="relaxed_smoothness",
    )


def fig1(runs: list[Run], gridsize: int = 30, max_columns: int = 3):
    """Fig. 1 of the paper for any number of runs; returns a matplotlib Figure.

    Top: step size and log(training loss) against iteration, every run overlaid. Bottom:
    one hexbin per run of log(gradient norm) against log(smoothness), natural logs, sharing
    axes, with the Pearson r (``scipy.stats.linregress``) in the panel, the relaxed-smoothness
    fit L <= L0 + L1 ||g|| drawn as log(L0 + L1 e^x) (``dynamics.analysis.relaxed_smoothness``,
    median regression; gid "relaxed_smoothness") and, for a clipped run, the dotted line at
    log(threshold at the end of training).

    Runs that differ only in seed (``figures.groups.group_runs``) form one arm: its top curves
    are the mean over seeds with the 95% t-interval of the mean as a band, and its one hexbin
    pools the rows of all its seeds (r and the fit of the pooled rows; the threshold line at the
    mean of the seeds' log final thresholds). ``fig.hexbin_axes`` lists the hexbin panels, one per arm.

    Example::

        from dynamics import load_run
        fig = fig1([load_run("runs/noclip"), load_run("runs/autoclip-p10")])
        fig.savefig("fig1.png")
    """
    import seaborn as sns

    plt = style.pyplot()

    if not runs:
        raise ValueError("fig1 needs at least one run")
    groups = arms.group_runs(runs)
    colors = style.colors([g[0] for g in groups])
    labels = arms.arm_labels(groups)
    panels = [_Panel.of(group) for group in groups]
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
        extent = _shared_extent(panels)
        fig.hexbin_axes = []
        for i, (panel, color, lab) in enumerate(zip(panels, colors, labels)):
            group = panel.group
            r, c = divmod(i, columns)
            ax = fig.add_subplot(grid[1 + r, 2 * c : 2 * c + 2])
            cmap = sns.light_palette(color, as_cmap=True)
            ax.hexbin(panel.x, panel.y, gridsize=gridsize, cmap=cmap, mincnt=1, extent=extent, linewidths=0.2)
            title = lab if len(group) == 1 else f"{lab}: {arms.seeds_note(group)} pooled"
            ax.set(xlim=extent[:2], ylim=extent[2:], xlabel="log(gradient norm)", ylabel="log(smoothness)", title=title)
            ax.text(
                0.03,
                0.95,
                f"r = {panel.r:.2f}" if math.isfinite(panel.r) else "r = n/a",
                transform=ax.transAxes,
                va="top",
                ha="left",
                fontsize="medium",
                gid="r_value",
            )
            _draw_fit(ax, panel.fit, extent)
            if math.isfinite(panel.threshold_x):
                line_label = style.threshold_label(group[0])
                if len(group) > 1:
                    line_label = f"mean {line_label}"
                ax.axvline(panel.threshold_x, color="black", ls=":", lw=1.5, label=line_label, gid="threshold")
                ax.legend(loc="upper right", fontsize="small")
            fig.hexbin_axes.append(ax)
    return fig
