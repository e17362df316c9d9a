"""Overlay of several runs: step size, log loss, threshold and a held-out evaluation metric over training,
each panel only where some run recorded it."""

from __future__ import annotations

import numpy as np

from dynamics.run import Run
from figures import style


def eval_columns(runs: list[Run]) -> list[str]:
    """Numeric columns of the runs' eval tables (step left out), in first-seen order."""
    import pandas as pd

    out: list[str] = []
    for run in runs:
        for c in run.eval.columns:
            if c != "step" and c not in out and pd.api.types.is_numeric_dtype(run.eval[c].dtype):
                out.append(c)
    return out


def _has(runs: list[Run], column: str) -> bool:
    """Whether some run recorded a value of the metrics ``column``."""
    return any(column in r.metrics.columns and r.metrics[column].notna().any() for r in runs)


def comparison_figure(runs: list[Run], eval_column: str | None = None):
    """An overlay of runs, one panel per quantity some run recorded; returns a matplotlib Figure.

    Panels: step size, log(training loss), gradient norm with the clipping threshold, and
    ``eval_column`` of the runs' eval tables (by default the metric the runs' configs name as
    ``eval_metric``, else the first numeric eval column any run has). A panel no run has data
    for is left out (a run recorded without step sizes, or without held-out evaluation), so
    the figure has one to four panels; ``fig.panel_axes`` maps "step_size", "loss",
    "threshold" and "eval" to the panels drawn.

    Example::

        comparison_figure([load_run(d) for d in ("runs/noclip", "runs/autoclip-p10")]).savefig("compare.png")
    """
    import seaborn as sns

    plt = style.pyplot()
    if not runs:
        raise ValueError("comparison_figure needs at least one run")
    available = eval_columns(runs)
    if eval_column is not None and eval_column not in available:
        raise ValueError(
            f"no eval column {eval_column!r} in these runs; the eval columns are: {', '.join(available) or 'none'}"
        )
    declared = [r.config.get("eval_metric") for r in runs]  # the task's headline metric, if it names one
    preferred = declared[0] if declared and len(set(declared)) == 1 and declared[0] in available else None
    metric = eval_column or preferred or (available[0] if available else None)
    evaluated = metric is not None and any(metric in r.eval.columns and r.eval[metric].notna().any() for r in runs)
    panels = [
        name
        for name, shown in (
            ("step_size", _has(runs, "step_size")),
            ("loss", _has(runs, "loss")),
            ("threshold", _has(runs, "grad_norm")),
            ("eval", evaluated),
        )
        if shown
    ]
    if not panels:
        raise ValueError("nothing to compare: no run recorded a loss, a gradient norm or a step size")
    nrows, ncols = (2, 2) if len(panels) == 4 else (1, len(panels))
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.5 * nrows), layout="constrained", squeeze=False)
    fig.panel_axes = dict(zip(panels, axes.flat))
    ax_step, ax_loss, ax_thr, ax_eval = (fig.panel_axes.get(p) for p in ("step_size", "loss", "threshold", "eval"))
    colors, labels = style.colors(runs), style.unique_labels(runs)
    for run, color, lab in zip(runs, colors, labels):
        m = run.metrics
        if ax_step is not None and "step_size" in m.columns:
            ax_step.plot(m.step, m.step_size, color=color, lw=1.0, label=lab)
        if ax_loss is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                ax_loss.plot(m.step, np.log(m.loss.to_numpy(dtype=float)), color=color, lw=1.0, label=lab)
        if ax_thr is not None:
            ax_thr.plot(m.step, m.grad_norm, color=color, lw=0.6, alpha=0.35)
            if style.draws_threshold(run):
                ax_thr.plot(m.step, m.threshold, color=color, lw=1.8, label=f"{lab}: threshold")
        if ax_eval is not None and metric in run.eval.columns and len(run.eval):
            ax_eval.plot(run.eval.step, run.eval[metric], color=color, marker="o", label=lab)
    ylabels = {
        "step_size": "Step size",
        "loss": "log(training loss)",
        "threshold": "gradient norm (thin) and threshold",
        "eval": f"held-out {metric}",
    }
    for name, ax in fig.panel_axes.items():
        ax.set(xlabel="Iterations", ylabel=ylabels[name])
    if ax_thr is not None:
        ax_thr.set_yscale("log")
    for ax in fig.panel_axes.values():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig
