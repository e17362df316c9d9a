"""Runs that differ only in seed (an "arm"), and the band drawn for an arm's mean curve.

Arms are ``dynamics.stats.group_runs``'s, the grouping ``dyn compare --groups`` and the study use:
two runs are the same arm when their configs are equal after removing the keys that say which
copy a run is rather than what it is (seed, name, command, status, time, the number of steps done,
versions and paths; and in config["task"] the device, how often it checkpoints and whether it
records layers). Each group is the sequence of its runs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from dynamics import stats
from dynamics.run import Run
from dynamics.stats import Group, mean_intervals, run_seed
from figures import style

BAND = "95% CI"  # the t-interval of the mean over seeds, in legends


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped into arms, in order of first appearance (``dynamics.stats.group_runs``).

    Unlike ``dyn compare --groups``, two runs of one seed may share an arm here (a rerun drawn
    beside its original): the legend then counts runs, not seeds.
    """
    return stats.group_runs(runs, distinct_seeds=False)


def seed_of(run: Run) -> Any:
    """The run's seed: config["task"]["seed"], else config["seed"], else None."""
    return run_seed(run.config)


def arm_labels(groups: list[Group]) -> list[str]:
    """One legend label per arm: the paper's label for its clipper; arms that would share one get what tells
    them apart (the run name for a single run, the differing settings for several seeds), by
    ``dynamics.stats.arm_names``."""
    return stats.arm_names(groups, labels=[style.label(g[0]) for g in groups], run_names=True)


def seeds_note(group: list[Run]) -> str:
    """'3 seeds', or '3 runs' when the seeds are not all different (or not recorded)."""
    seeds = [seed_of(r) for r in group]
    distinct = None not in seeds and len({json.dumps(s, default=str) for s in seeds}) == len(seeds)
    return f"{len(group)} {'seeds' if distinct else 'runs'}"


def aligned(group: list[Run], column: str, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) with one row of values per run, on the steps every run recorded.

    Runs recorded on different grids are interpolated onto the first run's steps inside the
    range they all cover. Rows where the column is missing are NaN.
    """
    series = []
    for run in group:
        m = run.metrics
        values = m[column].to_numpy(dtype=float) if column in m.columns else np.full(len(m), np.nan)
        if transform is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = transform(values)
        series.append((m.step.to_numpy(), values))
    common = series[0][0]
    for steps, _ in series[1:]:
        common = np.intersect1d(common, steps, assume_unique=True)
    if len(common) >= 2 or all(len(s) <= 1 for s, _ in series):
        rows = [values[np.searchsorted(steps, common)] for steps, values in series]
        return common, np.vstack(rows)
    lo = max(steps[0] for steps, _ in series if len(steps))
    hi = min(steps[-1] for steps, _ in series if len(steps))
    grid = series[0][0][(series[0][0] >= lo) & (series[0][0] <= hi)]
    return grid, np.vstack([np.interp(grid, steps, values) for steps, values in series])


def draw_arm(ax, group: list[Run], column: str, color, label: str, transform=None, lw: float = 1.0) -> None:
    """One run: its curve, as Fig. 1 always drew it. Several seeds: the mean curve (gid "mean") and
    the 95% t-interval of the mean as a band (gid "band")."""
    if len(group) == 1:
        m = group[0].metrics
        if column not in m.columns:
            return
        values = m[column].to_numpy(dtype=float)
        if transform is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                values = transform(values)
        ax.plot(m.step, values, color=color, lw=lw, label=label)
        return
    steps, values = aligned(group, column, transform)
    if not len(steps):  # no common range: each seed on its own
        for i, run in enumerate(group):
            draw_arm(ax, [run], column, color, label if i == 0 else "_nolegend_", transform, lw)
        return
    mean, low, high = mean_intervals(values)
    ax.fill_between(steps, low, high, color=color, alpha=0.25, linewidth=0, gid="band")
    ax.plot(steps, mean, color=color, lw=lw, label=f"{label} ({seeds_note(group)}: mean, {BAND})", gid="mean")


def final_log_threshold(run: Run) -> float:
    """log of the last finite, positive threshold the run recorded (NaN if none)."""
    t = run.metrics.threshold.to_numpy(dtype=float)
    ok = np.flatnonzero(np.isfinite(t) & (t > 0))
    return math.log(t[ok[-1]]) if len(ok) else math.nan
