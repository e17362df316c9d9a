"""AutoClip (Seetharaman et al., MLSP 2020): clip to the p-th percentile of all gradient norms seen."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from autoclip.base import Clipper, Params
from autoclip.info import ClipInfo
from autoclip.norms import norm_tensors, scale_, scale_by_tensor_
from autoclip.percentile import RunningPercentile, check_p, check_window
from autoclip.sorted_history import HistoryView, SortedHistories

_NO_FLOAT64 = ("mps",)  # devices without float64 tensors: the history stays on the host


def choose_on_device(on_device: bool | None, device: torch.device, nonfinite: str) -> bool:
    """Whether AutoClip keeps its history on the parameters' device (``on_device=None`` decides here).

    The rule, from benchmarks/autoclip_overhead.py (CPU, one thread, a 1M-parameter model in 20
    tensors, process CPU time per step over a bare clip_grad_norm_ of ~556 µs, at histories of
    10^3 / 10^4 / 10^5 / 10^6 norms): the host path costs 1.04 / 1.01 / 1.00 / 0.99x, the device
    path 1.51 / 1.45 / 1.44 / 1.47x. On the CPU reading a tensor is no wait, while the device path
    pays about 50 small tensor ops per step, so the CPU takes the host path at every length. On any
    other device (CUDA, ...) the host path's read is a sync that stalls the launch queue every step,
    so the device path is taken. ``nonfinite="raise"`` must read the norm every step to raise, so it
    takes the host path, as does a device without float64 (MPS).
    """
    if on_device is None:
        return device.type not in ("cpu", *_NO_FLOAT64) and nonfinite != "raise"
    if not isinstance(on_device, bool):
        raise TypeError(f"on_device must be True, False or None (choose by device), got {on_device!r}")
    if on_device and device.type in _NO_FLOAT64:
        raise ValueError(
            f"AutoClip(on_device=True): {device.type} has no float64, which numpy-exact thresholds need; "
            "use on_device=False"
        )
    if on_device and nonfinite == "raise":
        raise ValueError(
            "AutoClip(on_device=True, nonfinite='raise'): raising needs the norm on the host every step, a sync; "
            "use nonfinite='skip' or 'zero' to stay on the device, or on_device=False to raise"
        )
    return on_device


class AutoClip(Clipper):
    """Adaptive clip-by-norm to the p-th percentile of the gradient-norm history.

    Each step, as in the paper's Algorithm 1: the total gradient norm n_t joins the
    history (if finite), the threshold is the p-th percentile of the history
    (``numpy.percentile``'s linear interpolation, exactly), and gradients are scaled by
    min(threshold / n_t, 1), with no epsilon: a gradient at or under the threshold is
    left untouched, so ``p=100`` never changes a gradient.

    A norm of zero never enters a history: a step on which no parameter has a gradient
    (an optimizer step without backward, a frozen model), or whose gradients are all zero,
    says nothing about the gradient scale, and a zero in the history would pin a low
    percentile to 0 and stop training. Such a step reports ``grad_norm`` 0, clips nothing
    and reports the threshold as it stands (inf while the history is empty). With
    ``per_group=True`` the same holds per group: a frozen group's history waits unchanged
    until it is unfrozen. A ``window`` counts the norms that entered, not calls to step().

    Two paths compute the same thing bit for bit. The host path keeps the history as heaps of
    Python floats and reads the norm back once per step. The device path (``on_device=True``)
    keeps it as a sorted float64 tensor on the parameters' device and never reads the device
    in ``step()``, as ``clip_grad_norm_`` does not: it always multiplies the gradients (by 1
    where nothing clips) and its ClipInfo holds 0-dim device tensors (see ``ClipInfo``).

    Args:
        params: parameters, ``named_parameters()``, or parameter groups such as
            ``optimizer.param_groups``. Each parameter may appear once.
        p: percentile in [0, 100]; 10 is the paper's choice, 100 means no clipping.
        window: keep only the last ``window`` norms (a positive int; None keeps all).
        per_group: one history and threshold per parameter group (pass
            ``optimizer.param_groups``, or one group per layer, for per-layer clipping).
        nonfinite: a NaN/inf norm never enters the history; ``"skip"`` reports
            ``info.skip`` so the optimizer step is skipped, ``"raise"`` raises
            ``NonFiniteGradientError``, ``"zero"`` zeroes the gradients. On the device path
            ``info.skip`` is a device bool tensor, and ``if info.skip`` waits for the device once
            (use ``"zero"`` for a loop with no wait at all); ``"raise"`` needs the host path.
        on_device: True keeps the history on the parameters' device, False on the host; None
            (the default) takes the device path on any device but the CPU (see ``choose_on_device``).

    Example::

        clip = AutoClip(model.parameters(), p=10)
        loss.backward()
        info = clip.step()
        if not info.skip:
            optimizer.step()
    """

    _settings = ("p", "window", "per_group")
    _state_data = ("histories",)

    def __init__(
        self,
        params: Params,
        p: float = 10.0,
        window: int | None = None,
        per_group: bool = False,
        nonfinite: str = "skip",
        on_device: bool | None = None,
    ):
        p, window = check_p(p), check_window(window)
        super().__init__(params, nonfinite=nonfinite, per_group=per_group)
        self.p = p
        self.window = window
        self.device = next(t for group in self.groups for t in group).device  # where the device path keeps it
        self.on_device = choose_on_device(on_device, self.device, self.nonfinite)
        n_histories = len(self.groups) if per_group else 1
        if self.on_device:
            self._store = SortedHistories(n_histories, p, window, self.device)
            self.histories: list[RunningPercentile] | list[HistoryView] = [
                HistoryView(self._store, k) for k in range(n_histories)
            ]
        else:
            self.histories = [RunningPercentile(p, window) for _ in range(n_histories)]

    @property
    def nonfinite_steps(self) -> int:
        """How many steps had a NaN/inf gradient norm (reads the device on the device path)."""
        counted = self._nonfinite_counted
        return self._nonfinite_base + (0 if counted is None else int(counted))

    @nonfinite_steps.setter
    def nonfinite_steps(self, value: int) -> None:
        self._nonfinite_base = int(value)
        self._nonfinite_counted: Tensor | None = None  # the device path's running count

    @property
    def threshold(self) -> float:
        """The current global threshold (inf before the first finite step); reads the device on its path."""
        if self.on_device:
            return self._global_threshold(self._store.percentiles()).item()
        return self._global_threshold([h.value() for h in self.histories])

    def _global_threshold(self, thresholds: list[float] | Tensor) -> float | Tensor:
        # With per-group clipping the largest total norm that passes unclipped is the norm of
        # the group thresholds: that is what info.threshold reports (it clips nothing itself).
        # The device path sums the squares in Python's order too, but torch's CPU sqrt is not
        # always correctly rounded (math.sqrt and CUDA's float64 sqrt are): on the CPU this
        # one reported number can differ from the host path's in the last bit.
        if len(thresholds) == 1:
            return thresholds[0]
        if isinstance(thresholds, Tensor):
            total = thresholds[0] * thresholds[0]
            for t in thresholds[1:]:
                total = total + t * t
            return torch.sqrt(total)
        return math.sqrt(sum(t * t for t in thresholds))

    # -- the host path -------------------------------------------------------------------------------

    def _clip(self, grads: list[list[Tensor]], norms: list[float]) -> ClipInfo:
        total = norms[0]
        if not self.per_group:
            history = self.histories[0]
            if total > 0:
                history.add(total)
            threshold = history.value()
            clipped = total > threshold
            if clipped:
                scale_([g for gs in grads for g in gs], threshold / total)
            return ClipInfo(total, threshold, clipped)
        thresholds, clipped = [], False
        group_norms = norms[1:] or norms[:1]  # a single group's norm is the total
        for history, group_grads, norm in zip(self.histories, grads, group_norms):
            if norm > 0:
                history.add(norm)
            threshold = history.value()
            thresholds.append(threshold)
            if norm > threshold:
                scale_(group_grads, threshold / norm)
                clipped = True
        return ClipInfo(
            total,
            self._global_threshold(thresholds),
            clipped,
            group_grad_norms=tuple(group_norms),
            group_thresholds=tuple(thresholds),
        )

    def _nonfinite_info(self, norms: list[float]) -> ClipInfo:
        thresholds = [h.value() for h in self.histories]
        return ClipInfo(
            norms[0],
            self._global_threshold(thresholds),
            False,
            finite=False,
            skip=self.nonfinite == "skip",
            group_grad_norms=tuple(norms[1:] or norms[:1]) if self.per_group else (),
            group_thresholds=tuple(thresholds) if self.per_group else (),
        )

    # -- the device path: no host read -------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> ClipInfo:
        """Measure the gradient norm and clip in place. Call after backward, before optimizer.step().

        A step on which no parameter has a gradient reports ``grad_norm`` 0 and clips nothing.
        On the device path nothing is read back to the host.
        """
        return self._step_on_device() if self.on_device else super().step()

    def _step_on_device(self) -> ClipInfo:
        self.steps += 1
        grads = self.grads()
        groups = grads if self.per_group else [[g for gs in grads for g in gs]]
        device, f64 = self.device, torch.float64
        measured = any(groups)
        if measured:
            norms = norm_tensors(groups)
            total = norms[0].to(device=device, dtype=f64)
            norm = torch.stack([n.to(device=device, dtype=f64) for n in norms[1:]]) if len(norms) > 1 else None
            norm = total.reshape(1) if norm is None else norm
            finite = total < math.inf  # a norm is >= 0 or NaN
            # a non-finite norm never enters, so one history needs no mask; a group's finite norm
            # must not enter on a step whose total is not finite
            self._store.push(norm, finite if self.per_group else None)
        else:  # known on the host: nothing to measure, nothing enters, nothing to scale
            total = torch.zeros((), dtype=f64, device=device)
            norm = torch.zeros(len(self.histories), dtype=f64, device=device)
            finite = torch.ones((), dtype=torch.bool, device=device)
        nonfinite = ~finite
        thresholds = self._store.percentiles()
        clips = finite & (norm > thresholds)
        coefs = torch.where(clips, thresholds / norm, 1.0)
        if measured:
            for group_grads, coef in zip(groups, coefs):
                if group_grads:  # a frozen group has none
                    scale_by_tensor_(group_grads, coef)
            if self.nonfinite == "zero":
                # NaN * 0 is NaN: zeroing takes a masked fill (one more pass over the gradients)
                for g in (g for gs in groups for g in gs):
                    g.masked_fill_(nonfinite, 0)
            if self._nonfinite_counted is None:
                self._nonfinite_counted = torch.zeros((), dtype=torch.int64, device=device)
            self._nonfinite_counted += nonfinite
        if len(self.histories) == 1:
            threshold, clipped, clip_coef = thresholds[0], clips[0], coefs[0]
        else:
            threshold, clipped = self._global_threshold(thresholds), clips.any()
            clip_coef = torch.where(finite & (total > threshold), threshold / total, 1.0)
        return ClipInfo(
            total,
            threshold,
            clipped,
            finite=finite,
            skip=nonfinite if self.nonfinite == "skip" else False,
            group_grad_norms=tuple(norm.unbind()) if self.per_group else (),
            group_thresholds=tuple(thresholds.unbind()) if self.per_group else (),
            clip_coef=clip_coef,
        )

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Settings and histories (float64 tensors, oldest first when windowed); the same from either path."""
        state = super().state_dict()
        state["histories"] = [torch.tensor(h.values(), dtype=torch.float64) for h in self.histories]
        return state

    def _check_state(self, state: Any) -> None:
        super()._check_state(state)
        histories = state["histories"]
        if not isinstance(histories, (list, tuple)) or len(histories) != len(self.histories):
            n = len(histories) if isinstance(histories, (list, tuple)) else type(histories).__name__
            raise ValueError(
                f"AutoClip state_dict has {n} histories, this AutoClip has {len(self.histories)} "
                f"(per_group={self.per_group}, {len(self.groups)} groups): build it with the same parameter groups"
            )
        for k, values in enumerate(histories):
            try:
                values = torch.as_tensor(values, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"AutoClip state_dict: history {k} must be a 1-D list of finite norms >= 0") from None
            if values.dim() != 1 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                raise ValueError(f"AutoClip state_dict: history {k} must be a 1-D list of finite norms >= 0")
            if self.window is not None and len(values) > self.window:
                raise ValueError(f"AutoClip state_dict: history {k} holds {len(values)} norms, more than the window")

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        values = [torch.as_tensor(v, dtype=torch.float64).tolist() for v in state["histories"]]
        if self.on_device:
            self._store.load(values)
        else:
            for history, v in zip(self.histories, values):
                history.load(v)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", on_device={self.on_device}"
