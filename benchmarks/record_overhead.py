"""Recording cost: training with a Recorder vs the same training unrecorded, what each quantity
adds, and the journal's write throughput.

1. The built-in task's network (BLSTM 2x64 on 65-frame batches of 8), Adam, AutoClip p=10.
   Variants, each on its own copy of the model, run in interleaved blocks of 100 steps (the
   order rotates every block), so a noisy neighbour hits them alike; a block is timed in
   process CPU time (one thread), the steady state only: setup, data preparation and close
   are not timed. Printed per variant: median ms/step, the range over blocks, and the ratio
   to the unrecorded loop. Targets: default quantities (every 20 steps, one probe, layers
   table) <= 1.08, also with a TensorBoard logger; a quantity that is off (its ``every`` never
   falls in the run) costs nothing.
2. Curvature and noise scale on the same network, one measurement at a time (process CPU time,
   median of a few): Sharpness (20 Hessian-vector products) by finite differences of gradients
   vs double backward, HessianTrace (10 products), GradientNoiseScale from 4 micro-batches, and
   the 4 gradient snapshots ``rec.micro_batch()`` takes on a record step; each also in training
   steps, and as the share of training time at one measurement per 20 or 1000 steps.
3. Journal throughput: rows of the ``steps`` schema appended as flushed record batches
   (target >= 300k rows/s, measured with 1000-row batches). Smaller batches are shown too:
   a record writes 20 steps rows, where the fixed cost per write (~0.1 ms) dominates.

    python benchmarks/record_overhead.py           # a few minutes
    python benchmarks/record_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # two cores, possibly a busy neighbour

import numpy as np  # noqa: E402

from autoclip import AutoClip  # noqa: E402
from dynamics import Recorder, loggers  # noqa: E402
from dynamics.checkpoint import rng_state  # noqa: E402
from dynamics.journal import Journal, read_table  # noqa: E402
from dynamics.quantities import (  # noqa: E402
    DistanceFromInit,
    GradientNoiseScale,
    HessianTrace,
    Sharpness,
    StepContext,
    UpdateCosine,
    UpdateRatio,
)
from dynamics.run import SCHEMAS  # noqa: E402
from dynamics.tasks.separation.losses import separation_loss  # noqa: E402
from dynamics.tasks.separation.train import SeparationTask, TaskOptions  # noqa: E402

# name -> the quantities recorded (None: no Recorder at all)
VARIANTS = {
    "unrecorded": None,
    "default (step size, smoothness K=1, layers)": lambda: Recorder.default_quantities(),
    "default, no probe (probes=0)": "no-probe",
    "default + TensorBoard logger": "tensorboard",
    "default + quantity that is off": lambda: [*Recorder.default_quantities(), Sharpness(every=10**9)],
    "default + distance, cosine, update ratio": lambda: [
        *Recorder.default_quantities(),
        DistanceFromInit(),
        UpdateCosine(),
        UpdateRatio(),
    ],
    "default + sharpness every 100 (20 HVPs)": lambda: [*Recorder.default_quantities(), Sharpness(every=100)],
}


def training_overhead(blocks: int, block: int, names: list[str]) -> dict[str, list[float]]:
    """CPU seconds per step of each variant, one value per timed block."""
    opts = TaskOptions(train_mixtures=64, eval_mixtures=2, data="synthetic")
    tmp = tempfile.TemporaryDirectory()
    loops = {}
    for i, name in enumerate(names):
        task = SeparationTask(opts)
        opt = torch.optim.Adam(task.model.parameters(), lr=opts.lr)
        clip = AutoClip(task.model.parameters(), p=10)
        spec = VARIANTS[name]
        rec = None
        if spec is not None:
            quantities = Recorder.default_quantities() if isinstance(spec, str) else spec()
            probes = 0 if spec == "no-probe" else 1
            run_dir = Path(tmp.name) / f"run{i}"
            logs = [loggers.tensorboard(Path(tmp.name) / f"tb{i}")] if spec == "tensorboard" else None
            rec = Recorder(
                task.model, opt, run_dir, clipper=clip, every=20, probes=probes, quantities=quantities, loggers=logs
            )
        loops[name] = (task, opt, clip, rec)
    times: dict[str, list[float]] = {name: [] for name in names}
    done = dict.fromkeys(names, 0)
    for b in range(blocks + 1):  # block 0 warms every variant up
        order = names[b % len(names) :] + names[: b % len(names)]
        for name in order:
            task, opt, clip, rec = loops[name]
            batches = [task.closure(done[name] + i + 1) for i in range(block)]  # data prep is not timed
            start = time.process_time()
            for closure in batches:
                if rec is not None:
                    rec.step(closure)
                else:
                    opt.zero_grad()
                    closure().backward()
                    if not clip.step().skip:
                        opt.step()
            elapsed = time.process_time() - start
            done[name] += block
            if b:
                times[name].append(elapsed / block)
    for *_, rec in loops.values():
        if rec is not None:
            rec.close()
            for logger in rec.loggers:
                logger.close()
    tmp.cleanup()
    return times


def _micro_closures(task: SeparationTask, t: int, n: int) -> list:
    """Step t's batch as ``n`` micro-batch losses, each scaled by 1/n (gradient accumulation)."""
    mix_spec, src_spec, src_wav = task.batch(t)
    size = len(mix_spec) // n

    def part(i: int):
        rows = slice(i * size, (i + 1) * size)
        spec = mix_spec[rows]
        return lambda: (
            separation_loss(task.opts.loss, task.model(spec.abs()), spec, src_spec[rows], src_wav[rows], task.stft) / n
        )

    return [part(i) for i in range(n)]


def measurement_costs(repeats: int, micro_batches: int = 4) -> dict[str, float]:
    """CPU seconds of one measurement of each curvature / noise quantity on the task's network (median of repeats)."""
    opts = TaskOptions(train_mixtures=64, eval_mixtures=2, data="synthetic")
    task = SeparationTask(opts)
    opt = torch.optim.Adam(task.model.parameters(), lr=opts.lr)
    clip = AutoClip(task.model.parameters(), p=10)
    names = [n for n, p in task.model.named_parameters() if p.requires_grad]
    params = [p for p in task.model.parameters() if p.requires_grad]
    closure = task.closure(20)
    micro = []
    opt.zero_grad()
    for part in _micro_closures(task, 20, micro_batches):
        part().backward()
        micro.append([p.grad.detach().clone() for p in params])
    info = clip.step()
    ctx = StepContext(
        step=20,
        epoch=0,
        model=task.model,
        optimizer=opt,
        names=names,
        params=params,
        before=[p.detach().clone() for p in params],
        update=[torch.zeros_like(p) for p in params],
        grads=micro[-1],
        loss=closure().detach(),
        info=info,
        closure=closure,
        rng=rng_state(task.device),
        device=task.device,
        micro_grads=micro,
    )
    jobs = {
        "training step (forward, backward, clip, Adam)": None,
        "Sharpness(iters=20, hvp='fd')": Sharpness(iters=20, hvp="fd"),
        "Sharpness(iters=20, hvp='autograd')": Sharpness(iters=20, hvp="autograd"),
        "HessianTrace(samples=10, hvp='fd')": HessianTrace(samples=10, hvp="fd"),
        "GradientNoiseScale (4 micro-batches)": GradientNoiseScale(micro_batch_size=2),
        "rec.micro_batch() snapshots (4 on a record step)": "snapshots",
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            start = time.process_time()
            if job is None:
                opt.zero_grad()
                closure().backward()
                if not clip.step().skip:
                    opt.step()
            elif job == "snapshots":
                for _ in range(micro_batches):
                    [p.grad.detach().clone() for p in params]
            else:
                job.compute(ctx)
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
    parser.add_argument("--blocks", type=int, default=6, help="timed blocks per variant")
    parser.add_argument("--block", type=int, default=100, help="steps per block (a multiple of 100)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each curvature/noise quantity")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few blocks, default variants only")
    parser.add_argument("--only", default="", help="variants whose names contain one of these, comma-separated")
    args = parser.parse_args()
    blocks, block, rows = (2, 100, 100_000) if args.quick else (args.blocks, args.block, 1_000_000)
    names = list(VARIANTS)[:3] if args.quick else list(VARIANTS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        names = [n for n in names if n == "unrecorded" or n.startswith("default (") or any(w in n for w in wanted)]

    times = training_overhead(blocks, block, names)
    base = statistics.median(times["unrecorded"])
    print(
        f"training, {blocks} interleaved blocks of {block} steps, "
        f"process CPU time (torch {torch.__version__}, 1 thread)"
    )
    for name in names:
        median, low, high = statistics.median(times[name]), min(times[name]), max(times[name])
        ratio = median / base
        targeted = name.startswith("default (") or name == "default + TensorBoard logger"
        print(
            f"  {name:45s} {1e3 * median:7.2f} ms/step  [{1e3 * low:.2f}, {1e3 * high:.2f}]  x{ratio:.3f}"
            + (f" (target <= 1.08) {'PASS' if ratio <= 1.08 else 'MISS'}" if targeted else "")
        )
    if "default + quantity that is off" in times:
        off = statistics.median(times["default + quantity that is off"])
        default = statistics.median(times[names[1]])
        print(f"  a quantity that is off / default = {off / default:.3f} (nothing measured: ~1.00 within noise)")
    if not args.quick:
        costs = measurement_costs(args.repeats)
        step = costs["training step (forward, backward, clip, Adam)"]
        print(f"one measurement on the same network, median of {args.repeats}, process CPU time")
        for name, seconds in costs.items():
            share = "" if name.startswith("training") else f"  {100 * seconds / (20 * step):6.1f}% at every=20, "
            share += "" if name.startswith("training") else f"{100 * seconds / (1000 * step):5.2f}% at every=1000"
            print(f"  {name:50s} {seconds:8.3f} s  = {seconds / step:6.1f} training steps{share}")
        fd, exact = costs["Sharpness(iters=20, hvp='fd')"], costs["Sharpness(iters=20, hvp='autograd')"]
        print(f"  sharpness fd / autograd = {fd / exact:.2f}")
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
