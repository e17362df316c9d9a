"""Figure and command-line speed: Fig. 1, the threshold GIF and `dyn --help`.

Two synthetic runs of 5,000 recorded rows each (AutoClip p = 10 with a slowly rising threshold,
and AutoClip p = 100, the paper's "no clipping" run) are written with ``dynamics.run.save_run``
to a temporary directory and loaded back; loading is not timed.

1. Fig. 1 of both runs, from loaded runs to a saved PNG (``fig1(runs).savefig(path, dpi=150)``),
   beyond import time: matplotlib, seaborn and figures are imported and one figure is drawn
   first; figure: the median of the repeats (target <= 2 s).
2. The threshold animation of the p = 10 run, 100 frames to a GIF, after a warm-up; figure:
   the median of the repeats (target <= 4 s).
3. ``dyn --help``: wall time of the installed console script run as a subprocess, median of
   the runs after one warm-up (target <= 0.3 s), next to a bare ``python -c pass``.

Nothing here needs torch; whether importing and drawing the figures pulled it in is printed.

    python benchmarks/figures_speed.py           # about half a minute
    python benchmarks/figures_speed.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two cores, possibly a busy neighbour
os.environ.setdefault("MPLBACKEND", "Agg")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dynamics.run import load_run, save_run  # noqa: E402

ROWS = 5_000
EVERY = 20  # recorded every 20 steps: the steps table has EVERY times as many rows


def synthetic_run(run_dir: Path, p: float, seed: int) -> Path:
    """A finished run of ROWS recorded rows: log grad norm and log smoothness correlated (r ~ 0.8)."""
    rng = np.random.default_rng(seed)
    step = EVERY * np.arange(1, ROWS + 1, dtype=np.int64)
    t = step / step[-1]
    log_g = -1.0 + 0.8 * t + 0.6 * rng.standard_normal(ROWS)
    log_s = 0.5 + 0.9 * log_g + 0.35 * rng.standard_normal(ROWS)
    grad_norm = np.exp(log_g)
    if p >= 100:
        threshold = np.maximum.accumulate(grad_norm)  # the 100th percentile: the largest norm so far
    else:
        threshold = np.exp(-1.8 + 0.9 * t + 0.02 * rng.standard_normal(ROWS))  # slowly rising
    clip_coef = np.minimum(1.0, threshold / grad_norm)
    lr = np.full(ROWS, 1e-3)
    loss = np.exp(1.0 - 1.5 * t + 0.1 * rng.standard_normal(ROWS))
    metrics = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 1000,
            "time_s": 0.01 * step,
            "loss": loss,
            "grad_norm": grad_norm,
            "threshold": threshold,
            "clip_coef": clip_coef,
            "clipped": clip_coef < 1.0,
            "step_size": lr * np.minimum(grad_norm, threshold) * np.exp(0.2 * rng.standard_normal(ROWS)),
            "smoothness": np.exp(log_s),
            "lr": lr,
        }
    )
    every_step = np.arange(1, ROWS * EVERY + 1, dtype=np.int64)
    g_steps = np.exp(np.interp(every_step, step, log_g) + 0.3 * rng.standard_normal(len(every_step)))
    th_steps = np.interp(every_step, step, threshold)
    steps = pd.DataFrame(
        {
            "step": every_step,
            "loss": np.interp(every_step, step, loss),
            "grad_norm": g_steps,
            "threshold": th_steps,
            "clipped": g_steps > th_steps,
        }
    )
    config = {"name": run_dir.name, "clipper": {"kind": "AutoClip", "p": float(p)}, "every": EVERY}
    return save_run(run_dir, config, metrics=metrics, steps=steps)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def spread(times: list[float]) -> str:
    return f"min {min(times):.3f} s, max {max(times):.3f} s, {len(times)} repeats"


def console_script() -> str | None:
    """The installed `dyn`: next to this interpreter first (the project's venv), then on PATH."""
    beside = Path(sys.executable).with_name("dyn")
    if beside.exists():
        return str(beside)
    return shutil.which("dyn")


def bench_fig1(runs, out: Path, repeats: int) -> float:
    import matplotlib.pyplot as plt

    from figures import fig1

    def once(path: Path, split: list | None = None) -> None:
        start = time.perf_counter()
        fig = fig1(runs)
        built = time.perf_counter()
        fig.savefig(path, dpi=150)
        if split is not None:
            split.append((built - start, time.perf_counter() - built))
        plt.close(fig)

    once(out / "warmup.png")
    splits: list[tuple[float, float]] = []
    times = timed(lambda: once(out / "fig1.png", splits), repeats)
    median = statistics.median(times)
    build = statistics.median(s[0] for s in splits)
    save = statistics.median(s[1] for s in splits)
    size = (out / "fig1.png").stat().st_size
    print(f"Fig. 1, two runs of {ROWS:,} recorded rows, PNG at dpi 150 ({size / 1e3:.0f} kB)")
    print(f"  fig1(runs) {build:.3f} s + savefig {save:.3f} s  ({spread(times)})")
    print(f"  median = {median:.3f} s (target <= 2 s) {verdict(median, 2.0)}")
    return median


def bench_gif(run, out: Path, repeats: int) -> float:
    from figures import threshold_animation

    drawn: list[float] = []

    def once(path: Path) -> int:
        marks: list[float] = []
        start = time.perf_counter()
        n = threshold_animation(run, path, frames=100, on_frame=lambda *_: marks.append(time.perf_counter()))
        drawn.append(marks[-1] - start)
        return n

    once(out / "warmup.gif")
    drawn.clear()
    frames = []
    times = timed(lambda: frames.append(once(out / "threshold.gif")), repeats)
    median = statistics.median(times)
    draw = statistics.median(drawn)
    size = (out / "threshold.gif").stat().st_size
    print(f"threshold animation, {frames[-1]} frames of the p = 10 run to a GIF ({size / 1e3:.0f} kB)")
    print(f"  setup + frames {draw:.3f} s + GIF encoding {median - draw:.3f} s  ({spread(times)})")
    print(f"  median = {median:.3f} s (target <= 4 s) {verdict(median, 4.0)}")
    return median


def bench_help(repeats: int) -> float | None:
    dyn = console_script()
    if dyn is None:
        print("dyn --help: no installed `dyn` console script found (pip install -e .) MISS")
        return None

    def wall(cmd: list[str]) -> list[float]:
        subprocess.run(cmd, check=True, capture_output=True)  # warm-up: file cache, .pyc files
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            out.append(time.perf_counter() - start)
        return out

    bare = wall([sys.executable, "-c", "pass"])
    times = wall([dyn, "--help"])
    median = statistics.median(times)
    print(f"`dyn --help` as a subprocess ({dyn})")
    print(f"  bare `python -c pass`: median {statistics.median(bare):.3f} s")
    print(f"  dyn --help: {spread(times)}")
    print(f"  median = {median:.3f} s (target <= 0.3 s) {verdict(median, 0.3)}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each figure")
    parser.add_argument("--help-runs", type=int, default=7, help="timed runs of `dyn --help`")
    parser.add_argument("--keep", type=Path, default=None, help="write the runs and figures here, and keep them")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    repeats, help_runs = (1, 3) if args.quick else (args.repeats, args.help_runs)

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory()
        out = Path(tmp.name)
    else:
        out = args.keep
        out.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        paths = [synthetic_run(out / "autoclip-p10", 10, 0), synthetic_run(out / "autoclip-p100", 100, 1)]
        runs = [load_run(p) for p in paths]
        print(f"two synthetic runs written and loaded in {time.perf_counter() - start:.2f} s (not timed below)")

        torch_before = "torch" in sys.modules
        start = time.perf_counter()
        import matplotlib.pyplot  # noqa: F401
        import seaborn  # noqa: F401

        import figures  # noqa: F401

        print(f"import matplotlib.pyplot, seaborn, figures: {time.perf_counter() - start:.2f} s (not timed below)")

        bench_fig1(runs, out, repeats)
        bench_gif(runs[0], out, repeats)
        torch_after = "torch" in sys.modules
        if torch_after:
            import torch

            torch.set_num_threads(1)
        pulled = torch_after and not torch_before
        print(f"torch imported by figures (import, Fig. 1, GIF): {'YES (it should not be)' if pulled else 'no'}")

        bench_help(help_runs)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
