"""figures: the paper's Fig. 1, the threshold animation, run comparisons, per-layer heatmaps and
metrics columns over training.

Each takes loaded runs (``dynamics.load_run``) and returns a matplotlib figure or writes a file;
runs that differ only in seed are drawn as one arm (``figures.groups.group_runs``).
"""

from figures.animation import threshold_animation
from figures.columns import columns_figure
from figures.compare import comparison_figure
from figures.fig1 import fig1
from figures.files import save_figure
from figures.groups import group_runs
from figures.layers import layers_figure

__all__ = [
    "columns_figure",
    "comparison_figure",
    "fig1",
    "group_runs",
    "layers_figure",
    "save_figure",
    "threshold_animation",
]
