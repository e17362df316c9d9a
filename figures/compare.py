"""Overlay of several runs: step size, log loss, threshold and a held-out evaluation metric over training."""

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


def comparison_figure(runs: list[Run], eval_column: str | None = None):
    """A 2x2 overlay of runs; returns a matplotlib Figure.

    The bottom-right panel shows ``eval_column`` of the runs' eval tables (by default the metric
    the runs' configs name as ``eval_metric``, else the first numeric eval column any run has;
    left empty when no run evaluated anything).

    Example::

        comparison_figure([load_run(d) for d in ("runs/noclip", "runs/autoclip-p10")]).savefig("compare.png")
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    available = eval_columns(runs)
    if eval_column is not None and eval_column not in available:
        raise ValueError(
            f"no eval column {eval_column!r} in these runs; the eval columns are: {', '.join(available) or 'none'}"
        )
    declared = [r.config.get("eval_metric") for r in runs]  # the task's headline metric, if it names one
    preferred = declared[0] if declared and len(set(declared)) == 1 and declared[0] in available else None
    metric = eval_column or preferred or (available[0] if available else None)
    colors, labels = style.colors(runs), style.unique_labels(runs)
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), layout="constrained")
    (ax_step, ax_loss), (ax_thr, ax_eval) = axes
    for run, color, lab in zip(runs, colors, labels):
        m = run.metrics
        ax_step.plot(m.step, m.step_size, color=color, lw=1.0, label=lab)
        with np.errstate(divide="ignore", invalid="ignore"):
            ax_loss.plot(m.step, np.log(m.loss.to_numpy(dtype=float)), color=color, lw=1.0, label=lab)
        ax_thr.plot(m.step, m.grad_norm, color=color, lw=0.6, alpha=0.35)
        if style.draws_threshold(run):
            ax_thr.plot(m.step, m.threshold, color=color, lw=1.8, label=f"{lab}: threshold")
        if metric is not None and metric in run.eval.columns and len(run.eval):
            ax_eval.plot(run.eval.step, run.eval[metric], color=color, marker="o", label=lab)
    ax_step.set(xlabel="Iterations", ylabel="Step size")
    ax_loss.set(xlabel="Iterations", ylabel="log(training loss)")
    ax_thr.set(xlabel="Iterations", ylabel="gradient norm (thin) and threshold", yscale="log")
    ax_eval.set(xlabel="Iterations", ylabel=f"held-out {metric}" if metric else "held-out evaluation (none recorded)")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig
