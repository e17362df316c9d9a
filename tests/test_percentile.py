"""RunningPercentile against numpy.percentile (default linear interpolation)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoclip import RunningPercentile

# Gradient norms are non-negative; a small value pool makes ties frequent.
norms = st.one_of(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
)
percentiles = st.one_of(
    st.sampled_from([0.0, 1.0, 10.0, 25.0, 50.0, 90.0, 99.9, 100.0]),
    st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
)


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b))


@settings(max_examples=300, deadline=None)
@given(st.lists(norms, min_size=1, max_size=200), percentiles)
def test_every_prefix_matches_numpy_percentile(history, p):
    rp = RunningPercentile(p)
    for n, x in enumerate(history, start=1):
        rp.add(x)
        assert _close(rp.value(), float(np.percentile(history[:n], p)))


@settings(max_examples=300, deadline=None)
@given(st.lists(norms, min_size=1, max_size=200), percentiles, st.integers(min_value=1, max_value=40))
def test_window_matches_numpy_percentile_of_last_w(history, p, window):
    rp = RunningPercentile(p, window=window)
    for n, x in enumerate(history, start=1):
        rp.add(x)
        assert len(rp) == min(n, window)
        assert _close(rp.value(), float(np.percentile(history[max(0, n - window) : n], p)))


@settings(max_examples=100, deadline=None)
@given(st.lists(norms, min_size=1, max_size=100), percentiles, st.none() | st.integers(1, 30))
def test_load_rebuilds_the_same_percentile(history, p, window):
    a = RunningPercentile(p, window=window)
    for x in history:
        a.add(x)
    b = RunningPercentile(p, window=window, values=a.values())
    assert b.value() == a.value()
    assert sorted(b.values()) == sorted(a.values())


def test_single_value_is_its_own_percentile_for_any_p():
    for p in (0.0, 3.7, 50.0, 100.0):
        rp = RunningPercentile(p)
        rp.add(2.5)
        assert rp.value() == 2.5


def test_p0_is_running_min_and_p100_running_max():
    rng = np.random.default_rng(0)
    xs = rng.lognormal(size=500)
    lo, hi = RunningPercentile(0.0), RunningPercentile(100.0)
    for n, x in enumerate(xs, start=1):
        lo.add(x)
        hi.add(x)
        assert lo.value() == xs[:n].min()
        assert hi.value() == xs[:n].max()


def test_long_random_history_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(1)
    xs = rng.lognormal(size=20_000)
    for p in (10.0, 37.5, 90.0):
        rp = RunningPercentile(p)
        for x in xs:
            rp.add(x)
        assert rp.value() == float(np.percentile(xs, p))


def test_window_memory_stays_bounded_with_lazy_deletion():
    # A monotone stream buries deleted values deep in one heap; rebuilds must bound them.
    rp = RunningPercentile(50.0, window=100)
    for x in range(100_000):
        rp.add(float(x % 1000))
    assert len(rp) == 100
    assert len(rp._lower) + len(rp._upper) <= 2 * 100 + 16 + 1
    assert rp.value() == float(np.percentile([float(x % 1000) for x in range(99_900, 100_000)], 50.0))


def test_empty_history_has_infinite_threshold():
    assert RunningPercentile(10.0).value() == math.inf


@pytest.mark.parametrize("p", [-0.1, 100.5, float("nan")])
def test_p_outside_0_100_is_rejected(p):
    with pytest.raises(ValueError, match="p must be in"):
        RunningPercentile(p)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        RunningPercentile(10.0, window=0)


@pytest.mark.parametrize("window", [2.5, True, "3"])
def test_window_must_be_an_integer(window):
    # 2.5 used to act as a window of 3 and True as 1, silently
    with pytest.raises(TypeError, match="window must be a positive integer"):
        RunningPercentile(10.0, window=window)


@pytest.mark.parametrize("p", [True, "50", None])
def test_p_must_be_a_number(p):
    with pytest.raises(TypeError, match="p must be a number"):
        RunningPercentile(p)
