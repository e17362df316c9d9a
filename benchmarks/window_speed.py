"""Speed of dyn's window: the HTML report, `dyn ls`, and what `dyn serve`'s polling costs a training run.

1. Report: two synthetic finished runs of 5,000 recorded rows each (every 20 steps: 100,000 rows in
   the steps table, 48 parameter tensors in the layers table, an eval table), written with
   ``save_run``. Timed: loading both runs and building and writing the report
   (``figures.report.write_report``), in process after one warm-up build (imports not counted),
   median of the repeats (target <= 3 s); the file's size (target <= 8 MB); and ``dyn report``
   end to end as a user runs it (a fresh process, imports included), for reference.
2. ``dyn ls`` over 200 runs (180 finished runs of 1,000 records, 20 interrupted runs whose rows
   are still in their journals): ``dynamics.load_runs`` in process, median of the repeats, and
   ``dyn ls`` as a subprocess (target <= 2 s).
3. Polling: a small MLP trains with a Recorder (every 10 steps) while ``dyn serve`` runs on its
   folder; blocks of steps alternate between no client and a client (another process) that asks
   for the run's new rows and the index 4 times a second (12 times the dashboard's rate). Figure:
   the median over pairs of the ratio of the record steps' mean wall time with the client to
   without (target <= 1.02), and the same for all steps. Wall time, since the poller costs the
   writer only through the machine (CPU, disk); on a busy machine the spread is printed too.

    python benchmarks/window_speed.py            # a few minutes
    python benchmarks/window_speed.py --only report
    python benchmarks/window_speed.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two cores, possibly a busy neighbour

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dynamics.run import save_run  # noqa: E402

EVERY = 20
TENSORS = 48  # 8 blocks x (attention, mlp) x (weight, bias) + embeddings: grouped into modules in the heatmap


def tensor_names() -> list[str]:
    names = ["model.embed.weight", "model.pos.weight"]
    for block in range(11):
        for part in ("attn.qkv", "mlp.fc"):
            names += [f"model.h.{block}.{part}.weight", f"model.h.{block}.{part}.bias"]
    names += ["model.norm.weight", "model.norm.bias"]
    return names[:TENSORS]


def synthetic_run(run_dir: Path, p: float, seed: int, records: int, layers: bool = True) -> Path:
    """A finished run of ``records`` recorded rows (log grad norm and log smoothness correlated)."""
    rng = np.random.default_rng(seed)
    step = EVERY * np.arange(1, records + 1, dtype=np.int64)
    t = step / step[-1]
    log_g = -1.0 + 0.8 * t + 0.6 * rng.standard_normal(records)
    grad_norm = np.exp(log_g)
    threshold = np.maximum.accumulate(grad_norm) if p >= 100 else np.exp(-1.8 + 0.9 * t)
    clip_coef = np.minimum(1.0, threshold / grad_norm)
    lr = np.full(records, 1e-3)
    sharpness = np.where(np.arange(records) % 10 == 0, np.exp(2 + t + 0.1 * rng.standard_normal(records)), np.nan)
    metrics = pd.DataFrame(
        {
            "step": step,
            "epoch": step // 1000,
            "time_s": 0.01 * step,
            "loss": np.exp(1.0 - 1.5 * t + 0.1 * rng.standard_normal(records)),
            "grad_norm": grad_norm,
            "threshold": threshold,
            "clip_coef": clip_coef,
            "clipped": clip_coef < 1.0,
            "clip_rate": np.clip(1 - p / 100 + 0.05 * rng.standard_normal(records), 0, 1),
            "step_size": lr * np.minimum(grad_norm, threshold) * np.exp(0.2 * rng.standard_normal(records)),
            "smoothness": np.exp(0.5 + 0.9 * log_g + 0.35 * rng.standard_normal(records)),
            "sharpness": sharpness,
            "lr": lr,
        }
    )
    every_step = np.arange(1, records * EVERY + 1, dtype=np.int64)
    g_steps = np.exp(np.interp(every_step, step, log_g) + 0.3 * rng.standard_normal(len(every_step)))
    th_steps = np.interp(every_step, step, threshold)
    steps = pd.DataFrame(
        {
            "step": every_step,
            "loss": np.interp(every_step, step, metrics.loss),
            "grad_norm": g_steps,
            "threshold": th_steps,
            "clipped": g_steps > th_steps,
        }
    )
    tables = {"metrics": metrics, "steps": steps}
    if layers:
        names = tensor_names()
        n = len(names)
        tables["layers"] = pd.DataFrame(
            {
                "step": np.repeat(step, n),
                "name": np.tile(names, records),
                "grad_norm": np.exp(rng.standard_normal(records * n)),
                "step_size": np.exp(-6 + rng.standard_normal(records * n)),
                "param_norm": np.exp(1 + 0.1 * rng.standard_normal(records * n)),
            }
        )
    evals = step[:: max(1, records // 20)]
    tables["eval"] = pd.DataFrame({"step": evals, "si_sdri": np.linspace(2, 9, len(evals))})
    config = {
        "name": run_dir.name,
        "clipper": {"kind": "AutoClip", "p": float(p)},
        "optimizer": {"kind": "Adam", "lr": 1e-3},
        "every": EVERY,
        "seed": seed,
        "quantities": ["StepSize()", "Smoothness()", "Sharpness(every=200)", "LayerNorms()"],
    }
    return save_run(run_dir, config, **tables)


def dyn_command() -> list[str]:
    beside = Path(sys.executable).with_name("dyn")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "cli"]


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


# -- 1. the report -----------------------------------------------------------------------------------


def bench_report(tmp: Path, records: int, repeats: int) -> None:
    from dynamics.run import load_run
    from figures.report import write_report

    dirs = [synthetic_run(tmp / "report" / f"p{p}", p, seed, records) for seed, p in enumerate((10.0, 100.0))]
    out = tmp / "report.html"

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        runs = [load_run(d) for d in dirs]
        loaded = time.perf_counter()
        write_report(runs, out)
        return loaded - start, time.perf_counter() - loaded

    def statistics_only() -> float:
        """What the report's summary table and findings cost by themselves (dyn compare's and dyn diagnose's)."""
        from dynamics.diagnose import diagnose
        from dynamics.summary import summarize

        runs = [load_run(d) for d in dirs]
        start = time.perf_counter()
        for run in runs:
            summarize(run)
            diagnose(run)
        return time.perf_counter() - start

    once()  # imports, file cache
    times, stats = [], []
    for _ in range(repeats):  # interleaved, so that both see the same load on the machine
        times.append(once())
        stats.append(statistics_only())
    total = [a + b for a, b in times]
    median = statistics.median(total)
    size = out.stat().st_size / 1e6
    print(f"report of 2 runs x {records:,} records ({records * EVERY:,} steps, {TENSORS} tensors each)")
    print(
        f"  load {statistics.median(a for a, _ in times):.3f} s + build and write "
        f"{statistics.median(b for _, b in times):.3f} s; min {min(total):.3f} s, max {max(total):.3f} s, "
        f"{repeats} repeats"
    )
    stat = statistics.median(stats)
    print(
        f"  of which the summary's statistics (dynamics.summary.summarize: bootstrap intervals of r, L0, L1) "
        f"and dynamics.diagnose: {stat:.3f} s; the rest (panels, HTML, loading): {median - stat:.3f} s"
    )
    print(f"  median = {median:.3f} s (target <= 3 s) {verdict(median, 3.0)}")
    print(f"  size = {size:.2f} MB (target <= 8 MB) {verdict(size, 8.0)}")
    start = time.perf_counter()
    subprocess.run([*dyn_command(), "report", *map(str, dirs), "--out", str(out)], check=True, capture_output=True)
    print(f"  `dyn report` end to end in a fresh process (imports included): {time.perf_counter() - start:.2f} s")


# -- 2. dyn ls ---------------------------------------------------------------------------------------


def interrupted_run(run_dir: Path, records: int, seed: int) -> None:
    """A run whose process died: status running in config.json, rows in journal segments, no lock held."""
    from dynamics import journal
    from dynamics.run import SCHEMAS, write_json

    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    j = journal.Journal(run_dir / "journal", "steps", SCHEMAS["steps"])
    for k in range(records):  # one batch per record step, as the Recorder writes them
        s = np.arange(k * EVERY + 1, (k + 1) * EVERY + 1)
        j.write(
            {
                "step": s.tolist(),
                "loss": rng.random(EVERY).tolist(),
                "grad_norm": rng.random(EVERY).tolist(),
                "threshold": rng.random(EVERY).tolist(),
                "clipped": [False] * EVERY,
            }
        )
    j.close()
    config = {"clipper": {"kind": "NoClip"}, "every": EVERY, "schema_version": 1, "status": "running"}
    write_json(run_dir / "config.json", config)


def bench_ls(tmp: Path, n_runs: int, repeats: int) -> None:
    from dynamics import load_runs

    root = tmp / "ls"
    n_interrupted = n_runs // 10
    for i in range(n_runs - n_interrupted):
        synthetic_run(root / f"sweep/seed{i:03d}", (10.0, 100.0)[i % 2], i, 1000, layers=False)
    for i in range(n_interrupted):
        interrupted_run(root / f"crashed/run{i:03d}", 1000, i)
    load_runs(root)  # file cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runs = load_runs(root)
        times.append(time.perf_counter() - start)
    statuses = {s: sum(r.status == s for r in runs) for s in ("finished", "interrupted")}
    assert len(runs) == n_runs and statuses == {"finished": n_runs - n_interrupted, "interrupted": n_interrupted}
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*dyn_command(), "ls", str(root), "--json"], check=True, capture_output=True)
        walls.append(time.perf_counter() - start)
    print(f"dyn ls of {n_runs} runs ({n_runs - n_interrupted} finished, {n_interrupted} interrupted with journals)")
    print(f"  dynamics.load_runs: median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    median = statistics.median(walls)
    print(f"  `dyn ls --json` as a subprocess: median {median:.3f} s (target <= 2 s) {verdict(median, 2.0)}")


# -- 3. polling --------------------------------------------------------------------------------------


def poller(base: str, name: str, active, stop, rate_hz: float, counter) -> None:
    """Ask for the run's new rows and the index ``rate_hz`` times a second while ``active`` is set."""
    since = None
    while not stop.is_set():
        if not active.wait(0.05):
            continue
        query = f"?metrics={since}&steps={since}" if since is not None else ""
        with urllib.request.urlopen(f"{base}api/run/{name}{query}", timeout=10) as response:
            data = json.load(response)
        metrics = data["tables"].get("metrics")
        if metrics:
            since = max(metrics["step"])
        urllib.request.urlopen(f"{base}api/runs", timeout=10).read()
        with counter.get_lock():
            counter.value += 1
        time.sleep(1.0 / rate_hz)


def bench_polling(tmp: Path, blocks: int, steps_per_block: int, rate_hz: float) -> None:
    import torch

    from dynamics import Recorder

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    root = tmp / "serve"
    every = 10
    rec = Recorder(model, optimizer, root / "train", every=every)
    x, y = torch.randn(64, 64), torch.randn(64, 1)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    for _ in range(2 * every):  # the run exists with rows before the server starts
        rec.step(closure)
    server = subprocess.Popen([*dyn_command(), "serve", str(root), "--port", "0"], stderr=subprocess.PIPE, text=True)
    base = server.stderr.readline().split(" at ")[1].split()[0]
    ctx = mp.get_context("spawn")
    active, stop, counter = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    client = ctx.Process(target=poller, args=(base, "train", active, stop, rate_hz, counter), daemon=True)
    client.start()
    record_ratio, all_ratio = [], []
    try:
        for _ in range(steps_per_block):  # warm-up
            rec.step(closure)
        for pair in range(blocks):
            means = {}
            order = (False, True) if pair % 2 == 0 else (True, False)
            for polled in order:
                (active.set if polled else active.clear)()
                time.sleep(0.3)  # the client starts or stops
                record, other = [], []
                for _ in range(steps_per_block):
                    recording = (rec.t + 1) % every == 0
                    start = time.perf_counter()
                    rec.step(closure)
                    (record if recording else other).append(time.perf_counter() - start)
                means[polled] = (statistics.fmean(record), statistics.fmean(record + other))
            record_ratio.append(means[True][0] / means[False][0])
            all_ratio.append(means[True][1] / means[False][1])
    finally:
        stop.set()
        active.set()
        client.join(5)
        server.terminate()
        server.wait(10)
        rec.close()
    polls = counter.value
    print(
        f"dyn serve polling while training (MLP 64-256-256-1, Recorder every {every}; "
        f"{blocks} pairs of {steps_per_block}-step blocks; {polls} polls, {rate_hz:g} per second when on)"
    )
    q = np.quantile(all_ratio, [0.25, 0.75])
    print(f"  all steps: with / without poller, median {statistics.median(all_ratio):.4f} (IQR {q[0]:.4f}-{q[1]:.4f})")
    median = statistics.median(record_ratio)
    q = np.quantile(record_ratio, [0.25, 0.75])
    print(f"  record steps: median {median:.4f} (IQR {q[0]:.4f}-{q[1]:.4f}) (target <= 1.02) {verdict(median, 1.02)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000, help="recorded rows per report run")
    parser.add_argument("--runs", type=int, default=200, help="runs for dyn ls")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=12, help="pairs of blocks for the polling cost")
    parser.add_argument("--block-steps", type=int, default=300)
    parser.add_argument("--rate", type=float, default=4.0, help="polls per second when the poller is on")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--only", choices=("report", "ls", "polling"), default=None, help="one of the three")
    args = parser.parse_args()
    if args.quick:
        args.records, args.runs, args.repeats, args.blocks, args.block_steps = 500, 20, 1, 2, 60
    tmp = Path(tempfile.mkdtemp(prefix="dyn-window-"))
    try:
        if args.only in (None, "report"):
            bench_report(tmp, args.records, args.repeats)
        if args.only in (None, "ls"):
            bench_ls(tmp, args.runs, args.repeats)
        if args.only in (None, "polling"):
            bench_polling(tmp, args.blocks, args.block_steps, args.rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
