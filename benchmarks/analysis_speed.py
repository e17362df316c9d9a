"""Analysis speed: the relaxed-smoothness fit with its bootstrap, and `dyn diagnose` of a long run.

1. ``relaxed_smoothness`` on 5,000 rows (gradient norms and smoothness of a synthetic run, AR(1)
   noise) with its moving-block bootstrap interval (1,000 resamples, the default; 2,000 shown too):
   process CPU time, median of the repeats after one warm-up (target <= 2 s).
2. ``dynamics.diagnose.diagnose`` of a 100,000-step run (steps table of 100k rows, metrics every 20
   steps with sharpness under SGD, per-layer rows for 20 tensors), loaded first (not timed): process
   CPU time, median of the repeats (target <= 2 s); and ``dyn diagnose RUN`` as a user runs it, the
   wall time of the whole command (start-up, loading the Parquet files, diagnosing).
3. ``--coverage N``: how often the 95% intervals of L0 and L1 cover the true values, over N data sets
   of 500 rows drawn from known L0 = 0.5, L1 = 2 (smoothness (L0 + L1 g) e^(0.3 e), e and log g
   Gaussian AR(1) with phi 0.5, so the conditional median is L0 + L1 g). A few minutes for N = 300.

    python benchmarks/analysis_speed.py                 # about half a minute
    python benchmarks/analysis_speed.py --coverage 300
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two cores, possibly a busy neighbour

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.signal import lfilter  # noqa: E402

from dynamics.analysis import relaxed_smoothness  # noqa: E402
from dynamics.diagnose import diagnose  # noqa: E402
from dynamics.run import load_run, save_run  # noqa: E402


def ar1(rng, n: int, phi: float = 0.5) -> np.ndarray:
    """Gaussian AR(1) of unit variance."""
    return lfilter([1.0], [1.0, -phi], rng.standard_normal(n + 100))[100:] * math.sqrt(1 - phi**2)


def relaxed_data(n: int, seed: int, l0: float = 0.5, l1: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.exp(0.7 * ar1(rng, n))
    return g, (l0 + l1 * g) * np.exp(0.3 * ar1(rng, n))


def cpu(fn, repeats: int) -> float:
    """Median process CPU time of fn() over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def long_run(root: Path, n: int = 100_000, every: int = 20, tensors: int = 20) -> Path:
    """A 100k-step SGD run with a few events (a loss spike, non-finite steps) to find."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    loss = (0.2 + 2 * np.exp(-t / 5000)) * np.exp(0.08 * ar1(rng, n, 0.3))
    g = (1 + t / n) * np.exp(0.25 * ar1(rng, n))
    loss[50_000] *= 4
    g[70_000:70_003] = np.inf
    steps = pd.DataFrame(
        {"step": t + 1, "loss": loss, "grad_norm": g, "threshold": np.full(n, 1.8), "clipped": g > 1.8}
    )
    metrics = steps.iloc[every - 1 :: every].reset_index(drop=True)
    k = len(metrics)
    metrics = metrics.assign(
        step_size=1e-2 * np.exp(0.2 * rng.normal(size=k)),
        smoothness=(0.5 + 2 * metrics.grad_norm) * np.exp(0.3 * rng.normal(size=k)),
        sharpness=20 + 5 * rng.normal(size=k),
        lr=np.full(k, 0.01),
    )
    names = [f"blocks.{i}.weight" for i in range(tensors)]
    layers = pd.DataFrame(
        {
            "step": np.repeat(metrics.step.to_numpy(), tensors),
            "name": pd.Series(names * k, dtype=object),
            "grad_norm": np.abs(rng.normal(size=k * tensors)) + 0.01,
        }
    )
    config = {
        "name": "long",
        "clipper": {"kind": "ClipNorm", "max_norm": 1.8},
        "optimizer": {"kind": "SGD", "lr": 0.01},
    }
    return save_run(root / "long", config, steps=steps, metrics=metrics, layers=layers)


def coverage(repeats: int, n: int = 500) -> None:
    hits = np.zeros(2)
    start = time.time()
    for seed in range(repeats):
        fit = relaxed_smoothness(*relaxed_data(n, 1000 + seed))
        hits += [fit.l0_ci[0] <= 0.5 <= fit.l0_ci[1], fit.l1_ci[0] <= 2.0 <= fit.l1_ci[1]]
    cov = hits / repeats
    se = np.sqrt(cov * (1 - cov) / repeats)
    print(
        f"coverage of the 95% intervals over {repeats} data sets of {n} rows: "
        f"L0 {cov[0]:.3f} (+/- {se[0]:.3f}), L1 {cov[1]:.3f} (+/- {se[1]:.3f}); {time.time() - start:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coverage", type=int, default=0, metavar="N", help="also measure interval coverage")
    args = parser.parse_args()

    g, s = relaxed_data(5000, 0)
    fit = relaxed_smoothness(g, s)
    t1000 = cpu(lambda: relaxed_smoothness(g, s), args.repeats)
    t2000 = cpu(lambda: relaxed_smoothness(g, s, n_resamples=2000), args.repeats)
    t_fit = cpu(lambda: relaxed_smoothness(g, s, n_resamples=0), args.repeats)
    print(
        f"relaxed_smoothness, 5,000 rows: L0 {fit.l0:.3f} {tuple(round(v, 3) for v in fit.l0_ci)}, "
        f"L1 {fit.l1:.3f} {tuple(round(v, 3) for v in fit.l1_ci)}, block {fit.block}"
    )
    print(f"  fit only {t_fit:.3f} s; with 1,000 resamples {t1000:.2f} s (target <= 2 s); 2,000: {t2000:.2f} s")

    root = Path(tempfile.mkdtemp(prefix="dyn-analysis-bench-"))
    try:
        run_dir = long_run(root)
        run = load_run(run_dir)
        findings = diagnose(run)
        t_diag = cpu(lambda: diagnose(run), args.repeats)
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cli", "diagnose", str(run_dir)], capture_output=True)
            walls.append(time.perf_counter() - start)
            assert done.returncode == 0, done.stderr
        kinds = ", ".join(f"{f.kind} at {f.first_step}" for f in findings)
        print(f"diagnose, 100,000 steps ({len(run.metrics)} records, {len(run.layers)} layer rows): {kinds}")
        print(
            f"  diagnose(run) {t_diag:.3f} s CPU (target <= 2 s); "
            f"`dyn diagnose RUN` {statistics.median(walls):.2f} s wall"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.coverage:
        coverage(args.coverage)


if __name__ == "__main__":
    main()
