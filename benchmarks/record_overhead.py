"""Recording cost (SPEC section 9): training with a Recorder vs the same training unrecorded,
and the journal's write throughput.

1. The built-in task's network (BLSTM 2x64 on 65-frame batches of 8), Adam, AutoClip p=10.
   Blocks of 100 steps alternate between a plain loop and a Recorder (every 20 steps, one
   probe, per-layer table on), each on its own copy of the model, so a noisy neighbour hits
   both alike. Figure: median recorded block time / median plain block time (target <= 1.08).
2. Journal throughput: rows of the ``steps`` schema appended as flushed record batches
   (target >= 300k rows/s, measured with 1000-row batches). Smaller batches are shown too:
   a record writes 20 steps rows, where the fixed cost per write (~0.1 ms) dominates.

    python benchmarks/record_overhead.py           # about a minute
    python benchmarks/record_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # two cores, possibly a busy neighbour (SPEC section 10)

import numpy as np  # noqa: E402

from autoclip import AutoClip  # noqa: E402
from dynamics import Recorder  # noqa: E402
from dynamics.journal import Journal, read_table  # noqa: E402
from dynamics.run import SCHEMAS  # noqa: E402
from dynamics.tasks.separation.train import SeparationTask, TaskOptions  # noqa: E402


def training_overhead(blocks: int, block: int) -> tuple[float, float]:
    opts = TaskOptions(train_mixtures=64, eval_mixtures=2)
    tasks = {name: SeparationTask(opts) for name in ("plain", "recorded")}
    opt = {n: torch.optim.Adam(t.model.parameters(), lr=opts.lr) for n, t in tasks.items()}
    clip = {n: AutoClip(t.model.parameters(), p=10) for n, t in tasks.items()}
    tmp = tempfile.TemporaryDirectory()
    rec = Recorder(
        tasks["recorded"].model, opt["recorded"], Path(tmp.name) / "run", clipper=clip["recorded"], every=20, probes=1
    )
    times: dict[str, list[float]] = {"plain": [], "recorded": []}
    t = {"plain": 0, "recorded": 0}
    for b in range(blocks + 1):  # block 0 warms up both
        for name in ("plain", "recorded") if b % 2 else ("recorded", "plain"):
            task = tasks[name]
            batches = [task.closure(t[name] + i + 1) for i in range(block)]  # data prep is not timed
            start = time.perf_counter()
            for closure in batches:
                if name == "recorded":
                    rec.step(closure)
                else:
                    opt[name].zero_grad()
                    closure().backward()
                    if not clip[name].step().skip:
                        opt[name].step()
            elapsed = time.perf_counter() - start
            t[name] += block
            if b:
                times[name].append(elapsed)
    rec.close()
    tmp.cleanup()
    return statistics.median(times["plain"]) / block, statistics.median(times["recorded"]) / block


def journal_throughput(rows: int, batch: int) -> float:
    rng = np.random.default_rng(0)
    columns = {
        "step": np.arange(batch, dtype=np.int64),
        "loss": rng.random(batch),
        "grad_norm": rng.random(batch),
        "threshold": rng.random(batch),
        "clipped": rng.random(batch) < 0.9,
    }
    with tempfile.TemporaryDirectory() as d:
        j = Journal(Path(d), "steps", SCHEMAS["steps"])
        start = time.perf_counter()
        for first in range(0, rows, batch):
            # rows arrive as Python lists, as the Recorder hands them over
            j.write({k: (v + first if k == "step" else v).tolist() for k, v in columns.items()})
        j.close()
        elapsed = time.perf_counter() - start
        assert read_table(Path(d), "steps").num_rows == (rows // batch) * batch
    return rows / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=100, help="steps per block (a multiple of 20)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    blocks, block, rows = (2, 40, 100_000) if args.quick else (args.blocks, args.block, 1_000_000)

    plain, recorded = training_overhead(blocks, block)
    ratio = recorded / plain
    print(f"training, {blocks} interleaved blocks of {block} steps (torch {torch.__version__}, 1 thread)")
    print(f"  unrecorded   {1e3 * plain:7.2f} ms/step")
    print(f"  recorded     {1e3 * recorded:7.2f} ms/step  (every 20 steps, 1 probe, layers table)")
    print(f"  recorded / unrecorded = {ratio:.3f} (target <= 1.08) {'PASS' if ratio <= 1.08 else 'MISS'}")
    print("journal (Arrow IPC stream, flushed per batch), rows of the steps table")
    for batch in (20, 100, 1000, 10_000):
        rate = journal_throughput(rows if batch >= 1000 else rows // 5, batch)
        note = "  (one record's steps rows: per-write cost)" if batch == 20 else ""
        print(f"  batches of {batch:>6} rows: {rate:12,.0f} rows/s{note}")
    bulk = journal_throughput(rows, 1000)
    verdict = "PASS" if bulk >= 300_000 else "MISS"
    print(f"  throughput (1000-row batches) = {bulk:,.0f} rows/s (target >= 300,000) {verdict}")


if __name__ == "__main__":
    main()
