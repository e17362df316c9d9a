"""Any metrics columns against iteration: one panel per column, every run overlaid."""

from __future__ import annotations

import math

import numpy as np

from dynamics.run import Run
from figures import groups as arms
from figures import style


def metric_columns(runs: list[Run]) -> list[str]:
    """Numeric (or boolean) columns of the runs' metrics tables, in first-seen order, step left out."""
    import pandas as pd

    out: list[str] = []
    for run in runs:
        for c in run.metrics.columns:
            dtype = run.metrics[c].dtype
            numeric = pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
            if c != "step" and numeric and c not in out:
                out.append(c)
    return out


def check_columns(runs: list[Run], columns: list[str]) -> None:
    """Raise ValueError naming the available columns when a column is in no run's metrics."""
    if not columns:
        raise ValueError("name at least one metrics column")
    available = metric_columns(runs)
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise ValueError(
            f"no metrics column {', '.join(map(repr, unknown))} in these runs; the columns are: {', '.join(available)}"
        )


def learning_rate(run: Run) -> np.ndarray | float:
    """The run's learning rate: the metrics lr column where recorded (an array, one per row), else
    config["optimizer"]["lr"] (a float); NaN if neither."""
    m = run.metrics
    if "lr" in m.columns:
        lr = m.lr.to_numpy(dtype=float)
        if np.isfinite(lr).any():
            return lr
    lr = (run.config.get("optimizer") or {}).get("lr")
    try:
        return float(lr)
    except (TypeError, ValueError):
        return math.nan


def _edge_of_stability(ax, groups: list[list[Run]], colors) -> None:
    """2/lr (Cohen et al. 2021): a horizontal line per distinct learning rate, or the curve 2/lr(t)
    where a run's learning rate changed over training. gid "two_over_lr"."""
    seen: list[tuple[float, str]] = []
    curves = []
    for group, color in zip(groups, colors):
        run = group[0]
        lr = learning_rate(run)
        if isinstance(lr, np.ndarray):
            ok = np.isfinite(lr) & (lr > 0)
            if not ok.any():
                continue
            if np.ptp(lr[ok]) > 1e-12 * abs(lr[ok]).max():
                curves.append((run.metrics.step.to_numpy()[ok], 2.0 / lr[ok], color))
                continue
            lr = float(lr[ok][-1])
        if math.isfinite(lr) and lr > 0 and not any(math.isclose(lr, s, rel_tol=1e-9) for s, _ in seen):
            seen.append((lr, color))
    several = len(seen) + len(curves) > 1
    for lr, color in seen:
        # one line: black; several: each in the colour of the first run that used it
        label = f"2/lr (lr = {lr:g})" if several else "2/lr"
        ax.axhline(2.0 / lr, color=color if several else "black", ls="--", lw=1.2, label=label, gid="two_over_lr")
    for steps, values, color in curves:
        ax.plot(steps, values, color=color, ls="--", lw=1.2, label="2/lr", gid="two_over_lr")


def columns_figure(runs: list[Run], columns: list[str]):
    """One panel per metrics column against iteration, every run overlaid; returns a matplotlib Figure.

    Runs that differ only in seed are one arm: the mean over seeds with the 95% t-interval of
    the mean as a band. A ``sharpness`` panel also gets the edge of stability, 2/lr (Cohen et
    al. 2021), with lr from the metrics lr column or config["optimizer"]["lr"]. A column whose
    values are all positive and span more than two decades is drawn on a log scale.
    ``fig.column_axes`` maps each column to its panel.

    Example::

        columns_figure([load_run("runs/gd")], ["sharpness", "step_size"]).savefig("columns.png")
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not runs:
        raise ValueError("columns_figure needs at least one run")
    columns = list(dict.fromkeys(columns))
    check_columns(runs, columns)
    groups = arms.group_runs(runs)
    colors = style.colors([g[0] for g in groups])
    labels = arms.arm_labels(groups)
    n = len(columns)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.3 * nrows), layout="constrained", squeeze=False)
    fig.column_axes = {}
    for ax, column in zip(axes.flat, columns):
        for group, color, lab in zip(groups, colors, labels):
            arms.draw_arm(ax, group, column, color, lab)
        if column == "sharpness":
            _edge_of_stability(ax, groups, colors)
        values = np.concatenate([r.metrics[column].to_numpy(dtype=float) for r in runs if column in r.metrics.columns])
        values = values[np.isfinite(values)]
        if len(values) and values.min() > 0 and values.max() > 100 * values.min():
            ax.set_yscale("log")
        ax.set(xlabel="Iterations", ylabel=column)
        ax.margins(x=0)
        fig.column_axes[column] = ax
    for ax in list(axes.flat)[n:]:
        ax.remove()
    # the runs once, above the panels; a panel's own legend holds only its 2/lr lines
    shared: dict[str, object] = {}
    for ax in fig.column_axes.values():
        handles, names = ax.get_legend_handles_labels()
        own = [(h, lab) for h, lab in zip(handles, names) if h.get_gid() == "two_over_lr"]
        shared.update({lab: h for h, lab in zip(handles, names) if h.get_gid() != "two_over_lr"})
        if own:
            ax.legend(*zip(*own), fontsize="small")
    if shared:
        fig.legend(list(shared.values()), list(shared), loc="outside upper center", ncols=min(len(shared), 3))
    return fig
