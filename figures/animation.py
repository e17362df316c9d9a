"""The threshold animation: the gradient-norm/smoothness scatter filling in as training goes,
with AutoClip's threshold line moving (the paper's animated Fig. 1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynamics.run import Run
from figures import style
from figures.files import atomic_file

MAX_FRAMES = 1000  # about 150 kB a frame is held until the GIF is written
MAX_FRAME_S = 655.35  # a GIF frame's delay is 16 bits of hundredths of a second


def check_animation(frames: int, duration: float) -> None:
    """Raise ValueError unless 1 <= frames <= MAX_FRAMES and duration is a finite number of seconds > 0
    that gives each frame at most a GIF's longest delay."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {frames!r}")
    ok = isinstance(duration, (int, float, np.floating)) and not isinstance(duration, bool)
    if not (ok and math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a finite number of seconds above 0, got {duration!r}")
    if duration / frames > MAX_FRAME_S:
        raise ValueError(
            f"duration {duration:g} s over {frames} frame(s) is more than a GIF's {MAX_FRAME_S} s a frame; "
            "use a shorter duration or more frames"
        )


def threshold_animation(
    run: Run,
    path: str | Path,
    frames: int = 100,
    duration: float = 10.0,
    dpi: int = 80,
    on_frame: Callable | None = None,
) -> int:
    """Write a GIF of ``frames`` frames lasting ``duration`` seconds; returns the frame count.

    The axes are fixed to the whole run's range; each frame shows the points recorded up
    to its iteration, the threshold line at log(threshold) of that moment, and the
    iteration. Frames are drawn by updating the same artists, not by new figures.
    ``on_frame(index, step, ax, line)`` is called after each frame is drawn (for tests).
    At most MAX_FRAMES frames; the file appears only once complete.

    Example::

        threshold_animation(load_run("runs/autoclip-p10"), "threshold.gif", frames=100)
    """
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(run, Run):
        raise TypeError(f"threshold_animation takes a Run (dynamics.load_run(RUN_DIR)), got {type(run).__name__}")
    check_animation(frames, duration)
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or dpi < 1:
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    m = run.metrics
    missing = [c for c in ("grad_norm", "smoothness") if c not in m.columns]
    if missing:
        raise ValueError(
            f"{run.path}: the animation plots gradient norm against smoothness; the run has no {missing[0]}"
        )
    g = m.grad_norm.to_numpy(dtype=float)
    s = m.smoothness.to_numpy(dtype=float)
    steps = m.step.to_numpy()
    keep = np.isfinite(g) & np.isfinite(s) & (g > 0) & (s > 0)
    if not keep.any():
        raise ValueError(f"{run.path}: no recorded row has a positive gradient norm and smoothness")
    x, y, point_steps = np.log(g[keep]), np.log(s[keep]), steps[keep]
    thresholds = m.threshold.to_numpy(dtype=float) if "threshold" in m.columns else np.full(len(m), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_thresholds = np.where((thresholds > 0) & np.isfinite(thresholds), np.log(thresholds), np.nan)
    show_line = style.draws_threshold(run)
    color = style.colors([run])[0]

    xs = np.concatenate([x, log_thresholds[np.isfinite(log_thresholds)] if show_line else []])
    pad_x, pad_y = 0.03 * (np.ptp(xs) or 1.0), 0.03 * (np.ptp(y) or 1.0)
    xlim, ylim = (xs.min() - pad_x, xs.max() + pad_x), (y.min() - pad_y, y.max() + pad_y)
    # evenly spaced iterations, the last one the end of training (a single frame shows the end)
    frame_steps = np.linspace(steps[0], steps[-1], frames) if frames > 1 else np.array([steps[-1]], dtype=float)

    # drawn on an Agg canvas of its own, whatever pyplot's backend: blitting needs Agg's pixel buffer
    with sns.axes_style("white"):
        fig = Figure(figsize=(5.5, 4.2), dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
    ax.set(xlim=xlim, ylim=ylim, xlabel="log(gradient norm)", ylabel="log(smoothness)", title=style.label(run))
    # animated artists are left out of full draws and drawn over a saved background (blitting)
    points = ax.scatter([], [], s=9, color=color, alpha=0.5, linewidths=0, animated=True)
    line = ax.axvline(np.nan, color="black", ls=":", lw=1.5, label=style.threshold_label(run), animated=True)
    line.set_visible(show_line)
    if show_line:
        ax.legend(loc="upper right", fontsize="small")
    clock = ax.text(0.03, 0.95, "", transform=ax.transAxes, va="top", ha="left", animated=True)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # keep the layout computed once: axes cannot move between frames
    background = fig.canvas.copy_from_bbox(fig.bbox)

    def render(step: float) -> tuple[np.ndarray, int]:
        shown = point_steps <= step
        points.set_offsets(np.column_stack([x[shown], y[shown]]))
        row = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
        if show_line:
            line.set_xdata([log_thresholds[row], log_thresholds[row]])
        # the frame's own iteration: with more frames than rows, frames still differ (a GIF
        # writer merges identical frames) and the clock keeps moving
        clock.set_text(f"iteration {int(round(step))}")
        fig.canvas.restore_region(background)
        for artist in (points, line, clock):
            ax.draw_artist(artist)
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy(), row

    from PIL import Image

    # one palette for every frame, taken from the fullest (the last) one, drawn first so that each
    # frame is quantized as drawn: 1 byte a pixel is held per frame instead of 3
    palette = Image.fromarray(render(frame_steps[-1])[0]).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    images = []
    for i, step in enumerate(frame_steps):
        rgb, row = render(step)
        images.append(Image.fromarray(rgb).quantize(palette=palette, dither=Image.Dither.NONE))
        if on_frame is not None:
            on_frame(i, int(steps[row]), ax, line)
    _write_gif(path, images, max(20, int(round(1000 * duration / len(images)))))
    return len(images)


def _write_gif(path: str | Path, frames: list, per_frame_ms: int) -> None:
    """Write palette frames as a GIF, atomically.

    Pillow writes directly: through imageio's pillow plugin every frame is re-mapped to the
    palette in Python (about 45 ms a frame, 30 times the rest of the work). imageio reads
    the result back in the tests.
    """
    with atomic_file(path) as f:
        frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], duration=per_frame_ms, loop=0, optimize=False
        )
