"""Per-layer heatmaps over training: one row per parameter tensor, one column per recorded step."""

from __future__ import annotations

import math
import re

import numpy as np

from dynamics.run import Run
from figures import style

MAX_NAME = 32  # characters of a parameter name shown; longer ones lose their middle
MAX_ROW_LABELS = 80  # up to this many rows every row is named; beyond, every k-th


def natural_key(name: str) -> list:
    """Sort key that puts 'layers.2' before 'layers.10' (model order for numbered modules)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def short_name(name: str, width: int = MAX_NAME) -> str:
    """The name, or its start and end around an ellipsis when longer than ``width``."""
    if len(name) <= width:
        return name
    tail = (width - 1) * 2 // 3  # the end of a name (the layer and weight) tells most
    return f"{name[: width - 1 - tail]}…{name[-tail:]}"


def layer_columns(run: Run) -> list[str]:
    """The numeric columns of the run's layers table that a heatmap can show."""
    import pandas as pd

    return [
        c
        for c in run.layers.columns
        if c not in ("step", "name") and pd.api.types.is_numeric_dtype(run.layers[c].dtype)
    ]


def default_column(runs: list[Run]) -> str:
    """update_ratio when every run recorded it, else grad_norm."""
    return "update_ratio" if all("update_ratio" in r.layers.columns for r in runs) else "grad_norm"


def layer_matrix(run: Run, column: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names in model order, steps, log10 of the column as a names x steps array; NaN where not positive).

    Raises ValueError when the run has no layers table or no such column.
    """
    layers = run.layers
    if layers.empty:
        raise ValueError(f"{run.path}: the run recorded no per-layer rows (record with layers on)")
    if column not in layer_columns(run):
        raise ValueError(
            f"{run.path}: no layers column {column!r}; the layers columns are: {', '.join(layer_columns(run))}"
        )
    table = layers.pivot(index="name", columns="step", values=column)
    # the recorded order is the model's; a table already sorted by name has lost it, and natural
    # order ('layers.2' before 'layers.10') comes closest
    seen = list(dict.fromkeys(layers.name))
    names = sorted(seen, key=natural_key) if seen == sorted(seen) else seen
    table = table.loc[names]
    values = table.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(values) & (values > 0), np.log10(values), np.nan)
    return list(names), table.columns.to_numpy(), logs


def layers_figure(runs: list[Run], column: str | None = None):
    """Heatmaps of log10(column) per parameter tensor (rows) and recorded step (columns), one panel
    per run, sharing one colour scale and one colour bar; returns a matplotlib Figure.

    ``column``: a numeric column of the layers table; by default update_ratio where every run
    has it, else grad_norm. Cells that are missing, zero or negative are left blank (grey).
    ``fig.heatmap_axes`` lists the panels.

    Example::

        layers_figure([load_run("runs/autoclip-p10")]).savefig("layers.png")
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not runs:
        raise ValueError("layers_figure needs at least one run")
    column = column or default_column(runs)
    data = [layer_matrix(run, column) for run in runs]
    finite = [m[np.isfinite(m)] for _, _, m in data]
    finite = np.concatenate(finite) if finite else np.array([])
    vmin, vmax = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    heights = [max(1.6, 0.8 + (0.16 if len(n) <= 40 else 0.12) * min(len(n), MAX_ROW_LABELS)) for n, _, _ in data]
    longest = max(len(short_name(n)) for names, _, _ in data for n in names)
    fig, axes = plt.subplots(
        len(runs),
        1,
        figsize=(4.5 + 0.065 * longest + 3.0, sum(heights) + 0.6 * len(runs)),
        height_ratios=heights,
        layout="constrained",
        squeeze=False,
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    labels = style.unique_labels(runs)
    fig.heatmap_axes = []
    image = None
    for ax, (names, steps, logs), lab in zip(axes[:, 0], data, labels):
        image = ax.imshow(logs, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        every = max(1, math.ceil(len(names) / MAX_ROW_LABELS))
        rows = np.arange(0, len(names), every)
        ax.set_yticks(rows, [short_name(names[i]) for i in rows], fontsize=8 if len(rows) <= 40 else 6)
        if every > 1:
            ax.set_yticks(np.arange(len(names)), minor=True)
        # columns are recorded steps, which need not be evenly spaced: tick by column, label by step
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.xaxis.set_major_formatter(
            FuncFormatter(lambda x, _, s=steps: f"{s[int(round(x))]:d}" if 0 <= round(x) < len(s) else "")
        )
        ax.set(xlabel="Iterations", title=lab)
        ax.tick_params(axis="both", length=2)
        fig.heatmap_axes.append(ax)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"log10({column})", shrink=0.9 if len(runs) > 1 else 1.0)
    return fig
