"""The paper's Table 1 as a heatmap: held-out SI-SDR for every loss (columns) at every AutoClip percentile p (rows)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from figures import style

# The paper's names of its five losses.
LOSS_NAMES = {"dc": "L_DC", "wkm": "L_WKM", "mi": "L_MI", "chimera": "L_MI+WKM", "snr": "L_SNR"}


def table1_figure(losses: Sequence[str], ps: Sequence[float], si_sdr: Mapping[tuple[str, float], float]):
    """A heatmap of ``si_sdr[(loss, p)]`` (dB), one column per loss and one row per p; cells without a
    finished run (NaN or missing) are left blank. Returns the matplotlib figure."""
    plt = style.pyplot()
    import numpy as np
    import seaborn as sns

    grid = np.array([[si_sdr.get((loss, p), math.nan) for loss in losses] for p in ps], dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 * len(losses) + 2, 0.5 * len(ps) + 1.6), layout="constrained")
    sns.heatmap(
        grid,
        annot=True,
        fmt=".1f",
        cmap="rocket_r",
        ax=ax,
        cbar_kws={"label": "SI-SDR (dB)"},
        xticklabels=[LOSS_NAMES.get(loss, loss) for loss in losses],
        yticklabels=[f"{p:g}" for p in ps],
        mask=~np.isfinite(grid),
    )
    ax.set(xlabel="loss", ylabel="AutoClip p", title="SI-SDR on held-out mixtures")
    return fig
