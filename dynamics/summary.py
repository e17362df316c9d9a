"""The numbers that say what a run did: one row per run for `dyn compare` and `dyn info`, and one
row per arm (runs that differ only in seed) with intervals over seeds."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from dynamics.analysis import (
    CLIPPING_COLUMNS,
    RELAXED_RESAMPLES,
    RelaxedSmoothness,
    clipping_summary,
    relaxed_smoothness,
)
from dynamics.run import Run
from dynamics.stats import (
    DEFAULT_RESAMPLES,
    block_bootstrap_r,
    difference_interval,
    group_runs,
    mean_interval,
    r_block_length,
)

# A run's row: these, then final_<column> for every column of its eval table (final_si_sdri for the built-in task).
COLUMNS = (
    "run",
    "steps",
    "final_loss",
    "step_size_mean",
    "step_size_cv",
    "r_value",
    "r_ci_low",
    "r_ci_high",
    "l0",
    "l1",
    "l0_ci_low",
    "l0_ci_high",
    "l1_ci_low",
    "l1_ci_high",
    "clipped_fraction",
    *CLIPPING_COLUMNS,
    "final_threshold",
)
# Per-run interval bounds are not averaged over seeds: an arm's interval is the one over seeds.
NOT_GROUPED = ("run", "r_ci_low", "r_ci_high", "l0_ci_low", "l0_ci_high", "l1_ci_low", "l1_ci_high")
MISSING = "-"  # how a number that is not there (NaN) is written


def format_number(value: Any, digits: int = 4) -> str:
    """The one way numbers are written for people: ``digits`` significant digits, "-" for NaN or None,
    "inf" and "-inf"; anything that is not a float as ``str``."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def format_interval(mean: Any, low: Any, high: Any, digits: int = 4) -> str:
    """ "mean [low, high]", or the mean alone where there is no interval (low is NaN or None)."""
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return format_number(mean, digits)
    return f"{format_number(mean, digits)} [{format_number(low, digits)}, {format_number(high, digits)}]"


def _columns(run: Run, *names: str) -> list[np.ndarray]:
    """The metrics columns as float arrays; empty ones for a run that did not record a column."""
    m = run.metrics
    return [m[c].to_numpy(dtype=float) if c in m.columns else np.empty(0) for c in names]


def log_pairs(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Natural logs of (grad_norm, smoothness) over the recorded rows where both are positive and finite."""
    g, s = _columns(run, "grad_norm", "smoothness")
    if len(g) != len(s):
        return np.empty(0), np.empty(0)
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    return np.log(g[keep]), np.log(s[keep])


def relaxed_fit(run: Run, n_resamples: int = RELAXED_RESAMPLES) -> RelaxedSmoothness:
    """L0, L1 of smoothness <= L0 + L1 * grad_norm over the run's recorded rows (median quantile
    regression, moving-block bootstrap intervals; see dynamics.analysis.relaxed_smoothness)."""
    g, s = _columns(run, "grad_norm", "smoothness")
    if len(g) != len(s):
        g, s = np.empty(0), np.empty(0)
    return relaxed_smoothness(g, s, n_resamples=n_resamples)


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


def r_interval(run: Run, n_resamples: int = DEFAULT_RESAMPLES) -> tuple[float, float, int]:
    """The 95% moving-block bootstrap interval of r_value (seeded): (low, high, block length in rows)."""
    x, y = log_pairs(run)
    _, low, high, block = block_bootstrap_r(x, y, n_resamples=n_resamples)
    return low, high, block


def r_block(run: Run) -> int:
    """The bootstrap block length (rows) r_interval uses for this run."""
    return r_block_length(*log_pairs(run))


def final_eval(run: Run) -> dict[str, float]:
    """final_<column> for every numeric column of the eval table: its value at the last evaluation."""
    out = {}
    frame = run.eval
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column])
        if column == "step" or not numeric:
            continue
        out[f"final_{column}"] = float(frame[column].iloc[-1]) if len(frame) else math.nan
    return out


# columns a summary reads; a run recorded elsewhere (save_run) may lack some: they count as not measured
_METRICS_READ = ("step_size", "grad_norm", "smoothness", "threshold")
_STEPS_READ = ("loss", "grad_norm", "threshold")


def _complete(run: Run) -> Run:
    """``run`` with every column a summary reads: a missing one is NaN (never clipped, for ``clipped``)."""
    metrics = run.metrics.assign(**{c: math.nan for c in _METRICS_READ if c not in run.metrics.columns})
    steps = run.steps.assign(**{c: math.nan for c in _STEPS_READ if c not in run.steps.columns})
    if "clipped" not in steps.columns:
        steps = steps.assign(clipped=False)
    return dataclasses.replace(run, metrics=metrics, steps=steps)


def summarize(run: Run) -> dict[str, Any]:
    """One row of `dyn compare`: COLUMNS, then final_<column> for each other eval column."""
    run = _complete(run)
    steps = run.steps
    n = len(steps)
    tail = steps.loss.iloc[-max(1, n // 20) :] if n else steps.loss
    step_size = run.metrics.step_size.to_numpy(dtype=float)
    mean = float(np.mean(step_size)) if len(step_size) else math.nan
    cv = float(np.std(step_size) / mean) if len(step_size) and mean > 0 else math.nan
    low, high, _ = r_interval(run)
    fit = relaxed_fit(run)
    finals = final_eval(run)
    row = {
        "run": run.name,
        "steps": int(steps.step.iloc[-1]) if n else 0,
        "final_loss": float(tail.mean()) if n else math.nan,
        "step_size_mean": mean,
        "step_size_cv": cv,
        "r_value": r_value(run),
        "r_ci_low": low,
        "r_ci_high": high,
        "l0": fit.l0,
        "l1": fit.l1,
        "l0_ci_low": fit.l0_ci[0],
        "l0_ci_high": fit.l0_ci[1],
        "l1_ci_low": fit.l1_ci[0],
        "l1_ci_high": fit.l1_ci[1],
        "clipped_fraction": float(steps.clipped.mean()) if n else math.nan,
        **clipping_summary(steps),
        "final_threshold": final_threshold(run),
    }
    if "final_si_sdri" in finals:  # the built-in task's headline first
        row["final_si_sdri"] = finals.pop("final_si_sdri")
    row.update(finals)  # the task's evaluation columns, only where the run has them
    return row


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """COLUMNS, then every other key of the rows in order of first appearance (eval columns)."""
    return list(dict.fromkeys([*COLUMNS, *(k for row in rows for k in row)]))


def fill_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the union of their columns, NaN where a run lacks one (say, another task's eval)."""
    columns = columns_of(rows)
    return [{c: row.get(c, math.nan) for c in columns} for row in rows]


def summarize_groups(runs, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per arm (see dynamics.stats.group_runs): name, n_seeds, and <column>_mean,
    <column>_ci_low, <column>_ci_high (95% Student t over seeds) for each numeric column.

    With exactly two arms A and B, a third row named "A - B" holds mean(A) - mean(B) with
    Welch's interval (its n_seeds is None). ``rows``: the runs' summaries, if already computed.
    """
    runs = list(runs)
    if rows is None:
        rows = [summarize(r) for r in runs]
    rows = fill_columns(rows)
    by_run = {id(run): row for run, row in zip(runs, rows)}
    columns = [c for c in columns_of(rows) if c not in NOT_GROUPED]
    groups = group_runs(runs)
    values = [{c: [by_run[id(r)][c] for r in g.runs] for c in columns} for g in groups]
    out = []
    for g, v in zip(groups, values):
        entry: dict[str, Any] = {"name": g.name, "n_seeds": g.n_seeds}
        for c in columns:
            entry[f"{c}_mean"], entry[f"{c}_ci_low"], entry[f"{c}_ci_high"] = mean_interval(v[c])
        out.append(entry)
    if len(groups) == 2:
        entry = {"name": f"{groups[0].name} - {groups[1].name}", "n_seeds": None}
        for c in columns:
            entry[f"{c}_mean"], entry[f"{c}_ci_low"], entry[f"{c}_ci_high"] = difference_interval(
                values[0][c], values[1][c]
            )
        out.append(entry)
    return out


def json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
