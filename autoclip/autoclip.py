"""AutoClip (Seetharaman et al., MLSP 2020): clip to the p-th percentile of all gradient norms seen."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from autoclip.base import Clipper, Params
from autoclip.info import ClipInfo
from autoclip.norms import scale_
from autoclip.percentile import RunningPercentile, check_p, check_window


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

    Args:
        params: parameters, ``named_parameters()``, or parameter groups such as
            ``optimizer.param_groups``. Each parameter may appear once.
        p: percentile in [0, 100]; 10 is the paper's choice, 100 means no clipping.
        window: keep only the last ``window`` norms (a positive int; None keeps all).
        per_group: one history and threshold per parameter group (pass
            ``optimizer.param_groups``, or one group per layer, for per-layer clipping).
        nonfinite: a NaN/inf norm never enters the history; ``"skip"`` reports
            ``info.skip`` so the optimizer step is skipped, ``"raise"`` raises
            ``NonFiniteGradientError``, ``"zero"`` zeroes the gradients.

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
    ):
        p, window = check_p(p), check_window(window)
        super().__init__(params, nonfinite=nonfinite, per_group=per_group)
        n_histories = len(self.groups) if per_group else 1
        self.histories = [RunningPercentile(p, window) for _ in range(n_histories)]
        self.p = p
        self.window = window

    @property
    def threshold(self) -> float:
        """The current global threshold (inf before the first finite step)."""
        return self._global_threshold([h.value() for h in self.histories])

    def _global_threshold(self, thresholds: list[float]) -> float:
        # With per-group clipping the largest total norm that passes unclipped is the
        # norm of the group thresholds: that is what info.threshold reports.
        if len(thresholds) == 1:
            return thresholds[0]
        return math.sqrt(sum(t * t for t in thresholds))

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

    def state_dict(self) -> dict[str, Any]:
        """Settings and histories (float64 tensors, oldest first when windowed)."""
        state = super().state_dict()
        state.update(
            p=self.p,
            window=self.window,
            per_group=self.per_group,
            histories=[torch.tensor(h.values(), dtype=torch.float64) for h in self.histories],
        )
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
            values = torch.as_tensor(values, dtype=torch.float64)
            if values.dim() != 1 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
                raise ValueError(f"AutoClip state_dict: history {k} must be a 1-D list of finite norms >= 0")
            if self.window is not None and len(values) > self.window:
                raise ValueError(f"AutoClip state_dict: history {k} holds {len(values)} norms, more than the window")

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        for history, values in zip(self.histories, state["histories"]):
            history.load(torch.as_tensor(values, dtype=torch.float64).tolist())

    def extra_repr(self) -> str:
        return f"p={self.p:g}, window={self.window}, per_group={self.per_group}, " + super().extra_repr()
