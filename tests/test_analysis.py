"""Analysis beyond Fig. 1 (dynamics.analysis), against independent oracles.

- Relaxed smoothness: the fit against an exact enumeration of the candidate vertices (a quantile
  regression line with L0, L1 >= 0 passes through two data points, or one and a bound, or the
  origin) and against the primal LP (a different formulation, scipy's HiGHS); its bootstrap
  interval against the moving-block bootstrap written the long way (row indices, each resample
  fitted by enumeration); data drawn from known L0, L1 give them back.
- The clipping summary against numbers worked out by hand on a small steps table.
- The edge of stability against the spectral radius of (heavy-ball / Nesterov) gradient descent on
  a quadratic, computed here from the iteration matrix.
- Fig. 1 draws log(L0 + L1 e^x) with the fitted numbers.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import sparse  # noqa: E402
from scipy.optimize import linprog  # noqa: E402
from scipy.signal import lfilter  # noqa: E402

from dynamics.analysis import (  # noqa: E402
    CLIPPING_COLUMNS,
    clipping_summary,
    edge_of_stability,
    relaxed_smoothness,
)
from dynamics.errors import DynamicsError  # noqa: E402
from dynamics.stats import moving_block_counts  # noqa: E402

# ----------------------------------------------------------------------------------------------
# oracles


def check_loss(x, y, a, b, q):
    u = np.asarray(y) - a - b * np.asarray(x)
    return float(np.sum(u * (q - (u < 0))))


def enumerated_fit(x, y, q):
    """The exact minimum of the check loss over a, b >= 0 by enumerating the vertices where an LP optimum
    lies: lines through two points, through one point with a = 0 or b = 0, and the origin."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), 1)
    ok = x[i] != x[j]
    b = (y[j][ok] - y[i][ok]) / (x[j][ok] - x[i][ok])
    a = y[i][ok] - b * x[i][ok]
    candidates = [np.zeros((1, 2)), np.column_stack([a, b])]
    candidates.append(np.column_stack([y, np.zeros_like(y)]))  # b = 0 through a point
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates.append(np.column_stack([np.zeros_like(y), y / x]))  # a = 0 through a point
    c = np.vstack(candidates)
    c = c[np.all(np.isfinite(c), axis=1) & (c[:, 0] >= 0) & (c[:, 1] >= 0)]
    u = y[None, :] - c[:, :1] - c[:, 1:] * x[None, :]
    losses = np.sum(u * (q - (u < 0)), axis=1)
    k = int(np.argmin(losses))
    return c[k, 0], c[k, 1], losses[k]


def primal_lp_fit(x, y, q):
    """Quantile regression's primal LP: variables a, b, u_i, v_i >= 0, a + b x_i + u_i - v_i = y_i."""
    n = len(x)
    eye = sparse.identity(n, format="csc")
    a_eq = sparse.hstack([sparse.csc_matrix(np.column_stack([np.ones(n), x])), eye, -eye], format="csc")
    cost = np.concatenate([[0.0, 0.0], np.full(n, q), np.full(n, 1.0 - q)])
    res = linprog(cost, A_eq=a_eq, b_eq=y, bounds=(0, None), method="highs")
    assert res.status == 0
    return res.x[0], res.x[1]


def relaxed_data(n, l0, l1, seed, sigma=0.3, phi=0.5):
    """Gradient norms log-normal AR(1); smoothness (l0 + l1 g) exp(sigma e) with e an AR(1) of unit
    variance, so its conditional median is exactly l0 + l1 g."""
    rng = np.random.default_rng(seed)
    e = lfilter([1.0], [1.0, -phi], rng.standard_normal((n + 100, 2)), axis=0)[100:] * math.sqrt(1 - phi**2)
    g = np.exp(0.7 * e[:, 0])
    return g, (l0 + l1 * g) * np.exp(sigma * e[:, 1])


# ----------------------------------------------------------------------------------------------
# the fit


@pytest.mark.parametrize("q", [0.5, 0.1, 0.9])
@pytest.mark.parametrize(
    "l0, l1",
    [(0.5, 2.0), (-0.8, 1.0), (3.0, -0.2)],  # interior; L0 bound at 0; L1 bound at 0
)
def test_fit_equals_the_enumerated_optimum(q, l0, l1):
    rng = np.random.default_rng(int(100 * q) + int(10 * l0))
    x = np.exp(rng.normal(size=41))
    y = l0 + l1 * x + 0.4 * rng.standard_t(3, size=41)
    fit = relaxed_smoothness(x, y, q=q, n_resamples=0)
    a, b, best = enumerated_fit(x, y, q)
    assert check_loss(x, y, fit.l0, fit.l1, q) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert (fit.l0, fit.l1) == pytest.approx((a, b), rel=1e-6, abs=1e-9)
    assert fit.l0 >= 0 and fit.l1 >= 0 and fit.n == 41 and fit.q == q
    if q == 0.5 and l0 < 0:
        assert fit.l0 == 0.0  # the median line would cross below zero: the bound holds the fit
    if q == 0.5 and l1 < 0:
        assert fit.l1 == 0.0


def test_fit_equals_the_primal_lp_on_realistic_scales():
    g, s = relaxed_data(801, 3e2, 5e4, seed=3)  # smoothness in the thousands, gradient norms near 1
    g *= 1e-3
    fit = relaxed_smoothness(g, s, n_resamples=0)
    a, b = primal_lp_fit(g, s, 0.5)
    assert check_loss(g, s, fit.l0, fit.l1, 0.5) == pytest.approx(check_loss(g, s, a, b, 0.5), rel=1e-9)
    assert (fit.l0, fit.l1) == pytest.approx((a, b), rel=1e-6)


def test_known_l0_l1_are_recovered_inside_their_intervals():
    g, s = relaxed_data(2000, 0.5, 2.0, seed=11)
    fit = relaxed_smoothness(g, s, n_resamples=1000)
    assert fit.l0 == pytest.approx(0.5, rel=0.2) and fit.l1 == pytest.approx(2.0, rel=0.1)
    assert fit.l0_ci[0] < 0.5 < fit.l0_ci[1] and fit.l1_ci[0] < 2.0 < fit.l1_ci[1]
    assert fit.l0_ci[1] - fit.l0_ci[0] < 0.25 and fit.l1_ci[1] - fit.l1_ci[0] < 0.3  # informative intervals
    assert fit.l0_ci[0] < fit.l0 < fit.l0_ci[1] and fit.l1_ci[0] < fit.l1 < fit.l1_ci[1]
    assert fit.block >= 1 and fit.n_resamples == 1000 and fit.reason is None
    # seeded: the same numbers again
    assert relaxed_smoothness(g, s, n_resamples=1000) == fit


def test_bootstrap_interval_equals_the_naive_moving_block_bootstrap():
    """Resamples of ceil(n / block) whole blocks at seeded uniform starts, cut to n rows, each fitted by
    enumeration; the 2.5% and 97.5% quantiles of the fits."""
    g, s = relaxed_data(37, 0.5, 2.0, seed=5, sigma=0.5)
    n, block, resamples, seed = len(g), 4, 1000, 7
    fit = relaxed_smoothness(g, s, n_resamples=resamples, block=block, seed=seed)
    k, m = -(-n // block), n - block + 1
    starts = np.random.default_rng(seed).integers(0, m, size=(resamples, k))
    fits = []
    for st in starts:
        idx = (st[:, None] + np.arange(block)).ravel()[:n]
        a, b, _ = enumerated_fit(g[idx], s[idx], 0.5)
        fits.append((a, b))
    low, high = np.quantile(np.array(fits), [0.025, 0.975], axis=0)
    assert fit.block == block
    assert fit.l0_ci == pytest.approx((low[0], high[0]), rel=1e-7, abs=1e-10)
    assert fit.l1_ci == pytest.approx((low[1], high[1]), rel=1e-7, abs=1e-10)


def test_block_counts_are_the_index_resampling():
    n, block = 23, 5
    counts = np.vstack(list(moving_block_counts(n, block, 30, seed=2, chunk=7)))
    starts = np.random.default_rng(2).integers(0, n - block + 1, size=(30, -(-n // block)))
    for row, st in zip(counts, starts):
        idx = (st[:, None] + np.arange(block)).ravel()[:n]
        assert np.array_equal(row, np.bincount(idx, minlength=n))
    assert np.all(counts.sum(axis=1) == n)


def test_rows_that_are_not_finite_are_left_out():
    g, s = relaxed_data(60, 0.5, 2.0, seed=8)
    dirty_g, dirty_s = g.copy(), s.copy()
    dirty_g[[3, 9]] = [np.nan, np.inf]
    dirty_s[[20, 40]] = [np.nan, -np.inf]
    keep = np.ones(60, bool)
    keep[[3, 9, 20, 40]] = False
    dirty = relaxed_smoothness(dirty_g, dirty_s, n_resamples=0)
    clean = relaxed_smoothness(g[keep], s[keep], n_resamples=0)
    assert (dirty.l0, dirty.l1, dirty.n) == (clean.l0, clean.l1, 56)


@pytest.mark.parametrize(
    "g, s, reason",
    [
        (np.arange(1.0, 10.0), np.arange(9.0), "at least 10"),
        (np.full(30, 2.5), np.arange(30.0), "every gradient norm is 2.5"),
        (np.r_[np.arange(1.0, 6.0), np.full(20, np.nan)], np.arange(25.0), "5 finite"),
    ],
)
def test_too_little_or_degenerate_data_is_nan_with_a_reason(g, s, reason):
    fit = relaxed_smoothness(g, s)
    assert math.isnan(fit.l0) and math.isnan(fit.l1)
    assert all(math.isnan(v) for v in (*fit.l0_ci, *fit.l1_ci))
    assert reason in fit.reason


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_q_outside_the_open_unit_interval_is_refused(q):
    with pytest.raises(DynamicsError, match=r"strictly between 0 and 1|finite"):
        relaxed_smoothness(np.arange(1.0, 21.0), np.arange(20.0), q=q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grad_norm": [1.0, 2.0], "smoothness": [1.0]}, "paired rows"),
        ({"grad_norm": -np.arange(20.0), "smoothness": np.arange(20.0)}, "negative"),
        ({"grad_norm": np.arange(20.0), "smoothness": np.arange(20.0), "n_resamples": 500}, "at least 1000"),
        ({"grad_norm": ["a"] * 20, "smoothness": np.arange(20.0)}, "must be numbers"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(DynamicsError, match=message):
        relaxed_smoothness(**kwargs)


def test_curve_is_log_of_the_line():
    g, s = relaxed_data(101, 0.5, 2.0, seed=1)
    fit = relaxed_smoothness(g, s, n_resamples=0)
    x = np.linspace(-3, 3, 7)
    np.testing.assert_allclose(fit.curve(x), np.log(fit.l0 + fit.l1 * np.exp(x)), rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# clipping summary


def test_clipping_summary_by_hand():
    # 10 steps; h = min(1, threshold / grad_norm) worked out in the comments; the last 10% is step 9
    steps = pd.DataFrame(
        {
            "step": np.arange(10),
            "grad_norm": [1.0, 4.0, 2.0, 0.5, 8.0, np.nan, 3.0, 1.0, 0.0, 5.0],
            "threshold": [2.0, 2.0, 2.0, 1.0, 2.0, np.inf, 1.5, np.inf, 2.0, 1.0],
            "clipped": [False, True, False, False, True, False, True, False, False, True],
        }
    )
    # h: 1, 0.5, 1, 1, 0.25, (non-finite norm: left out), 0.5, 1, 1 (zero gradient), 0.2
    out = clipping_summary(steps)
    assert list(out) == list(CLIPPING_COLUMNS)
    assert out["clip_rate"] == pytest.approx(4 / 10)
    assert out["mean_clip_coef"] == pytest.approx((0.5 + 0.25 + 0.5 + 0.2) / 4)
    assert out["lr_scale"] == pytest.approx((1 + 0.5 + 1 + 1 + 0.25 + 0.5 + 1 + 1 + 0.2) / 9)
    assert out["clip_rate_last10"] == 1.0
    assert out["mean_clip_coef_last10"] == pytest.approx(0.2) and out["lr_scale_last10"] == pytest.approx(0.2)


def test_clipping_by_value_has_no_norm_scale_and_no_clipping_has_scale_one():
    by_value = pd.DataFrame(
        {"step": [0, 1, 2], "grad_norm": [1.0, 2.0, 3.0], "threshold": [np.inf] * 3, "clipped": [False, True, True]}
    )
    out = clipping_summary(by_value)
    assert out["clip_rate"] == pytest.approx(2 / 3)
    assert math.isnan(out["mean_clip_coef"]) and math.isnan(out["lr_scale"])
    none = by_value.assign(clipped=False)
    out = clipping_summary(none)
    assert out["clip_rate"] == 0 and out["lr_scale"] == 1.0 and math.isnan(out["mean_clip_coef"])
    empty = clipping_summary(by_value.iloc[:0])
    assert all(math.isnan(v) for v in empty.values())


# ----------------------------------------------------------------------------------------------
# edge of stability


def spectral_edge(lr, beta, nesterov=False, dampening=0.0):
    """The largest curvature lam at which torch's SGD on f = lam theta^2 / 2 is stable: the spectral radius
    of its iteration matrix on (theta, momentum buffer) stays <= 1; found by bisection."""

    def radius(lam):
        # buffer' = beta buffer + (1 - d) lam theta; theta' = theta - lr (lam theta + beta buffer') if nesterov
        # else theta - lr buffer'
        b_theta, b_buf = (1 - dampening) * lam, beta
        if nesterov:
            t_theta, t_buf = 1 - lr * lam - lr * beta * b_theta, -lr * beta * b_buf
        else:
            t_theta, t_buf = 1 - lr * b_theta, -lr * b_buf
        return max(abs(np.linalg.eigvals(np.array([[t_theta, t_buf], [b_theta, b_buf]]))))

    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if radius(mid) <= 1 + 1e-12 else (lo, mid)
    return lo


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.0},
        {"momentum": 0.9},
        {"momentum": 0.5, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True},
    ],
)
def test_edge_of_stability_is_where_sgd_turns_unstable(settings):
    lr = 0.05
    expected = spectral_edge(lr, settings["momentum"], settings.get("nesterov", False), settings.get("dampening", 0))
    assert edge_of_stability({"kind": "SGD", "lr": lr, **settings}, lr) == pytest.approx(expected, rel=1e-6)


def test_edge_of_stability_weight_decay_per_record_lr_and_adaptive():
    edge = edge_of_stability({"kind": "SGD", "momentum": 0.9, "weight_decay": 0.01}, np.array([0.1, 0.0, 0.2]))
    np.testing.assert_allclose(edge[[0, 2]], [2 * 1.9 / 0.1 - 0.01, 2 * 1.9 / 0.2 - 0.01])
    assert math.isnan(edge[1])
    for kind in ("Adam", "AdamW", "RMSprop", "LBFGS"):
        assert edge_of_stability({"kind": kind, "lr": 0.1}, 0.1) is None
    assert edge_of_stability(None, 0.1) is None


# ----------------------------------------------------------------------------------------------
# Fig. 1's fitted curve


def test_fig1_draws_the_fitted_curve(tmp_path):
    import matplotlib.pyplot as plt

    from dynamics.run import load_run, save_run
    from figures.fig1 import fig1

    g, s = relaxed_data(200, 0.5, 2.0, seed=2)
    s[5] = -1.0  # finite: in the fit, not in the logged hexbin
    step = np.arange(200) * 10
    metrics = pd.DataFrame(
        {
            "step": step,
            "loss": np.exp(-step / 1000.0),
            "grad_norm": g,
            "threshold": np.full(200, np.inf),
            "clipped": np.zeros(200, bool),
            "step_size": np.full(200, 1e-3),
            "smoothness": s,
        }
    )
    run = load_run(save_run(tmp_path / "r", {"clipper": {"kind": "NoClip"}}, metrics=metrics))
    expected = relaxed_smoothness(g, s, n_resamples=0)
    fig = fig1([run])
    try:
        (ax,) = fig.hexbin_axes
        (line,) = [line for line in ax.lines if line.get_gid() == "relaxed_smoothness"]
        x = np.asarray(line.get_xdata())
        np.testing.assert_allclose(line.get_ydata(), np.log(expected.l0 + expected.l1 * np.exp(x)), rtol=1e-12)
        assert x.min() == pytest.approx(ax.get_xlim()[0]) and x.max() == pytest.approx(ax.get_xlim()[1])
        (text,) = [t.get_text() for t in ax.texts if t.get_gid() == "relaxed_smoothness"]
        assert f"L0 = {expected.l0:.3g}" in text and f"L1 = {expected.l1:.3g}" in text
        assert ax.get_legend() is None  # the legend holds only a threshold line, and NoClip has none
    finally:
        plt.close(fig)
