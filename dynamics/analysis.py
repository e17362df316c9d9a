"""Analysis beyond Fig. 1: relaxed smoothness, what clipping did to the steps, and the edge of stability.

- ``relaxed_smoothness(grad_norm, smoothness, q=0.5)``: the (L0, L1) of Zhang, He, Sra and Jadbabaie
  (ICLR 2020), L <= L0 + L1 * ||g||, fitted by quantile regression of the recorded smoothness on the
  gradient norm with L0, L1 >= 0, and 95% intervals from the moving-block bootstrap that ``dyn compare``
  uses for r.
- ``clipping_summary(steps)``: clip rate, mean clip coefficient of the clipped steps and the mean scale
  clipping put on the learning rate, over the whole run and its last 10% of steps.
- ``edge_of_stability(optimizer, lr)``: the largest sharpness at which (heavy-ball) gradient descent
  is stable, 2 (1 + beta) / lr; None for adaptive optimizers, where no such line applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamics.errors import DynamicsError
from dynamics.stats import DEFAULT_LEVEL, MIN_RESAMPLES, moving_block_counts, optimal_block_length

MIN_ROWS = 10  # fewer finite (gradient norm, smoothness) pairs: no fit
# Resamples for the (L0, L1) intervals: the library's minimum for a 95% percentile interval; each is an
# exact fit (a few sorts of the rows), so more cost time in every `dyn compare` for little change.
RELAXED_RESAMPLES = MIN_RESAMPLES
LAST_FRACTION = 0.1  # the "_last10" columns: the last 10% of steps

# ----------------------------------------------------------------------------------------------
# relaxed smoothness


@dataclass(frozen=True)
class RelaxedSmoothness:
    """L <= L0 + L1 * ||g||: the q-th conditional quantile of smoothness as a line in the gradient norm.

    ``l0_ci`` and ``l1_ci`` are percentile intervals of the moving-block bootstrap (``level``, seeded;
    ``block`` rows per block, ``n_resamples`` resamples); NaN when not computed (``n_resamples=0``).
    ``n``: the finite pairs fitted. ``reason`` says why l0 and l1 are NaN, when they are.
    """

    l0: float
    l1: float
    l0_ci: tuple[float, float]
    l1_ci: tuple[float, float]
    n: int
    q: float
    block: int | None = None
    n_resamples: int = 0
    level: float = DEFAULT_LEVEL
    reason: str | None = None

    def curve(self, log_grad_norm) -> np.ndarray:
        """log(L0 + L1 e^x) at x = log(gradient norm): the fitted line in Fig. 1's log-log axes
        (NaN where L0 + L1 e^x is not positive)."""
        x = np.asarray(log_grad_norm, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            value = self.l0 + self.l1 * np.exp(x)
            return np.where(value > 0, np.log(np.where(value > 0, value, 1.0)), np.nan)


def quantile_line(x, y, q: float, weights=None) -> tuple[float, float]:
    """(a, b) >= 0 minimizing sum_i w_i rho_q(y_i - a - b x_i): quantile regression's linear program,
    solved by scipy's HiGHS.

    The primal LP (a, b and each row's residual parts u_i, v_i >= 0 with a + b x_i + u_i - v_i = y_i,
    minimizing sum_i w_i (q u_i + (1 - q) v_i)) is solved through its dual, which has one variable per
    row in a box and two constraints: maximize sum_i y_i d_i subject to -(1 - q) w_i <= d_i <= q w_i,
    sum_i d_i <= 0 (the dual of a >= 0) and sum_i x_i d_i <= 0 (of b >= 0). a and b are the multipliers
    of those two constraints. Raises DynamicsError if HiGHS reports no optimum.
    """
    from scipy.optimize import linprog

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=float)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    bounds = np.column_stack([-(1.0 - q) * w, q * w])
    res = linprog(-y, A_ub=np.vstack([np.ones(len(x)), x]), b_ub=[0.0, 0.0], bounds=bounds, method="highs")
    if res.status != 0:
        raise DynamicsError(f"the quantile regression found no optimum: {res.message}")
    a, b = (-float(m) for m in res.ineqlin.marginals)
    return max(a, 0.0), max(b, 0.0)


A0, B0 = -1, -2  # the boundary lines a = 0 and b = 0 of the (a, b) plane; j >= 0: the line of data point j


class _VertexDescent:
    """Weighted quantile regression with a, b >= 0, exact and fast enough for a thousand resamples.

    The objective F(a, b) is convex and piecewise linear; its pieces meet on the lines a + b x_j = y_j
    (one per data point) and the feasible set is bounded by a = 0 and b = 0. Along any such line F is a
    weighted quantile problem in one variable, solved exactly by one sort, and its minimum lies where
    the line meets another one. Moving to that vertex and minimizing along the other line through it
    decreases F at each move; when neither line through a vertex decreases F, no direction does (F is
    linear on each of the cones the two lines cut), so the vertex is optimal. This is the descent of
    Wesolowsky (1981) for least absolute deviations, with asymmetric weights and the two bounds.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, q: float, max_moves: int = 60):
        self.x, self.y, self.q, self.max_moves = x, y, q, max_moves

    def _line(self, line: int) -> tuple[float, float, float, float, float, float, int, int]:
        """(pa, pb, da, db, t_lo, t_hi, line at t_lo, line at t_hi): points (pa + t da, pb + t db) for t in
        [t_lo, t_hi] are the line's feasible part."""
        if line == A0:
            return 0.0, 0.0, 0.0, 1.0, 0.0, math.inf, B0, B0
        if line == B0:
            return 0.0, 0.0, 1.0, 0.0, 0.0, math.inf, A0, A0
        xj, yj = self.x[line], self.y[line]  # a = yj - xj t, b = t; xj >= 0 (a gradient norm)
        if xj > 0:
            return yj, 0.0, -xj, 1.0, 0.0, yj / xj, B0, A0
        return yj, 0.0, -xj, 1.0, 0.0, (math.inf if yj >= 0 else -math.inf), B0, B0

    def _search(self, line: int, rows: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray):
        """The minimum of F along ``line`` over the rows ``rows`` (values x, y, weights w): (a, b, the other
        line through that point), or None if the line has no feasible point or F does not vary along it.

        Along the line, row i's residual is r_i - t c_i = c_i (s_i - t): a check loss in t with weight
        w_i |c_i| and quantile q (c_i > 0) or 1 - q (c_i < 0), minimized at the weighted quantile of s
        where the cumulative weight first reaches sum_i w_i |c_i| tau_i.
        """
        pa, pb, da, db, lo, hi, at_lo, at_hi = self._line(line)
        if lo > hi:
            return None
        c = da + db * x if line != B0 else np.ones_like(x)
        moving = c != 0
        if not moving.all():
            if not moving.any():
                return None
            c, x, y, w, rows = c[moving], x[moving], y[moving], w[moving], rows[moving]
        s = (y - pa - pb * x) / c
        weight = w * np.abs(c)
        order = np.argsort(s)
        cum = np.cumsum(weight[order])
        target = self.q * cum[-1] + (1.0 - 2.0 * self.q) * float(weight @ (c < 0))
        k = min(int(np.searchsorted(cum, target)), len(s) - 1)
        t, other = float(s[order[k]]), int(rows[order[k]])
        if t <= lo:
            t, other = lo, at_lo
        elif t >= hi:
            t, other = hi, at_hi
        return pa + t * da, pb + t * db, other

    def _loss(self, x: np.ndarray, y: np.ndarray, w: np.ndarray, a: float, b: float) -> float:
        u = y - a - b * x  # sum w rho_q(u) = q sum w u - sum_{u < 0} w u
        return self.q * float(w @ u) - float(w @ np.minimum(u, 0.0))

    def vertex(self, first: int, second: int) -> tuple[float, float] | None:
        """Where two lines meet, if they do in one point."""
        pa, pb, da, db, *_ = self._line(first)
        qa, qb, ea, eb, *_ = self._line(second)
        det = da * (-eb) - db * (-ea)
        if det == 0:
            return None
        t = ((qa - pa) * (-eb) - (qb - pb) * (-ea)) / det
        return pa + t * da, pb + t * db

    def fit(self, w: np.ndarray, start: tuple[int, int] = (B0, A0)) -> tuple[float, float] | None:
        """The minimum of F with row weights ``w``, from the vertex where the lines ``start`` meet; None if
        the descent did not settle within ``max_moves`` moves (the caller then asks the LP)."""
        rows = np.flatnonzero(w > 0)
        x, y, wr = self.x[rows], self.y[rows], w[rows]
        point = self.vertex(*start)
        if point is None or point[0] < 0 or point[1] < 0:
            start, point = (B0, A0), (0.0, 0.0)
        a, b = point
        best = self._loss(x, y, wr, a, b)
        tol = 1e-12 * max(abs(best), 1.0)
        current, other = start
        stale = 0  # lines through the current vertex along which F is known not to decrease
        for _ in range(self.max_moves):
            found = self._search(current, rows, x, y, wr)
            if found is not None:
                na, nb, nxt = found
                value = self._loss(x, y, wr, na, nb)
                if value < best - tol:
                    a, b, best = na, nb, value
                    current, other, stale = nxt, current, 1
                    continue
            stale += 1
            if stale >= 2:
                return a, b
            current, other = other, current
        return None

    def lines_through(self, a: float, b: float, tol: float = 1e-9) -> tuple[int, int]:
        """Two lines through (a, b) (the LP's vertex), for a warm start; (B0, A0) if two are not found."""
        lines = [line for line, on in ((A0, abs(a) <= tol), (B0, abs(b) <= tol)) if on]
        residual = np.abs(self.y - a - b * self.x)
        for j in np.argsort(residual)[:2]:
            if residual[j] <= tol * max(1.0, abs(self.y[j])):
                lines.append(int(j))
        return (lines[0], lines[1]) if len(lines) >= 2 else (B0, A0)


def _check_q(q: Any) -> float:
    from dynamics.checks import finite_float

    q = finite_float("q", q)
    if not 0.0 < q < 1.0:
        raise DynamicsError(f"q={q!r}: give a quantile strictly between 0 and 1 (0.5 fits the median)")
    return q


def _nan_fit(n: int, q: float, reason: str, level: float) -> RelaxedSmoothness:
    nan2 = (math.nan, math.nan)
    return RelaxedSmoothness(math.nan, math.nan, nan2, nan2, n, q, None, 0, level, reason)


def qr_block_length(x: np.ndarray, y: np.ndarray, a: float, b: float, q: float) -> int:
    """The bootstrap block length for (L0, L1): Politis-White on the fit's score series.

    The estimate's variance is the long-run variance of the scores psi_i (1, x_i), psi_i = q - [r_i < 0]
    at the fitted line; the longer of the two components' lengths keeps the dependence of both.
    """
    psi = q - (y - a - b * x < 0)
    return max(optimal_block_length(psi), optimal_block_length(psi * x))


def relaxed_smoothness(
    grad_norm,
    smoothness,
    q: float = 0.5,
    n_resamples: int = RELAXED_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    block: int | None = None,
) -> RelaxedSmoothness:
    """Fit L0, L1 >= 0 of the relaxed smoothness condition L <= L0 + L1 * ||g|| (Zhang et al., ICLR 2020).

    Quantile regression of ``smoothness`` on ``grad_norm`` (paired rows; rows where either is not finite
    are left out): the line L0 + L1 g that is the ``q``-th conditional quantile (q=0.5: the median),
    through scipy's linear programming (HiGHS). Intervals: percentile intervals of a moving-block
    bootstrap of the rows (the resampling ``dyn compare`` uses for r; blocks of ``block`` rows, by
    default Politis and White's length for the fit's scores), ``n_resamples`` resamples seeded with
    ``seed``; ``n_resamples=0`` skips them. Each resample is fitted exactly (``_VertexDescent``).

    Fewer than 10 finite pairs, or gradient norms that are all equal: l0 and l1 are NaN and ``reason``
    says why. Raises DynamicsError for q outside (0, 1), rows of unequal length, negative gradient norms.

    Example::

        from dynamics import load_run
        from dynamics.analysis import relaxed_smoothness

        run = load_run("runs/demo/autoclip-p10")
        fit = relaxed_smoothness(run.metrics.grad_norm, run.metrics.smoothness)
        print(fit.l0, fit.l0_ci, fit.l1, fit.l1_ci)
    """
    q = _check_q(q)
    if not 0.0 < level < 1.0:
        raise DynamicsError(f"level={level!r}: give a confidence level between 0 and 1, e.g. 0.95")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise DynamicsError(f"n_resamples={n_resamples!r}: give a whole number (0 for no interval)")
    if 0 < n_resamples < MIN_RESAMPLES or n_resamples < 0:
        raise DynamicsError(f"n_resamples={n_resamples}: use 0 (no interval) or at least {MIN_RESAMPLES}")
    try:
        g = np.asarray(grad_norm, dtype=float).ravel()
        s = np.asarray(smoothness, dtype=float).ravel()
    except (TypeError, ValueError) as e:
        raise DynamicsError(f"grad_norm and smoothness must be numbers: {e}") from None
    if len(g) != len(s):
        raise DynamicsError(f"grad_norm has {len(g)} rows and smoothness {len(s)}: give paired rows")
    keep = np.isfinite(g) & np.isfinite(s)
    g, s = g[keep], s[keep]
    if (g < 0).any():
        raise DynamicsError("grad_norm has negative values: a norm is >= 0 (is it the right column?)")
    n = len(g)
    if n < MIN_ROWS:
        return _nan_fit(n, q, f"{n} finite (gradient norm, smoothness) pairs; the fit needs at least {MIN_ROWS}", level)
    if np.ptp(g) == 0:
        return _nan_fit(n, q, f"every gradient norm is {g[0]:g}: L0 and L1 cannot be told apart", level)
    # one scale for each axis: the LP and the descent work on numbers near 1 (L0, L1 >= 0 is kept)
    sx = float(np.mean(g))
    sy = float(np.mean(np.abs(s))) or 1.0
    x, y = g / sx, s / sy
    a, b = quantile_line(x, y, q)
    l0, l1 = a * sy, b * sy / sx
    if n_resamples == 0:
        return RelaxedSmoothness(l0, l1, (math.nan, math.nan), (math.nan, math.nan), n, q, None, 0, level)
    if block is None:
        block = qr_block_length(x, y, a, b, q)
    if int(block) != block or not 1 <= block:
        raise DynamicsError(f"block={block!r}: give a whole number of rows, at least 1")
    block = int(min(block, n))
    descent = _VertexDescent(x, y, q)
    start = descent.lines_through(a, b)
    fits = np.empty((n_resamples, 2))
    i = 0
    for counts in moving_block_counts(n, block, n_resamples, seed):
        for w in counts.astype(float):
            fit = descent.fit(w, start)
            fits[i] = fit if fit is not None else quantile_line(x, y, q, w)
            i += 1
    alpha = (1.0 - level) / 2.0
    (l0_lo, l1_lo), (l0_hi, l1_hi) = np.quantile(fits, [alpha, 1.0 - alpha], axis=0)
    return RelaxedSmoothness(
        l0,
        l1,
        (float(l0_lo * sy), float(l0_hi * sy)),
        (float(l1_lo * sy / sx), float(l1_hi * sy / sx)),
        n,
        q,
        block,
        n_resamples,
        level,
    )


# ----------------------------------------------------------------------------------------------
# what clipping did


CLIPPING_COLUMNS = (
    "clip_rate",
    "clip_rate_last10",
    "mean_clip_coef",
    "mean_clip_coef_last10",
    "lr_scale",
    "lr_scale_last10",
)


def clip_scale(grad_norm, threshold, clipped) -> np.ndarray:
    """Per step, the factor h = min(1, threshold / ||g||) clipping multiplied the gradient (and so the
    learning rate of SGD) by; NaN where it is not defined: a non-finite gradient norm, a missing
    threshold, or a step clipped without a norm threshold (clipping by value)."""
    g = np.asarray(grad_norm, dtype=float)
    t = np.asarray(threshold, dtype=float)
    c = np.asarray(clipped, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.minimum(1.0, np.where(g > 0, t / np.where(g > 0, g, 1.0), 1.0))
    undefined = ~np.isfinite(g) | np.isnan(t) | (c & ~np.isfinite(t))
    return np.where(undefined, np.nan, h)


def _clip_stats(h: np.ndarray, clipped: np.ndarray) -> tuple[float, float, float]:
    n = len(clipped)
    rate = float(np.mean(clipped)) if n else math.nan
    by_value = bool((clipped & np.isnan(h)).any())
    defined = h[~np.isnan(h)]
    scale = float(np.mean(defined)) if len(defined) and not by_value else math.nan
    coefs = h[clipped & ~np.isnan(h)]
    coef = float(np.mean(coefs)) if len(coefs) and not by_value else math.nan
    return rate, coef, scale


def clipping_summary(steps) -> dict[str, float]:
    """What clipping did, from the every-step table (columns grad_norm, threshold, clipped).

    - ``clip_rate``: the fraction of steps clipped.
    - ``mean_clip_coef``: the mean of h = threshold / ||g|| over the clipped steps (how far clipping
      shrank a clipped step; NaN when no step was clipped).
    - ``lr_scale``: the mean of h = min(1, threshold / ||g||) over all steps with a finite gradient norm:
      the mean factor clipping put on the step, so that lr * lr_scale is SGD's mean effective learning
      rate (h is the paper's h_c of eq. 3).

    Each also for the last 10% of steps (``_last10``, at least one step). Steps with a non-finite
    gradient norm are left out of the means of h. A run that clipped some step without a norm threshold
    (clipping by value, threshold inf) has no h: mean_clip_coef and lr_scale are NaN.
    """
    n = len(steps)
    if n == 0:
        return dict.fromkeys(CLIPPING_COLUMNS, math.nan)
    clipped = steps.clipped.to_numpy(dtype=bool)
    h = clip_scale(steps.grad_norm.to_numpy(dtype=float), steps.threshold.to_numpy(dtype=float), clipped)
    tail = max(1, int(n * LAST_FRACTION))
    out = {}
    for suffix, part in (("", slice(None)), ("_last10", slice(n - tail, None))):
        rate, coef, scale = _clip_stats(h[part], clipped[part])
        out[f"clip_rate{suffix}"], out[f"mean_clip_coef{suffix}"], out[f"lr_scale{suffix}"] = rate, coef, scale
    return {k: out[k] for k in CLIPPING_COLUMNS}


# ----------------------------------------------------------------------------------------------
# the edge of stability


ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")


def sgd_edge_factor(optimizer: dict[str, Any] | None) -> tuple[float, float] | None:
    """(c, wd) such that torch.optim.SGD, as recorded in config["optimizer"], is stable on a quadratic
    while its sharpness stays below c / lr − wd; None for any other optimizer.

    Plain gradient descent: c = 2 (Cohen et al. 2021). Heavy-ball momentum beta with dampening d:
    2 (1 + beta) / (1 - d). Nesterov: 2 (1 + beta) / (1 + 2 beta). Weight decay wd adds wd to every
    eigenvalue, so the edge for the loss's own sharpness is lower by wd.
    """
    if not isinstance(optimizer, dict) or optimizer.get("kind") != "SGD":
        return None

    def number(key: str, default: float) -> float:
        try:
            value = float(optimizer.get(key, default) or default)
        except (TypeError, ValueError):
            return default
        return value if math.isfinite(value) else default

    beta, dampening, decay = number("momentum", 0.0), number("dampening", 0.0), number("weight_decay", 0.0)
    if optimizer.get("nesterov"):
        return 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta), decay
    return (2.0 * (1.0 + beta) / (1.0 - dampening) if dampening < 1.0 else math.inf), decay


def learning_rate(run) -> np.ndarray | float:
    """The run's learning rate: the metrics lr column where recorded (an array, one per row), else
    config["optimizer"]["lr"] (a float); NaN if neither."""
    m = run.metrics
    if "lr" in m.columns:
        lr = m.lr.to_numpy(dtype=float)
        if np.isfinite(lr).any():
            return lr
    try:
        return float((run.config.get("optimizer") or {}).get("lr"))
    except (TypeError, ValueError):
        return math.nan


def edge_of_stability(optimizer: dict[str, Any] | None, lr) -> float | np.ndarray | None:
    """The largest sharpness (top Hessian eigenvalue) at which the optimizer is stable on a quadratic,
    c / lr − wd with ``sgd_edge_factor``, for torch.optim.SGD as recorded in config["optimizer"]; None for
    any other optimizer (for Adam and the other adaptive ones the analogue concerns the preconditioned
    sharpness: no line applies). ``lr``: a number or an array (one per record); NaN where lr is not positive.
    """
    edge_factor = sgd_edge_factor(optimizer)
    if edge_factor is None:
        return None
    factor, decay = edge_factor
    lr = np.asarray(lr, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        edge = np.where(lr > 0, factor / np.where(lr > 0, lr, 1.0) - decay, np.nan)
    return float(edge) if edge.ndim == 0 else edge
