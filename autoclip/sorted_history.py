"""Exact running percentiles kept on the device: numpy.percentile of each history with no host read.

``SortedHistories`` holds G histories (one per parameter group) as the rows of sorted float64
tensors on the parameters' device. Adding a norm and reading the percentile are a few tensor ops
whose sizes the host knows in advance, so the device is never waited for.

Rows are padded with +inf after their values and led by a -inf column. Inserting x into such a
row is one elementwise op, new[i] = clamp(x, old[i - 1], old[i]) (below x's place this is old[i],
at it x, above it old[i - 1]), and inserting +inf changes nothing: a norm that must not enter
(non-finite, or zero: no gradient) is masked to +inf on the device instead of branching on the host.

- A whole history (no window) is two sorted rows: a main row M and a pending row P of at most
  ``pending`` norms. A norm is inserted into P (O(pending) work) along with its rank in M, r =
  searchsorted(M, x), kept sorted beside it by the same clamp (r is monotone in x). Order
  statistic k of M + P is min(M[k - c], P[c]), c being how many of P's norms come before place k
  (one searchsorted over P's places in the merge, j + r_j). Every ``pending`` pushes (a count the
  host keeps) P is merged into M by reading every order statistic of M + P at once, O(len(M) log
  pending): amortized O(len(M) log(pending) / pending). No op scatters (under CUDA's deterministic
  algorithms a scatter reads its indices back to the host, a sync).
- A window is one row, with a ring of the last W norms in arrival order naming the oldest, which
  is removed as new[i] = old[i] if old[i] < y else old[i + 1] (removing +inf is a no-op): O(W).
- Percentile: numpy's linear interpolation between the order statistics k = floor((n - 1) q)
  and k + 1, in numpy's own arithmetic (its _lerp), so the result is bit-identical to
  ``numpy.percentile`` in float64.

Why not torch.cat of slices around torch.searchsorted's place: slicing by a device value needs it
on the host, a sync. The buffers grow geometrically (doubling), so allocation is amortized O(1)
per step; memory is two float64 main rows of at most twice the history, the pending rows, and the
window's ring.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from autoclip.percentile import check_p, check_window

_MIN_CAPACITY = 64
# Norms waiting beside the main row before a merge. A push costs O(PENDING), a merge O(history): at
# 10^6 norms on one CPU thread a merge takes about 50 ms, 50 µs a step amortized, and the step's cost
# no longer grows with the history (benchmarks/autoclip_overhead.py).
PENDING = 1024


class SortedHistories:
    """G exact running percentiles (of all values pushed, or of the last ``window``) on one device.

    ``push(x, valid)`` and ``percentiles()`` never read the device; ``values``, ``load`` and
    ``counts`` do (they are for state dicts and inspection, not for the training step).
    ``pending`` (whole histories only) is how many norms wait beside the main row before they are
    merged into it: each push costs O(pending), each merge O(history).

    Example::

        h = SortedHistories(groups=1, p=10.0, device="cpu")
        for x in [3.0, 1.0, 2.0]:
            h.push(torch.tensor([x], dtype=torch.float64))
        h.percentiles()  # tensor([1.2000]) == numpy.percentile([3.0, 1.0, 2.0], 10.0)
    """

    def __init__(
        self,
        groups: int,
        p: float,
        window: int | None = None,
        device: torch.device | str = "cpu",
        pending: int = PENDING,
    ):
        self.groups = int(groups)
        self.p = check_p(p)
        self.window = check_window(window)
        if isinstance(pending, bool) or not isinstance(pending, int) or pending < 1:
            raise ValueError(f"SortedHistories: pending must be an int >= 1, got {pending!r}")
        self.pending = pending
        self._q = self.p / 100.0  # numpy.percentile divides by 100 the same way
        self.device = torch.device(device)
        self._pair = torch.tensor([[0, 1]], dtype=torch.int64, device=self.device)
        self.load([[] for _ in range(self.groups)])

    # -- the training step: no host read ---------------------------------------------------------

    @torch.no_grad()
    def push(self, x: Tensor, valid: Tensor | bool | None = None) -> None:
        """Append ``x[g]`` (shape [G], taken as float64) to history g where ``valid[g]``; a window forgets its oldest.

        Entries that are not finite or not positive never enter, whatever ``valid`` says.
        """
        x = x.to(device=self.device, dtype=torch.float64)
        entering = torch.where(x > 0, x, math.inf)  # NaN > 0 is False: zero, NaN and inf all become +inf
        if valid is not None:
            valid = torch.as_tensor(valid, dtype=torch.bool, device=self.device)
            entering = torch.where(valid, entering, math.inf)
        keep = entering < math.inf
        entering = entering.unsqueeze(1)
        if self.window is None:
            self._push_pending(entering)
            self._count += keep
        else:
            self._push_window(entering, keep)

    def _push_pending(self, entering: Tensor) -> None:
        if self._waiting_span == self.pending:
            self._merge()
        span = self._waiting_span + 1
        # 1 + how many norms of the main row are below x (its column 0 is -inf); +inf gives 1 + its count
        rank = torch.searchsorted(self._sorted, entering)
        self._insert(entering, span, self._waiting, self._waiting_spare)
        self._insert(rank, span, self._ranks, self._ranks_spare)
        self._waiting, self._waiting_spare = self._waiting_spare, self._waiting
        self._ranks, self._ranks_spare = self._ranks_spare, self._ranks
        self._waiting_span = span

    def _push_window(self, entering: Tensor, keep: Tensor) -> None:
        span = min(self._span + 1, self.window)
        if span > self._capacity:
            self._grow(span)
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
        # the new norm into its slot (none where it does not enter) by a where over the ring, not a
        # scatter (see _merge)
        slot = torch.where(keep.unsqueeze(1), slot, -1)
        torch.where(self._ring_columns == slot, entering, self._ring, out=self._ring)
        self._arrived += keep
        self._count += keep & ~full
        self._span = span

    @staticmethod
    def _insert(entering: Tensor, span: int, source: Tensor, target: Tensor) -> None:
        # new[i] = clamp(x, old[i - 1], old[i]): column 0 of the buffers is the lowest, so old[-1] exists
        torch.clamp(entering.expand(-1, span), source[:, 0:span], source[:, 1 : span + 1], out=target[:, 1 : span + 1])

    def _merge(self) -> None:
        """Move the pending norms into the main row: the merged row is every order statistic, read at once.

        Gathers, no scatter: on CUDA under torch.use_deterministic_algorithms a scatter becomes an
        index_put_ that reads its indices' range back to the host, a sync.
        """
        span = self._span + self._waiting_span
        self._grow(span)
        every = torch.arange(span, device=self.device).expand(self.groups, -1)
        self._spare[:, 1 : span + 1] = self._order_statistics(every, past_count=True)
        self._sorted, self._spare = self._spare, self._sorted
        self._span = span
        self._clear_pending()

    def _clear_pending(self) -> None:
        """An empty pending row: every rank is 1 + the main row's count (where its +inf starts)."""
        for buffer in (self._waiting, self._waiting_spare):
            buffer[:, 1:] = math.inf
        for buffer in (self._ranks, self._ranks_spare):
            buffer[:, 1:] = (self._count + 1).unsqueeze(1)
        self._waiting_span = 0

    @torch.no_grad()
    def percentiles(self) -> Tensor:
        """numpy.percentile of each history (linear method), float64 of shape [G]; inf where empty."""
        n = self._count
        last = n - 1
        virtual = last.to(torch.float64) * self._q
        below = torch.floor(virtual)
        gamma = virtual - below
        # order statistics k and k + 1 (k = floor(virtual)), both at most n - 1; an empty history
        # reads rank -1 (the -inf column), replaced by inf below
        ranks = torch.minimum(below.to(torch.int64).unsqueeze(1) + self._pair, last.unsqueeze(1))
        pair = self._order_statistics(ranks)
        a, b = pair[:, 0], pair[:, 1]
        # numpy's _lerp, a + (b - a) * gamma below gamma = 0.5 and b - (b - a) * (1 - gamma) from it,
        # written as base + (b - a) * t with base = b and t = gamma - 1 = -(1 - gamma) (exact for
        # gamma >= 0.5) from it: the same bits, in fewer ops. At the top order statistic a == b and
        # both forms give a, as numpy does.
        upper = gamma >= 0.5
        lerp = torch.where(upper, b, a) + (b - a) * torch.where(upper, gamma - 1, gamma)
        return torch.where(n > 0, lerp, math.inf)

    def _order_statistics(self, ranks: Tensor, past_count: bool = False) -> Tensor:
        """The values of the given 0-based ranks ([G, R]) in each history (+inf past its count)."""
        if self.window is not None:
            return self._sorted.gather(1, ranks + 1)
        # Pending column j sits at place j + rank_j - 2 of the merge (0-based), increasing in j. With c
        # of them before place k, place k holds min(main[k - c], pending[c]), at columns k - c + 1 and
        # c + 1; searchsorted over the places + 2 gives c + 1 (column 0 counts as one, below any k + 2).
        places = self._ranks + self._columns
        waiting_column = torch.searchsorted(places, ranks + 2)
        if past_count:
            # Past a history's count (a merge reads every place) the pending row's padding counts too
            # and c + 1 could point past its last column; that column is +inf, as the value there is.
            waiting_column.clamp_(max=self.pending + 1)
        from_main = self._sorted.gather(1, ranks + 2 - waiting_column)
        return torch.minimum(from_main, self._waiting.gather(1, waiting_column))

    # -- state: these read the device ------------------------------------------------------------

    def counts(self) -> list[int]:
        """How many values each history holds."""
        return self._count.tolist()

    def values(self, group: int) -> list[float]:
        """History ``group``'s values: oldest first with a window, ascending without."""
        n = int(self._count[group])
        if self.window is None:
            main = self._sorted[group, 1 : self._span + 1].tolist()
            waiting = self._waiting[group, 1 : self._waiting_span + 1].tolist()
            return sorted(v for v in main + waiting if v < math.inf)
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
        self._grow(span if self.window is not None else span + self.pending)  # room for the next merge
        self._span = span
        sorted_rows = torch.full((self.groups, span), math.inf, dtype=torch.float64)
        for g, row in enumerate(rows):
            sorted_rows[g, : len(row)] = torch.tensor(sorted(row), dtype=torch.float64)
        self._sorted[:, 1 : span + 1] = sorted_rows.to(self.device)
        self._count = torch.tensor([len(row) for row in rows], dtype=torch.int64, device=self.device)
        if self.window is None:
            self._waiting, self._waiting_spare = self._new_buffer(self.pending), self._new_buffer(self.pending)
            self._ranks = torch.zeros((self.groups, self.pending + 2), dtype=torch.int64, device=self.device)
            self._ranks_spare = self._ranks.clone()
            self._columns = torch.arange(self.pending + 2, device=self.device).unsqueeze(0)
            self._clear_pending()
        else:
            ring = torch.zeros((self.groups, self.window), dtype=torch.float64)
            for g, row in enumerate(rows):
                ring[g, : len(row)] = torch.tensor(row, dtype=torch.float64)
            self._ring = ring.to(self.device)
            self._ring_columns = torch.arange(self.window, device=self.device).unsqueeze(0)
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
