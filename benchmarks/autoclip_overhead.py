"""AutoClip step cost: vs a bare clip_grad_norm_, and vs the paper's code.

Times only the clipping step on a ~1M-parameter model (10 Linear layers of 316x316 with bias,
20 gradient tensors) whose gradients are filled once at random. Reported figures:

- AutoClip(p=10) with a history of 10^6 norms, over a bare ``torch.nn.utils.clip_grad_norm_``
  (target <= 1.2x);
- the paper's reference code (list + per-parameter ``.item()`` + ``np.percentile`` over the whole
  history + ``clip_grad_norm_``) at history 10^5, over AutoClip at history 10^5 (target >= 10x).

Variants are interleaved step by step (rotating order); each figure is the median over rounds
of the per-round mean. This is a measurement, not a test: it always exits 0.

    python benchmarks/autoclip_overhead.py            # default, well under a minute
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

P = 10.0
HISTORY_SIZES = (10**3, 10**4, 10**5, 10**6)
PAPER_HISTORY = 10**5


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--steps", type=int, default=600, help="timed steps per variant per round")
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
    # written (equally cache-warm) gradients of the same norm. Both clippers really scale the
    # gradients on every step: clip_grad_norm_ to half the norm, AutoClip to the 10th percentile of a
    # log-normal history centred on the norm (about 0.53x the norm); the refilled norm sits at the
    # history's median, as a typical new norm does in training.
    max_norm = 0.5 * norm
    rng = np.random.default_rng(0)
    histories = {n: (norm * np.exp(rng.normal(0.0, 0.5, n))).tolist() for n in HISTORY_SIZES}

    clips = {n: AutoClip(params, p=P) for n in HISTORY_SIZES}
    for n, clip in clips.items():
        clip.histories[0].load(histories[n])
        refill()
        info = clip.step()
        assert info.clipped and info.threshold < norm, (n, info)
    paper = PaperReference(params, P, histories[PAPER_HISTORY])

    def reset() -> None:
        # Each round starts from the stated history lengths (a round adds --steps norms to each).
        for n, clip in clips.items():
            clip.histories[0].load(histories[n])
        paper.history = list(histories[PAPER_HISTORY])

    def exp10(n: int) -> str:
        return f"1e{round(math.log10(n))}"

    bare_name = "clip_grad_norm_ (bare)"
    auto_names = {n: f"AutoClip p=10, history {exp10(n)}" for n in HISTORY_SIZES}
    paper_name = f"paper code, history {exp10(PAPER_HISTORY)}"
    variants: dict[str, Callable[[], object]] = {
        bare_name: lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        **{auto_names[n]: clip.step for n, clip in clips.items()},
        paper_name: paper.step,
    }
    names = list(variants)

    # Interleaved at the step level: each cycle times one step of every variant (the paper code only
    # every --paper-every cycles), in an order rotated from cycle to cycle, so a burst from a noisy
    # neighbour lands on all variants alike. Each round gives a mean per variant; the figure is the
    # median over rounds. Round 0 is a warm-up and is discarded.
    clock = time.perf_counter_ns
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
    print(
        f"AutoClip overhead: {n_params:,} parameters in {len(params)} tensors, torch {torch.__version__}, "
        f"1 thread, {args.repeats} interleaved rounds of {args.steps} steps ({elapsed:.1f} s)"
    )
    print(f"{'variant':<34} {'µs/step':>10} {'min':>10} {'max':>10} {'x bare':>8}")
    for name in names:
        v = results[name]
        print(f"{name:<34} {median[name]:>10.1f} {min(v):>10.1f} {max(v):>10.1f} {median[name] / bare:>8.2f}")

    ratio_bare = median[auto_names[10**6]] / bare
    ratio_paper = median[paper_name] / median[auto_names[PAPER_HISTORY]]
    print()
    print(
        f"AutoClip @1e6 / bare clip_grad_norm_ = {ratio_bare:.2f} (target <= 1.2) "
        f"{'PASS' if ratio_bare <= 1.2 else 'MISS'}"
    )
    print(
        f"paper reference @1e5 / AutoClip @1e5 = {ratio_paper:.1f} (target >= 10) "
        f"{'PASS' if ratio_paper >= 10 else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
