"""What went wrong in a run, found in its tables: ``diagnose(run) -> list[Finding]``.

Each finding has a kind, the first and last step it covers, a value and one sentence of meaning.
The rules (thresholds are the module's constants, documented in docs/analysis.md):

- ``loss_spike`` / ``grad_norm_explosion`` (every-step table): a step whose value stands above both
  its neighbourhoods, the median of the ``SPIKE_HALF_WIDTH`` steps before it and of those after it, by
  at least ``SPIKE_Z`` robust standard deviations (1.4826 x the rolling median absolute deviation) and
  by a factor of at least ``LOSS_SPIKE_FACTOR`` (loss) or ``GRAD_EXPLOSION_FACTOR`` (gradient norm).
  Positive series are compared in logs. Comparing with both sides makes a trend, rising or falling,
  no spike; the median makes a spike not hide the next. Consecutive flagged steps are one finding.
- ``non_finite``: steps whose loss or gradient norm is NaN or infinite, consecutive ones merged.
- ``clip_saturation``: the clip rate over a window of ``saturation_window(n)`` steps (5% of the run,
  100 to 1000) at or above 0.9; for AutoClip with percentile p, at or above max(0.9, 1 - p / 200),
  halfway between the rate it clips at by design, 1 - p / 100, and every step. The finding runs from
  the first clipped step of the flagged windows to the last.
- ``autoclip_never_clips``: AutoClip with p < 100 clipped none of the steps after the first 10%
  (at least ``NEVER_CLIPS_MIN_STEPS`` of them): it acts as no clipping.
- ``edge_of_stability`` (SGD only): sharpness above ``dynamics.analysis.edge_of_stability``.
- ``dead_parameter``: a parameter tensor whose gradient norm is zero on every record (at least 2).
- ``step_size_collapse``: the step size (rolling median of ``COLLAPSE_SMOOTHING`` records) falls to at
  most ``COLLAPSE_FACTOR`` (1e-4) of its largest value so far while the gradient norm, over the same
  span, falls by less than a factor ``1 / COLLAPSE_GRADIENT_FACTOR`` (100): the update vanished while
  the gradient did not, so training stopped short of a minimum. Held for at least 3 records and 5%
  of them (a schedule's last steps are no collapse).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dynamics.analysis import edge_of_stability, learning_rate
from dynamics.errors import DynamicsError
from dynamics.stats import never_clips
from dynamics.summary import format_number

SPIKE_HALF_WIDTH = 50  # steps on each side of a step: its neighbourhoods
SPIKE_MIN_SIDE = 10  # a step is judged once each side has this many finite values
SPIKE_Z = 6.0  # robust standard deviations above both neighbourhoods
LOSS_SPIKE_FACTOR = 1.25  # and at least this factor above them (positive losses)
GRAD_EXPLOSION_FACTOR = 3.0  # the same for the gradient norm
MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation of a normal
SATURATION_RATE = 0.9
NEVER_CLIPS_WARMUP = 0.1  # AutoClip's first 10% of steps are its warm-up
NEVER_CLIPS_MIN_STEPS = 100
COLLAPSE_FACTOR = 1e-4
COLLAPSE_GRADIENT_FACTOR = 1e-2
COLLAPSE_SMOOTHING = 5  # records
COLLAPSE_MIN_FRACTION = 0.05
MIN_DEAD_RECORDS = 2


@dataclass(frozen=True)
class Finding:
    """One thing that went wrong, over steps first_step..last_step: ``value`` as its kind defines it
    (see docs/analysis.md) and ``message``, one sentence saying what it means."""

    kind: str
    first_step: int
    last_step: int
    value: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = self.value if math.isfinite(self.value) else None
        return out


def _runs_of(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) row index of each stretch of consecutive True values."""
    flags = np.asarray(flags, dtype=bool)
    if not flags.any():
        return []
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(zip(starts.tolist(), ends.tolist()))


def _fmt(value: float) -> str:
    return format_number(float(value), 3)


def _side_medians(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The median of the SPIKE_HALF_WIDTH finite values before each row, and of those after it (NaN where
    a side has fewer than SPIKE_MIN_SIDE)."""
    import pandas as pd

    series = pd.Series(u)
    roll = {"window": SPIKE_HALF_WIDTH, "min_periods": SPIKE_MIN_SIDE}
    before = series.rolling(**roll).median().shift(1).to_numpy()
    after = series[::-1].rolling(**roll).median().shift(1).to_numpy()[::-1]
    return before, after


def _robust_sd(u: np.ndarray) -> np.ndarray:
    """MAD_TO_SD x the rolling median of |u - its centred rolling median| over 2 SPIKE_HALF_WIDTH + 1 rows."""
    import pandas as pd

    roll = {"window": 2 * SPIKE_HALF_WIDTH + 1, "min_periods": SPIKE_MIN_SIDE, "center": True}
    median = pd.Series(u).rolling(**roll).median()
    return MAD_TO_SD * (pd.Series(u) - median).abs().rolling(**roll).median().to_numpy()


def _spikes(step: np.ndarray, values: np.ndarray, kind: str, factor: float, noun: str) -> list[Finding]:
    finite = np.isfinite(values)
    if finite.sum() < 2 * SPIKE_MIN_SIDE + 1:
        return []
    positive = bool(np.all(values[finite] > 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(finite, np.log(np.where(finite & (values > 0), values, 1.0)) if positive else values, np.nan)
    before, after = _side_medians(u)
    level = np.fmax(before, after)  # NaN only where both sides are
    sd = _robust_sd(u)
    with np.errstate(invalid="ignore"):
        excess = u - level
        flagged = finite & ~np.isnan(before) & ~np.isnan(after) & (excess >= SPIKE_Z * sd)
        flagged &= (excess >= math.log(factor)) if positive else (excess > 0)
    out = []
    for first, last in _runs_of(flagged):
        peak = first + int(np.argmax(u[first : last + 1]))
        ref = math.exp(level[peak]) if positive else level[peak]
        z = excess[peak] / sd[peak] if sd[peak] > 0 else math.inf
        times = f"{values[peak] / ref:.3g}x " if positive and ref > 0 else ""
        span = f"step {step[first]}" if first == last else f"steps {step[first]}-{step[last]}"
        out.append(
            Finding(
                kind,
                int(step[first]),
                int(step[last]),
                float(values[peak]),
                f"The {noun} jumped to {_fmt(values[peak])} at {span}, {times}the level of the steps around it "
                f"({_fmt(ref)}) and {_fmt(z)} robust standard deviations above it.",
            )
        )
    return out


def _non_finite(step: np.ndarray, loss: np.ndarray, grad: np.ndarray) -> list[Finding]:
    def recorded(v):  # a column that is NaN on every row was not recorded (say, no loss given)
        return v if np.isfinite(v).any() or np.isinf(v).any() else np.zeros(len(v))

    bad = ~np.isfinite(recorded(loss)) | ~np.isfinite(recorded(grad))
    out = []
    for first, last in _runs_of(bad):
        count = last - first + 1
        what = "loss or gradient norm" if count > 1 else ("loss" if not np.isfinite(loss[first]) else "gradient norm")
        out.append(
            Finding(
                "non_finite",
                int(step[first]),
                int(step[last]),
                float(count),
                f"{count} consecutive step{'s' if count > 1 else ''} from step {step[first]} had a non-finite {what} "
                "(NaN or inf): an overflow or a division by zero; the clipper's nonfinite policy decides whether "
                "such a step is applied.",
            )
        )
    return out


def saturation_window(n: int) -> int:
    """Steps per window of the rolling clip rate: 5% of the run, between 100 and 1000."""
    return int(min(1000, max(100, n // 20)))


def _autoclip_p(clipper: dict[str, Any]) -> float | None:
    if clipper.get("kind") != "AutoClip":
        return None
    try:
        return float(clipper.get("p"))
    except (TypeError, ValueError):
        return None


def _clipping(step: np.ndarray, steps, clipper: Any) -> list[Finding]:
    if never_clips(clipper) or "clipped" not in steps.columns:
        return []
    clipped = steps.clipped.to_numpy(dtype=bool)
    n = len(clipped)
    p = _autoclip_p(clipper)
    out = []
    window = saturation_window(n)
    if n >= window:
        # AutoClip clips 1 - p/100 of the steps by design: saturated halfway from there to every step
        limit = SATURATION_RATE if p is None else max(SATURATION_RATE, 1.0 - p / 200.0)
        rate = np.convolve(clipped.astype(float), np.ones(window), "valid") / window  # rate[i]: rows i..i+w-1
        starts = np.flatnonzero(rate >= limit - 1e-12)
        covered = np.zeros(n + 1)
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + window, -1)
        for first, last in _runs_of(np.cumsum(covered)[:n] > 0):
            peak = float(rate[first : max(first + 1, last - window + 2)].max())
            inside = first + np.flatnonzero(clipped[first : last + 1])  # from its first clipped step to its last
            first, last = int(inside[0]), int(inside[-1])
            why = (
                "the threshold is too low: clipping acts as a smaller learning rate"
                if p is None
                else f"more than the {1 - p / 100:.0%} its percentile p={p:g} implies: gradient norms rose faster "
                "than its threshold (a percentile of all norms so far) followed, so nearly every step is cut to the "
                "threshold and has a near-fixed length"
            )
            out.append(
                Finding(
                    "clip_saturation",
                    int(step[first]),
                    int(step[last]),
                    peak,
                    f"Steps {step[first]}-{step[last]} were clipped at a rate of up to {peak:.0%} over {window} "
                    f"steps (at least {limit:.3g} flags it), {why}.",
                )
            )
    if p is not None:
        start = int(math.ceil(NEVER_CLIPS_WARMUP * n))
        after = slice(start, None)
        if n - start >= NEVER_CLIPS_MIN_STEPS and not clipped[after].any():
            g = steps.grad_norm.to_numpy(dtype=float)[after]
            t = steps.threshold.to_numpy(dtype=float)[after]
            ok = np.isfinite(g) & np.isfinite(t) & (t > 0)
            closest = float(np.max(g[ok] / t[ok])) if ok.any() else math.nan
            out.append(
                Finding(
                    "autoclip_never_clips",
                    int(step[start]),
                    int(step[-1]),
                    closest,
                    f"AutoClip (p={p:g}) clipped none of the {n - start} steps after its warm-up "
                    f"(the largest gradient norm reached {_fmt(closest)} of the threshold): it acts as no "
                    "clipping, as when gradient norms only fall; a larger window or a lower p makes it bind.",
                )
            )
    return out


def _learning_rate(run) -> np.ndarray:
    """One learning rate per metrics row."""
    lr = learning_rate(run)
    return lr if isinstance(lr, np.ndarray) else np.full(len(run.metrics), lr)


def _edge_of_stability(run) -> list[Finding]:
    m = run.metrics
    optimizer = run.config.get("optimizer")
    if "sharpness" not in m.columns or m.empty:
        return []
    lr = _learning_rate(run)
    edge = edge_of_stability(optimizer, lr)
    if edge is None:
        return []
    sharp = m.sharpness.to_numpy(dtype=float)
    step = m.step.to_numpy()
    with np.errstate(invalid="ignore"):
        above = np.isfinite(sharp) & np.isfinite(edge) & (sharp > edge)
    out = []
    for first, last in _runs_of(above):
        ratio = sharp[first : last + 1] / edge[first : last + 1]
        peak = first + int(np.argmax(ratio))
        span = f"record at step {step[first]}" if first == last else f"records at steps {step[first]}-{step[last]}"
        out.append(
            Finding(
                "edge_of_stability",
                int(step[first]),
                int(step[last]),
                float(ratio.max()),
                f"The sharpness reached {_fmt(sharp[peak])}, {ratio.max():.3g}x the edge of stability "
                f"{_fmt(edge[peak])} of this SGD (lr {_fmt(lr[peak])}), on the {span}: "
                "gradient descent is unstable along the top Hessian direction there, so the loss oscillates "
                "or the run sits at the edge of stability.",
            )
        )
    return out


def _dead_parameters(run) -> list[Finding]:
    layers = run.layers
    if layers is None or layers.empty or "grad_norm" not in layers.columns or "name" not in layers.columns:
        return []
    frame = layers[["step", "name", "grad_norm"]]
    frame = frame[np.isfinite(frame.grad_norm.to_numpy(dtype=float))]
    per = frame.groupby("name", sort=False).agg(
        zero=("grad_norm", lambda v: bool((v == 0).all())),
        records=("grad_norm", "size"),
        first=("step", "min"),
        last=("step", "max"),
    )
    dead = per[per.zero & (per.records >= MIN_DEAD_RECORDS)]
    return [
        Finding(
            "dead_parameter",
            int(row.first),
            int(row.last),
            float(row.records),
            f"Parameter tensor '{name}' had a zero gradient on all {row.records} records: it never learns "
            "(not used in the forward pass, cut from the graph, or behind units that never activate).",
        )
        for name, row in dead.iterrows()
    ]


def _step_size_collapse(run) -> list[Finding]:
    import pandas as pd

    m = run.metrics
    if "step_size" not in m.columns or "grad_norm" not in m.columns or len(m) < 3:
        return []
    s = m.step_size.to_numpy(dtype=float)
    g = m.grad_norm.to_numpy(dtype=float)
    ok = np.isfinite(s) & np.isfinite(g)
    if ok.sum() < 3:
        return []
    step = m.step.to_numpy()[ok]
    roll = {"window": COLLAPSE_SMOOTHING, "min_periods": 1, "center": True}
    ms = pd.Series(s[ok]).rolling(**roll).median().to_numpy()
    mg = pd.Series(g[ok]).rolling(**roll).median().to_numpy()
    peak = np.maximum.accumulate(ms)
    at_peak = np.maximum.accumulate(np.where(ms == peak, np.arange(len(ms)), 0))  # the record of the peak so far
    with np.errstate(divide="ignore", invalid="ignore"):
        collapsed = (ms <= COLLAPSE_FACTOR * peak) & (mg >= COLLAPSE_GRADIENT_FACTOR * mg[at_peak])
    least = max(3, int(math.ceil(COLLAPSE_MIN_FRACTION * len(ms))))
    lr = _learning_rate(run)[ok]
    out = []
    for first, last in _runs_of(collapsed):
        if last - first + 1 < least:
            continue
        ref = peak[last]
        ratio = float(ms[first : last + 1].min() / ref) if ref > 0 else 0.0
        lr_fell = np.isfinite(lr[[at_peak[last], last]]).all() and lr[last] <= 10 * COLLAPSE_FACTOR * lr[at_peak[last]]
        cause = (
            "the learning rate fell with it (a schedule at ~0?)"
            if lr_fell
            else "the learning rate did not, so the clipper or the optimizer shrank the steps"
        )
        if ref > 0:
            what = (
                f"The step size fell to {ratio:.2g} of its peak ({_fmt(ref)} at step {step[at_peak[last]]}) on "
                f"steps {step[first]}-{step[last]} while the gradient norm stayed within 100x of its value then: "
                f"training stalled short of a minimum; {cause}."
            )
        else:
            what = f"The step size was zero on every record up to step {step[last]}: the parameters never moved."
        out.append(Finding("step_size_collapse", int(step[first]), int(step[last]), ratio, what))
    return out


def diagnose(run) -> list[Finding]:
    """The findings of a loaded run (``dynamics.load_run``), ordered by first step then kind.

    Needs the every-step table (``run.steps`` with step, loss, grad_norm; threshold and clipped for the
    clipping findings); the metrics and layers tables add the edge of stability, step-size collapse and
    dead parameters where they hold the columns. Raises DynamicsError when the run has no steps table.

    Example::

        from dynamics import load_run
        from dynamics.diagnose import diagnose

        for finding in diagnose(load_run("runs/demo/autoclip-p10")):
            print(finding.kind, finding.first_step, finding.last_step, finding.message)
    """
    steps = run.steps
    if steps is None or steps.empty:
        raise DynamicsError(
            f"{run.path}: no every-step table (steps.parquet, or its rows in the journal while running): "
            "diagnose needs the loss and gradient norm of every step"
        )
    missing = [c for c in ("step", "loss", "grad_norm") if c not in steps.columns]
    if missing:
        raise DynamicsError(f"{run.path}: the every-step table has no column {', '.join(missing)}")
    step = steps.step.to_numpy()
    loss = steps.loss.to_numpy(dtype=float)
    grad = steps.grad_norm.to_numpy(dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        findings = [
            *_spikes(step, loss, "loss_spike", LOSS_SPIKE_FACTOR, "loss"),
            *_spikes(step, grad, "grad_norm_explosion", GRAD_EXPLOSION_FACTOR, "gradient norm"),
            *_non_finite(step, loss, grad),
            *_clipping(step, steps, run.config.get("clipper")),
            *_edge_of_stability(run),
            *_dead_parameters(run),
            *_step_size_collapse(run),
        ]
    return sorted(findings, key=lambda f: (f.first_step, f.kind))
