"""How runs look: labels and colours shared by every figure (the paper's: no clipping dark blue,
AutoClip red, others from one palette)."""

from __future__ import annotations

import math
import sys

from dynamics import stats
from dynamics.run import Run

NO_CLIP_COLOR = "#00008b"  # dark blue
AUTOCLIP_COLOR = "#e00000"  # red


def pyplot():
    """``matplotlib.pyplot``, drawing off-screen (the Agg backend) unless the program chose a backend.

    The one place dyn picks a backend: figures are written to files, and a window backend costs
    start-up time or fails without a display. A backend chosen before (``MPLBACKEND``, as Jupyter
    sets it; ``matplotlib.use``; a matplotlibrc) or a pyplot already imported is left as it is.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        try:
            chosen = matplotlib.get_backend(auto_select=False)  # matplotlib >= 3.10
        except TypeError:
            chosen = matplotlib.rcParams._get_backend_or_none()
        if chosen is None:
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def clipper_of(run: Run) -> dict:
    clipper = run.config.get("clipper")
    return clipper if isinstance(clipper, dict) else {}


def setting(run: Run, key: str) -> float | None:
    """A number of the run's clipper settings (p, max_norm, ...), None where it is missing or not a number."""
    value = clipper_of(run).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)  # a number, or a number written as a string
    except ValueError:
        return None
    return None if math.isnan(number) else number


def never_clips(run: Run) -> bool:
    """No clipping: NoClip, or AutoClip with p = 100 (the paper's 'no clipping' run); one rule with the statistics."""
    return stats.never_clips(run.config.get("clipper"))


def is_autoclip(run: Run) -> bool:
    return clipper_of(run).get("kind") == "AutoClip" and not never_clips(run)


def ordinal(p: float) -> str:
    n = f"{p:g}"
    if "." in n or "e" in n:
        return f"{n}th"
    k = int(n)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def label(run: Run) -> str:
    """'No clipping', 'With AutoClip, p = 10', 'Clip norm 0.01', ... as in the paper's legends."""
    c = clipper_of(run)
    kind = c.get("kind")
    if never_clips(run):
        return "No clipping"
    if kind == "AutoClip":
        window = f", window {c['window']}" if c.get("window") else ""
        p = setting(run, "p")
        return f"With AutoClip{'' if p is None else f', p = {p:g}'}{window}"
    if kind in ("ClipNorm", "ClipValue"):
        name, key = ("Clip norm", "max_norm") if kind == "ClipNorm" else ("Clip value", "clip_value")
        value = setting(run, key)
        return name if value is None else f"{name} {value:g}"
    return run.name


def threshold_label(run: Run) -> str:
    """The legend of the threshold line: 'log(10th percentile of gradient norm)' for AutoClip."""
    p = setting(run, "p")
    if clipper_of(run).get("kind") == "AutoClip" and p is not None and math.isfinite(p):
        return f"log({ordinal(p)} percentile of gradient norm)"
    return "log(clipping threshold)"


def draws_threshold(run: Run) -> bool:
    """A clipped run with a norm threshold gets the threshold line."""
    if never_clips(run) or run.metrics.empty or "threshold" not in run.metrics.columns:
        return False
    return any(math.isfinite(t) and t > 0 for t in run.metrics.threshold)


def colors(runs: list[Run]) -> list[str]:
    """One colour per run: no clipping dark blue, AutoClip red (further AutoClip runs in reds),
    other clippers from seaborn's 'deep' palette."""
    import seaborn as sns

    reds = sns.color_palette("Reds_r", 6).as_hex()[1:]
    others = [c for i, c in enumerate(sns.color_palette("deep", 10).as_hex()) if i not in (0, 3)]
    out, n_auto, n_other, n_blue = [], 0, 0, 0
    for run in runs:
        if never_clips(run):
            out.append(NO_CLIP_COLOR if n_blue == 0 else sns.color_palette("Blues_r", 6).as_hex()[n_blue])
            n_blue += 1
        elif is_autoclip(run):
            out.append(AUTOCLIP_COLOR if n_auto == 0 else reds[(n_auto - 1) % len(reds)])
            n_auto += 1
        else:
            out.append(others[n_other % len(others)])
            n_other += 1
    return out


def unique_labels(runs: list[Run]) -> list[str]:
    """Labels, with the run name added where two runs would otherwise share one."""
    labels = [label(r) for r in runs]
    return [f"{lab} ({r.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
