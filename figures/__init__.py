"""figures: the paper's Fig. 1, the threshold animation, and run comparisons.

Each takes loaded runs (``dynamics.load_run``) and returns a matplotlib figure or writes a file.
"""

from figures.animation import threshold_animation
from figures.compare import comparison_figure
from figures.fig1 import fig1

__all__ = ["comparison_figure", "fig1", "threshold_animation"]
