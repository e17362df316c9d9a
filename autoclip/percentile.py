"""An exact running percentile: numpy.percentile(history, p) in O(log n) per update.

Two heaps split the history at the order statistics that numpy's linear interpolation
reads: ``lower`` (a max-heap, stored negated) holds the k + 1 smallest values and
``upper`` (a min-heap) the rest, where k = floor((n - 1) * p / 100). The percentile is
then read off the two heap tops with numpy's own interpolation arithmetic, so the
result is bit-identical to ``numpy.percentile``, not merely close.

A moving window removes the oldest value by lazy deletion: its value is marked in the
heap that holds it and dropped once it reaches that heap's top. Stale entries are
bounded by rebuilding from the window when they outnumber the live ones.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections import deque
from collections.abc import Iterable


def check_p(p: object) -> float:
    """``p`` as a float, or a clear error unless it is a number in [0, 100]."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a number in [0, 100], got {type(p).__name__} {p!r}")
    if not 0.0 <= p <= 100.0:  # also rejects NaN
        raise ValueError(f"p must be in [0, 100] (a percentile; 100 means no clipping), got {p}")
    return float(p)


def check_window(window: object) -> int | None:
    """``window`` as an int or None, or a clear error unless it is a positive integer or None."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(
            f"window must be a positive integer (how many recent norms to keep) or None, "
            f"got {type(window).__name__} {window!r}"
        )
    if window < 1:
        raise ValueError(f"window must be a positive integer or None (keep every norm), got {window}")
    return int(window)


class RunningPercentile:
    """The p-th percentile of every value added so far (or of the last ``window``).

    Example::

        rp = RunningPercentile(p=10.0)
        for x in [3.0, 1.0, 2.0]:
            rp.add(x)
        rp.value()  # == numpy.percentile([3.0, 1.0, 2.0], 10.0) == 1.2
    """

    def __init__(self, p: float, window: int | None = None, values: Iterable[float] = ()):
        self.p = check_p(p)
        self.window = check_window(window)
        self._q = self.p / 100.0  # numpy.percentile divides by 100 the same way
        self._recent: deque[float] | None = deque() if window is not None else None
        self.load(values)

    # -- state ---------------------------------------------------------------------------

    def load(self, values: Iterable[float]) -> None:
        """Replace the history by ``values`` (oldest first; a window keeps the last ones)."""
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("RunningPercentile holds finite values only; the values to load contain NaN or inf")
        if self.window is not None:
            values = values[-self.window :]
            self._recent = deque(values)
        self._rebuild(values)

    def values(self) -> list[float]:
        """The remembered values: oldest first with a window, in no set order without."""
        if self._recent is not None:
            return list(self._recent)
        return [-v for v in self._lower] + list(self._upper)

    def __len__(self) -> int:
        return self._n_lower + self._n_upper

    def _rebuild(self, values: list[float]) -> None:
        ordered = sorted(values)
        split = self._target(len(ordered))
        # a descending run of negatives is a valid min-heap, an ascending run too
        self._lower = [-v for v in reversed(ordered[:split])]
        self._upper = ordered[split:]
        self._n_lower, self._n_upper = split, len(ordered) - split
        self._gone_lower: dict[float, int] = {}
        self._gone_upper: dict[float, int] = {}

    # -- updates -------------------------------------------------------------------------

    def add(self, x: float) -> None:
        """Append one finite value; with a window, forget the oldest once the window is full."""
        x = float(x)
        if not math.isfinite(x):
            # NaN has no order and would silently corrupt the heaps
            raise ValueError(f"RunningPercentile holds finite values only, got {x}")
        if self._n_lower and x <= -self._lower[0]:
            heapq.heappush(self._lower, -x)
            self._n_lower += 1
        else:
            heapq.heappush(self._upper, x)
            self._n_upper += 1
        if self._recent is not None:
            self._recent.append(x)
            if len(self._recent) > self.window:
                self._remove(self._recent.popleft())
        self._rebalance()

    def _remove(self, x: float) -> None:
        # Every live value of lower is <= the lower top <= every value of upper, so the
        # comparison names a heap that holds a live copy of x.
        if x <= -self._lower[0]:
            self._gone_lower[x] = self._gone_lower.get(x, 0) + 1
            self._n_lower -= 1
            self._prune(self._lower, self._gone_lower, -1.0)
        else:
            self._gone_upper[x] = self._gone_upper.get(x, 0) + 1
            self._n_upper -= 1
            self._prune(self._upper, self._gone_upper, 1.0)
        if len(self._lower) + len(self._upper) > 2 * len(self) + 16:
            self._rebuild(list(self._recent))

    @staticmethod
    def _prune(heap: list[float], gone: dict[float, int], sign: float) -> None:
        while heap:
            x = sign * heap[0]
            count = gone.get(x)
            if not count:
                return
            heapq.heappop(heap)
            if count == 1:
                del gone[x]
            else:
                gone[x] = count - 1

    def _target(self, n: int) -> int:
        """How many of the smallest values ``lower`` holds: k + 1, k = floor((n - 1) q)."""
        if n == 0:
            return 0
        return min(int((n - 1) * self._q), n - 1) + 1

    def _rebalance(self) -> None:
        target = self._target(len(self))
        while self._n_lower > target:
            x = -heapq.heappop(self._lower)
            self._n_lower -= 1
            self._prune(self._lower, self._gone_lower, -1.0)
            heapq.heappush(self._upper, x)
            self._n_upper += 1
        while self._n_lower < target:
            x = heapq.heappop(self._upper)
            self._n_upper -= 1
            self._prune(self._upper, self._gone_upper, 1.0)
            heapq.heappush(self._lower, -x)
            self._n_lower += 1

    # -- query ---------------------------------------------------------------------------

    def value(self) -> float:
        """numpy.percentile(values, p) with the default linear method; inf when empty."""
        n = len(self)
        if n == 0:
            return math.inf
        a = -self._lower[0]
        virtual = (n - 1) * self._q
        if virtual >= n - 1:
            return a
        b = self._upper[0]
        gamma = virtual - math.floor(virtual)
        # numpy's _lerp, operation for operation, so the result matches to the bit
        diff = b - a
        if gamma >= 0.5:
            return b - diff * (1 - gamma)
        return a + diff * gamma
