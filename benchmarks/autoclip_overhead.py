"""AutoClip step cost: host path vs device path vs a bare clip_grad_norm_, and vs the paper's code.

Times only the clipping step on a ~1M-parameter model (10 Linear layers of 316x316 with bias,
20 gradient tensors) whose gradients are filled once at random, on the CPU, one thread, in
process CPU time. Reported, at histories of 10^3, 10^4, 10^5 and 10^6 norms:

- AutoClip(p=10, on_device=False), the host path (heaps of Python floats, one read per step);
- AutoClip(p=10, on_device=True), the device path (sorted float64 tensors, no read in step()),
  with one merge of its pending norms into the main row per round, as one every PENDING steps;
- each over a bare ``torch.nn.utils.clip_grad_norm_`` (target for the path ``on_device=None``
  picks on the CPU: <= 1.1x at 10^6);
- the paper's reference code (list + per-parameter ``.item()`` + ``np.percentile`` over the whole
  history + ``clip_grad_norm_``) at history 10^5, over the host path at 10^5 (target >= 10x).

Variants are interleaved step by step (rotating order); each figure is the median over rounds
of the per-round mean, with the range (min..max) over rounds. This is a measurement, not a test:
it always exits 0.

    python benchmarks/autoclip_overhead.py            # default, about 75 s of CPU time
    python benchmarks/autoclip_overhead.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

torch.set_num_threads(1)  # two cores, possibly a busy neighbour: no OpenMP spinning

import numpy as np  # noqa: E402

from autoclip import AutoClip  # noqa: E402
from autoclip.sorted_history import PENDING  # noqa: E402

P = 10.0
HISTORY_SIZES = (10**3, 10**4, 10**5, 10**6)
PAPER_HISTORY = 10**5
PATHS = {"host": False, "device": True}


def build_params(layers: int = 10, width: int = 316, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def total_norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))


class PaperReference:
    """The paper's code: a Python list of norms, one ``.item()`` per parameter, np.percentile per step."""

    def __init__(self, params: list[torch.nn.Parameter], p: float, history: list[float]):
        self.params = params
        self.p = p
        self.history = list(history)

    def step(self) -> None:
        total = sum(p.grad.norm().item() ** 2 for p in self.params) ** 0.5
        self.history.append(total)
        clip_value = np.percentile(self.history, self.p)
        torch.nn.utils.clip_grad_norm_(self.params, clip_value)


def exp10(n: int) -> str:
    return f"1e{round(math.log10(n))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--steps", type=int, default=PENDING + 100, help="timed steps per variant per round (one merge each)"
    )
    parser.add_argument(
        "--paper-every", type=int, default=10, help="time the (slow) paper code on every k-th cycle only"
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 3 short rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.paper_every = 3, 30, 5

    params = build_params()
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    norm = total_norm(params)
    n_params = sum(p.numel() for p in params)

    def refill() -> None:
        for g, s in zip(grads, saved, strict=True):
            g.copy_(s)

    # Clipping scales the gradients in place, so they are restored before every timed step, outside
    # the timed region: no variant pays for the refill, and every variant sees the same freshly
    # written (equally cache-warm) gradients of the same norm. Every clipper really scales the
    # gradients on every step: clip_grad_norm_ to half the norm, AutoClip to the 10th percentile of a
    # log-normal history centred on the norm (about 0.53x the norm); the refilled norm sits at the
    # history's median, as a typical new norm does in training.
    max_norm = 0.5 * norm
    rng = np.random.default_rng(0)
    histories = {n: (norm * np.exp(rng.normal(0.0, 0.5, n))).tolist() for n in HISTORY_SIZES}

    clips = {(path, n): AutoClip(params, p=P, on_device=flag) for path, flag in PATHS.items() for n in HISTORY_SIZES}
    paper = PaperReference(params, P, histories[PAPER_HISTORY])

    def reset() -> None:
        # Each round starts from the stated history lengths (a round adds --steps norms to each), after
        # one untimed step. The device path merges its pending norms into its sorted row every
        # PENDING steps: a round of --steps > PENDING (the default) pays one merge per variant,
        # amortized over the round as over PENDING steps in training.
        for (_, n), clip in clips.items():
            clip.histories[0].load(histories[n])
            refill()
            info = clip.step().to_host()
            assert info.clipped and info.threshold < norm, (n, info)
        paper.history = list(histories[PAPER_HISTORY])

    bare_name = "clip_grad_norm_ (bare)"
    auto_names = {key: f"AutoClip {key[0]:<6} history {exp10(key[1])}" for key in clips}
    paper_name = f"paper code, history {exp10(PAPER_HISTORY)}"
    variants: dict[str, Callable[[], object]] = {
        bare_name: lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        **{auto_names[key]: clip.step for key, clip in clips.items()},
        paper_name: paper.step,
    }
    names = list(variants)

    # Interleaved at the step level: each cycle times one step of every variant (the paper code only
    # every --paper-every cycles), in an order rotated from cycle to cycle, so a burst from a noisy
    # neighbour lands on all variants alike. Each round gives a mean per variant; the figure is the
    # median over rounds. Round 0 is a warm-up and is discarded.
    clock = time.process_time_ns
    results: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(args.repeats + 1):
        reset()
        gc.collect()
        total = dict.fromkeys(names, 0)
        count = dict.fromkeys(names, 0)
        steps = args.steps if r else max(10, args.steps // 4)
        for i in range(steps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                if name == paper_name and i % args.paper_every:
                    continue
                step = variants[name]
                refill()
                t0 = clock()
                step()
                total[name] += clock() - t0
                count[name] += 1
        if r:
            for name in names:
                results[name].append(total[name] / count[name] / 1e3)
    elapsed = time.perf_counter() - start

    median = {name: statistics.median(v) for name, v in results.items()}
    bare = median[bare_name]
    default_path = "device" if AutoClip(params).on_device else "host"
    print(
        f"AutoClip overhead: {n_params:,} parameters in {len(params)} tensors, torch {torch.__version__}, CPU, "
        f"1 thread, process CPU time, {args.repeats} interleaved rounds of {args.steps} steps ({elapsed:.1f} s)"
    )
    print(f"{'variant':<36} {'µs/step':>9} {'range over rounds':>19} {'x bare':>7}")
    for name in names:
        v = results[name]
        span = f"{min(v):.1f}..{max(v):.1f}"
        print(f"{name:<36} {median[name]:>9.1f} {span:>19} {median[name] / bare:>7.2f}")

    print()
    print(f"{'history':<8} {'host x bare':>12} {'device x bare':>14} {'device / host':>14}")
    for n in HISTORY_SIZES:
        host, device = median[auto_names["host", n]], median[auto_names["device", n]]
        print(f"{exp10(n):<8} {host / bare:>12.2f} {device / bare:>14.2f} {device / host:>14.2f}")

    print()
    ratio_bare = median[auto_names[default_path, 10**6]] / bare
    ratio_paper = median[paper_name] / median[auto_names["host", PAPER_HISTORY]]
    print(f"on_device=None picks the {default_path} path on the CPU")
    print(
        f"AutoClip ({default_path}) @1e6 / bare clip_grad_norm_ = {ratio_bare:.2f} (target <= 1.1) "
        f"{'PASS' if ratio_bare <= 1.1 else 'MISS'}"
    )
    print(
        f"paper reference @1e5 / AutoClip (host) @1e5 = {ratio_paper:.1f} (target >= 10) "
        f"{'PASS' if ratio_paper >= 10 else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
