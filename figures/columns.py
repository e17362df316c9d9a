"""Any metrics columns against iteration: one panel per column, every run overlaid."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dynamics.analysis import learning_rate, sgd_edge_factor
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


def sgd_edge(run: Run) -> tuple[float, float, str] | None:
    """(c, weight decay, formula) of the edge of stability λmax = c / lr − wd for a run trained with
    torch.optim.SGD (config["optimizer"]: kind, momentum β, dampening τ, nesterov, weight_decay); None for
    any other optimizer (Adam-like optimizers precondition the gradient: 2/lr is no edge for them).

    On a quadratic with curvature λ, PyTorch's SGD is stable while lr·(λ + wd) stays below 2
    (plain), 2(1+β)/(1−τ) (heavy-ball momentum with dampening τ) or 2(1+β)/(1+2β) (Nesterov): the
    eigenvalues of the iteration's 2x2 matrix stay inside the unit circle.
    """
    opt = run.config.get("optimizer") or {}
    if opt.get("kind") != "SGD":
        return None
    try:
        beta = float(opt.get("momentum") or 0.0)
        tau = float(opt.get("dampening") or 0.0)
        wd = float(opt.get("weight_decay") or 0.0)
    except (TypeError, ValueError):
        return None
    if not (0.0 <= beta < 1.0 and 0.0 <= tau < 1.0 and math.isfinite(wd)):
        return None
    c, _ = sgd_edge_factor(opt)  # the stability analysis lives with the statistics; the label here
    decay = f" − {wd:g}" if wd else ""
    if beta == 0.0:
        return c, wd, f"2/lr{decay}"
    if opt.get("nesterov"):  # torch allows Nesterov only without dampening
        return c, wd, f"2(1+β)/(lr(1+2β)){decay}, β = {beta:g}, Nesterov"
    over = f"(lr(1−{tau:g}))" if tau else "lr"
    return c, wd, f"2(1+β)/{over}{decay}, β = {beta:g}"


def _edge_of_stability(ax, groups: list[list[Run]], colors) -> None:
    """The edge of stability of SGD (Cohen et al. 2021): 2/lr, 2(1+β)/lr with heavy-ball momentum β
    (see ``sgd_edge``); a horizontal line per distinct value, or a curve where a run's learning rate
    changed over training. None for other optimizers. gid "two_over_lr"."""
    seen: list[tuple[float, str, str]] = []
    curves = []
    for group, color in zip(groups, colors):
        run = group[0]
        edge = sgd_edge(run)
        if edge is None:
            continue
        c, wd, formula = edge
        lr = learning_rate(run)
        if isinstance(lr, np.ndarray):
            ok = np.isfinite(lr) & (lr > 0)
            if not ok.any():
                continue
            if np.ptp(lr[ok]) > 1e-12 * abs(lr[ok]).max():
                curves.append((run.metrics.step.to_numpy()[ok], c / lr[ok] - wd, color, formula))
                continue
            lr = float(lr[ok][-1])
        if not (math.isfinite(lr) and lr > 0):
            continue
        y = c / lr - wd
        if not any(math.isclose(y, s, rel_tol=1e-9) for s, _, _ in seen):
            seen.append((y, color, f"{formula} (lr = {lr:g})"))
    several = len(seen) + len(curves) > 1
    for y, color, label in seen:
        # one line: black; several: each in the colour of the first run that used it
        shown = label if several else label.rpartition(" (lr = ")[0]
        ax.axhline(y, color=color if several else "black", ls="--", lw=1.2, label=shown, gid="two_over_lr")
    for steps, values, color, formula in curves:
        ax.plot(steps, values, color=color, ls="--", lw=1.2, label=formula, gid="two_over_lr")


def is_sparse(run: Run, column: str) -> bool:
    """Whether some recorded value of ``column`` has no recorded neighbour (a quantity measured every
    N record steps, NaN between): a plain line would not show it."""
    if column not in run.metrics.columns:
        return False
    finite = run.metrics[column].notna().to_numpy()
    if not finite.any():
        return False
    padded = np.concatenate([[False], finite, [False]])
    return bool((finite & ~padded[:-2] & ~padded[2:]).any())


def measured(run: Run, column: str) -> Run:
    """The run with only the metrics rows where ``column`` was measured."""
    m = run.metrics
    if column not in m.columns:
        return run
    return dataclasses.replace(run, metrics=m[m[column].notna()].reset_index(drop=True))


def columns_figure(runs: list[Run], columns: list[str]):
    """One panel per metrics column against iteration, every run overlaid; returns a matplotlib Figure.

    Runs that differ only in seed are one arm: the mean over seeds with the 95% t-interval of
    the mean as a band. A column measured only every N record steps (NaN between) is drawn
    through its measured rows, each marked. A ``sharpness`` panel of a run trained with SGD also
    gets the edge of stability (Cohen et al. 2021): 2/lr, or 2(1+β)/lr with momentum β (see
    ``sgd_edge``), with lr from the metrics lr column or config["optimizer"]["lr"]; none for
    Adam and other adaptive optimizers. A column whose values are all positive and span more
    than two decades is drawn on a log scale.
    ``fig.column_axes`` maps each column to its panel.

    Example::

        columns_figure([load_run("runs/gd")], ["sharpness", "step_size"]).savefig("columns.png")
    """
    import seaborn as sns

    plt = style.pyplot()
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
            if any(is_sparse(run, column) for run in group):
                # measured every N records: the measured rows joined, each one marked
                first = len(ax.lines)
                arms.draw_arm(ax, [measured(run, column) for run in group], column, color, lab)
                for line in ax.lines[first:]:
                    line.set(marker="o", markersize=3 if len(line.get_xdata()) <= 300 else 1.5)
            else:
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
