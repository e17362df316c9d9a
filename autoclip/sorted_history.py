"""Exact running percentiles kept on the device: numpy.percentile of each history with no host read.

``SortedHistories`` holds G histories (one per parameter group) as the rows of a sorted float64
tensor on the parameters' device. Adding a norm and reading the percentile are a few tensor ops
whose sizes the host knows in advance, so the device is never waited for:

- Insert: a row padded with +inf after its values and led by a -inf column is sorted, and
  inserting x into it is one elementwise op over the row: new[i] = clamp(x, old[i - 1], old[i])
  (below x's place this is old[i], at it x, above it old[i - 1]). Inserting +inf changes
  nothing, so a norm that must not enter (non-finite, or zero: no gradient) is masked to +inf
  on the device instead of branching on the host. The op writes into a second buffer (an
  overlapping in-place shift is not allowed in torch) and the two swap.
- Window: a ring of the last W norms in arrival order names the oldest, which is removed from
  the sorted row as new[i] = old[i] if old[i] < y else old[i + 1] (removing +inf is a no-op).
- Percentile: numpy's linear interpolation between the order statistics k = floor((n - 1) q)
  and k + 1, read with gather, in numpy's own arithmetic (its _lerp), so the result is
  bit-identical to ``numpy.percentile`` in float64.

Each step costs O(L) elementwise work on the device, L being the columns that may hold values
(the number of steps with gradients so far, at most the window): a memmove's cost, not a sort.
Why not torch.searchsorted and torch.cat of slices: the insert position is a device value, and
slicing by it needs it on the host, a sync. searchsorted followed by an index comparison and
torch.where needs no sync but costs three passes where the clamp costs one (CPU, one thread,
float64, µs per insert: clamp 9 / 13 / 52 / 671 at 10^3 / 10^4 / 10^5 / 10^6 columns;
searchsorted + where 20 / 46 / 313 / 3046; cat of slices at a host index 15 / 17 / 39 / 630).
The buffers grow geometrically (doubling), so allocation is amortized O(1) per step; memory is
two float64 buffers of at most twice the history, plus the window's ring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from autoclip.percentile import check_p, check_window

_MIN_CAPACITY = 64


class SortedHistories:
    """G exact running percentiles (of all values pushed, or of the last ``window``) on one device.

    ``push(x, valid)`` and ``percentiles()`` never read the device; ``values``, ``load`` and
    ``counts`` do (they are for state dicts and inspection, not for the training step).

    Example::

        h = SortedHistories(groups=1, p=10.0, device="cpu")
        for x in [3.0, 1.0, 2.0]:
            h.push(torch.tensor([x], dtype=torch.float64))
        h.percentiles()  # tensor([1.2000]) == numpy.percentile([3.0, 1.0, 2.0], 10.0)
    """

    def __init__(self, groups: int, p: float, window: int | None = None, device: torch.device | str = "cpu"):
        self.groups = int(groups)
        self.p = check_p(p)
        self.window = check_window(window)
        self._q = self.p / 100.0  # numpy.percentile divides by 100 the same way
        self.device = torch.device(device)
        self.load([[] for _ in range(self.groups)])

    # -- the training step: no host read ---------------------------------------------------------

    @torch.no_grad()
    def push(self, x: Tensor, valid: Tensor | None = None) -> None:
        """Append ``x[g]`` (shape [G], taken as float64) to history g where ``valid[g]``; a window forgets its oldest.

        Entries that are not finite or not positive never enter, whatever ``valid`` says.
        """
        x = x.to(device=self.device, dtype=torch.float64)
        keep = (x > 0) & (x < math.inf)  # NaN fails both
        if valid is not None:
            keep &= valid
        entering = torch.where(keep, x, math.inf).unsqueeze(1)
        span = self._span + 1 if self.window is None else min(self._span + 1, self.window)
        if span > self._capacity:
            self._grow(span)
        if self.window is None:
            self._insert(entering, span, self._sorted, self._spare)
            self._sorted, self._spare = self._spare, self._sorted
            self._count += keep
        else:
            slot = torch.remainder(self._arrived, self.window).unsqueeze(1)
            oldest = self._ring.gather(1, slot)
            full = self._count == self.window
            if self._span >= self.window:  # otherwise no history can be full yet
                leaving = torch.where((keep & full).unsqueeze(1), oldest, math.inf)
                data = self._sorted[:, 1 : span + 1]
                torch.where(data < leaving, data, self._sorted[:, 2 : span + 2], out=self._spare[:, 1 : span + 1])
                self._insert(entering, span, self._spare, self._sorted)
            else:
                self._insert(entering, span, self._sorted, self._spare)
                self._sorted, self._spare = self._spare, self._sorted
            self._ring.scatter_(1, slot, torch.where(keep.unsqueeze(1), x.unsqueeze(1), oldest))
            self._arrived += keep
            self._count += keep & ~full
        self._span = span

    @staticmethod
    def _insert(entering: Tensor, span: int, source: Tensor, target: Tensor) -> None:
        # new[i] = clamp(x, old[i - 1], old[i]): column 0 of the buffers is -inf, so old[-1] exists
        torch.clamp(entering.expand(-1, span), source[:, 0:span], source[:, 1 : span + 1], out=target[:, 1 : span + 1])

    @torch.no_grad()
    def percentiles(self) -> Tensor:
        """numpy.percentile of each history (linear method), float64 of shape [G]; inf where empty."""
        n = self._count
        virtual = (n - 1).to(torch.float64) * self._q
        below = torch.floor(virtual)
        gamma = virtual - below
        # order statistics k and k + 1 (k = floor(virtual)), both at most n - 1, at columns + 1 (column 0
        # is -inf); an empty history reads columns 0 and 1 and is replaced by inf below
        index = torch.minimum(below.to(torch.int64).unsqueeze(1) + self._offsets, n.unsqueeze(1))
        pair = self._sorted.gather(1, index)
        a, b = pair[:, 0], pair[:, 1]
        # numpy's _lerp, a + (b - a) * gamma below gamma = 0.5 and b - (b - a) * (1 - gamma) from it,
        # written as base + (b - a) * t with base = b and t = gamma - 1 = -(1 - gamma) (exact for
        # gamma >= 0.5) from it: the same bits, in fewer ops. At the top order statistic a == b and
        # both forms give a, as numpy does.
        upper = gamma >= 0.5
        lerp = torch.where(upper, b, a) + (b - a) * torch.where(upper, gamma - 1, gamma)
        return torch.where(n > 0, lerp, math.inf)

    # -- state: these read the device ------------------------------------------------------------

    def counts(self) -> list[int]:
        """How many values each history holds."""
        return self._count.tolist()

    def values(self, group: int) -> list[float]:
        """History ``group``'s values: oldest first with a window, ascending without."""
        n = int(self._count[group])
        if self.window is None:
            return self._sorted[group, 1 : n + 1].tolist()
        arrived = int(self._arrived[group])
        slots = [(arrived - n + i) % self.window for i in range(n)]
        return self._ring[group, slots].tolist()

    def load(self, histories: Sequence[Iterable[float]]) -> None:
        """Replace every history by the given values (oldest first; a window keeps the last ones)."""
        rows = [[float(v) for v in values] for values in histories]
        if len(rows) != self.groups:
            raise ValueError(f"SortedHistories holds {self.groups} histories, got {len(rows)} to load")
        if not all(math.isfinite(v) for row in rows for v in row):
            raise ValueError("SortedHistories holds finite values only; the values to load contain NaN or inf")
        if self.window is not None:
            rows = [row[-self.window :] for row in rows]
        span = max(map(len, rows), default=0)
        self._span = 0
        self._capacity = 0
        self._sorted = self._spare = self._new_buffer(0)
        self._grow(span)
        self._span = span
        sorted_rows = torch.full((self.groups, span), math.inf, dtype=torch.float64)
        for g, row in enumerate(rows):
            sorted_rows[g, : len(row)] = torch.tensor(sorted(row), dtype=torch.float64)
        self._sorted[:, 1 : span + 1] = sorted_rows.to(self.device)
        self._count = torch.tensor([len(row) for row in rows], dtype=torch.int64, device=self.device)
        self._offsets = torch.tensor([[1, 2]], dtype=torch.int64, device=self.device)
        if self.window is not None:
            ring = torch.zeros((self.groups, self.window), dtype=torch.float64)
            for g, row in enumerate(rows):
                ring[g, : len(row)] = torch.tensor(row, dtype=torch.float64)
            self._ring = ring.to(self.device)
            self._arrived = self._count.clone()

    def load_row(self, group: int, values: Iterable[float]) -> None:
        """Replace history ``group`` only."""
        rows = [self.values(g) for g in range(self.groups)]
        rows[group] = list(values)
        self.load(rows)

    # -- buffers ---------------------------------------------------------------------------------

    def _new_buffer(self, capacity: int) -> Tensor:
        """[G, capacity + 2] of +inf with column 0 at -inf: the sentinels the insert and removal read."""
        buffer = torch.full((self.groups, capacity + 2), math.inf, dtype=torch.float64, device=self.device)
        buffer[:, 0] = -math.inf
        return buffer

    def _grow(self, needed: int) -> None:
        """Room for ``needed`` columns, doubling (amortized O(1) allocation per step), at most the window."""
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, _MIN_CAPACITY)
        if self.window is not None:
            capacity = min(capacity, self.window)
        keep = self._span + 1
        grown, spare = self._new_buffer(capacity), self._new_buffer(capacity)
        grown[:, :keep] = self._sorted[:, :keep]
        self._sorted, self._spare, self._capacity = grown, spare, capacity


class HistoryView:
    """One row of a ``SortedHistories``, with ``RunningPercentile``'s reading interface.

    ``values()``, ``value()``, ``len()`` and ``load()`` read or write the device (a transfer);
    the training step does not use them.
    """

    def __init__(self, store: SortedHistories, group: int):
        self._store = store
        self._group = group

    @property
    def p(self) -> float:
        return self._store.p

    @property
    def window(self) -> int | None:
        return self._store.window

    def values(self) -> list[float]:
        """The remembered values: oldest first with a window, ascending without."""
        return self._store.values(self._group)

    def value(self) -> float:
        """numpy.percentile(values, p); inf when empty."""
        return self._store.percentiles()[self._group].item()

    def load(self, values: Iterable[float]) -> None:
        """Replace the history by ``values`` (oldest first; a window keeps the last ones)."""
        self._store.load_row(self._group, values)

    def __len__(self) -> int:
        return int(self._store._count[self._group])

    def __repr__(self) -> str:
        return f"HistoryView(group={self._group}, n={len(self)}, p={self.p:g}, window={self.window})"
