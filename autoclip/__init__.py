"""autoclip: AutoClip and the clipping baselines it is compared with, behind one interface.

Every clipper has ``step() -> ClipInfo``, ``state_dict()`` and ``load_state_dict()``::

    from autoclip import AutoClip
    clip = AutoClip(model.parameters(), p=10)
    loss.backward()
    info = clip.step()       # after backward (and scaler.unscale_), before optimizer.step()
    if not info.skip:
        optimizer.step()

On a GPU (``on_device=None`` picks it there) AutoClip keeps its history on the device and never
waits for it in ``step()``; its ClipInfo then holds device tensors. See docs/autoclip.md.
"""

from autoclip.autoclip import AutoClip
from autoclip.base import Clipper, NonFiniteGradientError
from autoclip.clip_norm import ClipNorm
from autoclip.clip_value import ClipValue
from autoclip.info import ClipInfo
from autoclip.no_clip import NoClip
from autoclip.percentile import RunningPercentile
from autoclip.sorted_history import SortedHistories
from autoclip.wrap import ClippedOptimizer, wrap

__all__ = [
    "AutoClip",
    "ClipInfo",
    "ClipNorm",
    "ClipValue",
    "ClippedOptimizer",
    "Clipper",
    "NoClip",
    "NonFiniteGradientError",
    "RunningPercentile",
    "SortedHistories",
    "wrap",
]
