"""The numbers that say what a run did: one row per run for `dyn compare` and `dyn info`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynamics.run import Run

COLUMNS = (
    "run",
    "steps",
    "final_loss",
    "step_size_mean",
    "step_size_cv",
    "r_value",
    "clipped_fraction",
    "final_threshold",
    "final_si_sdri",
)


def log_pairs(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Natural logs of (grad_norm, smoothness) over the recorded rows where both are positive and finite."""
    g = run.metrics.grad_norm.to_numpy(dtype=float)
    s = run.metrics.smoothness.to_numpy(dtype=float)
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    return np.log(g[keep]), np.log(s[keep])


def r_value(run: Run) -> float:
    """Pearson r of log(grad_norm) and log(smoothness), as scipy.stats.linregress gives it (Fig. 1)."""
    from scipy.stats import linregress

    x, y = log_pairs(run)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(linregress(x, y).rvalue)


def final_threshold(run: Run) -> float:
    """The threshold of the last recorded step (inf when the clipper never clips by norm)."""
    if run.metrics.empty:
        return math.nan
    return float(run.metrics.threshold.iloc[-1])


def summarize(run: Run) -> dict[str, Any]:
    """One row of `dyn compare` (see COLUMNS)."""
    steps = run.steps
    n = len(steps)
    tail = steps.loss.iloc[-max(1, n // 20) :] if n else steps.loss
    step_size = run.metrics.step_size.to_numpy(dtype=float)
    mean = float(np.mean(step_size)) if len(step_size) else math.nan
    cv = float(np.std(step_size) / mean) if len(step_size) and mean > 0 else math.nan
    si_sdri = run.eval["si_sdri"] if "si_sdri" in run.eval.columns else None
    return {
        "run": run.name,
        "steps": int(steps.step.iloc[-1]) if n else 0,
        "final_loss": float(tail.mean()) if n else math.nan,
        "step_size_mean": mean,
        "step_size_cv": cv,
        "r_value": r_value(run),
        "clipped_fraction": float(steps.clipped.mean()) if n else math.nan,
        "final_threshold": final_threshold(run),
        "final_si_sdri": float(si_sdri.iloc[-1]) if si_sdri is not None and len(si_sdri) else math.nan,
    }


def json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
