"""AutoClip(on_device=True) on a CUDA GPU: no host sync in step(), exact thresholds, and its cost.

1. Sync check: with ``torch.cuda.set_sync_debug_mode("error")`` (any synchronizing CUDA call
   raises), 1,200 training steps of a small CUDA model run with AutoClip(on_device=True) in three
   settings: plain p=10; a window of 50; per-group with nonfinite="zero", with non-finite and
   no-gradient steps mixed in (more steps than PENDING: pending norms merge inside the mode); the
   first two again under torch.use_deterministic_algorithms(True). The recorded ClipInfo tensors
   are read once, after the loop, and every threshold is checked against numpy.percentile of the
   norms that entered (bit for bit, float64). As a control, the host path (on_device=False) must
   raise under the same mode.
2. Cost: per clipping step on a ~1M-parameter model (10 Linear 316x316 layers), the device path
   vs the host path (heaps on the host, one read per step) vs a bare clip_grad_norm_, at
   histories of 10^3..10^6 norms: GPU time between CUDA events around each step (median), and
   the wall time per step of a loop of back-to-back steps (how a training loop feels the sync).

On a machine without CUDA it prints "no CUDA: skipped" and exits 0. ``--device cpu`` runs the
same checks on the CPU (no sync mode there, wall-clock timing): a smoke test of the script.

    python benchmarks/autoclip_gpu_check.py
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

# cuBLAS needs this set before it starts for torch.use_deterministic_algorithms (the last settings)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

from autoclip import AutoClip  # noqa: E402
from autoclip.sorted_history import PENDING  # noqa: E402

HISTORY_SIZES = (10**3, 10**4, 10**5, 10**6)
STEPS = PENDING + 176  # 1,200: a merge of the pending norms happens inside the sync mode


class SyncMode:
    """``torch.cuda.set_sync_debug_mode(mode)`` inside the block, restored after (no-op off CUDA)."""

    def __init__(self, device: torch.device, mode: str):
        self.cuda = device.type == "cuda"
        self.mode = mode

    def __enter__(self) -> None:
        if self.cuda:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self.previous)


# -- 1. no sync, exact thresholds --------------------------------------------------------------------


def small_model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    ).to(device)


def train(
    device: torch.device, make_clip: Callable[[torch.nn.Module], AutoClip], mode: str, deterministic: bool = False
) -> tuple:
    """STEPS steps under sync debug ``mode``; every 37th step has an inf loss, every 53rd no backward."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return _train(device, make_clip, mode)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(device: torch.device, make_clip: Callable[[torch.nn.Module], AutoClip], mode: str) -> tuple:
    model = small_model(device)
    clip = make_clip(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, foreach=True)
    gen = torch.Generator(device=device).manual_seed(1)
    # one forward and backward first, outside the mode: lazy CUDA set-up (cuBLAS handles) is not the clipper's
    model(torch.zeros(2, 32, device=device)).sum().backward()
    infos = []
    with SyncMode(device, mode):
        for t in range(STEPS):
            x = torch.randn(16, 32, device=device, generator=gen) * (1.0 + 9.0 * (t % 7 == 3))
            y = x[:, :1].sin()
            opt.zero_grad(set_to_none=True)
            if t % 53 != 7:  # otherwise a step without backward: no gradient at all
                loss = torch.nn.functional.mse_loss(model(x), y) * (math.inf if t % 37 == 5 else 1.0)
                loss.backward()
            info = clip.step()
            infos.append(info)
            if isinstance(info.skip, torch.Tensor):
                # nonfinite="skip" on the device: `if info.skip` would wait for the GPU, so this loop
                # zeroes a skipped step's gradients on the device instead and always steps
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.masked_fill_(info.skip, 0.0)
            opt.step()
    return clip, infos


def expected_thresholds(norms: np.ndarray, totals: np.ndarray, p: float, window: int | None) -> np.ndarray:
    """numpy.percentile of the norms that entered up to each step (finite and > 0, on a step whose total
    norm is finite); inf while none has."""
    history: list[float] = []
    out = []
    for x, total in zip(norms, totals):
        if math.isfinite(total) and math.isfinite(x) and x > 0:
            history.append(float(x))
        kept = history if window is None else history[-window:]
        out.append(float(np.percentile(kept, p)) if kept else math.inf)
    return np.array(out)


def check_no_sync(device: torch.device) -> bool:
    print(f"1. AutoClip(on_device=True), {STEPS} steps on {device} under set_sync_debug_mode('error')")
    settings = {
        "p=10": lambda m: AutoClip(m.parameters(), p=10, on_device=True),
        "p=25, window=50": lambda m: AutoClip(m.parameters(), p=25, window=50, on_device=True),
        "p=10, per_group, nonfinite='zero'": lambda m: AutoClip(
            [{"params": m[0].parameters()}, {"params": m[2:].parameters()}],
            p=10,
            per_group=True,
            nonfinite="zero",
            on_device=True,
        ),
    }
    # under torch.use_deterministic_algorithms a CUDA scatter reads its indices back (a sync): none may run
    deterministic = {f"{name}, deterministic": settings[name] for name in ("p=10", "p=25, window=50")}
    ok = True
    for name, make in {**settings, **deterministic}.items():
        started = time.perf_counter()
        try:
            clip, infos = train(device, make, "error", deterministic=name in deterministic)
        except RuntimeError as e:
            print(f"   {name:<36} FAIL: a sync inside the loop: {str(e).splitlines()[0]}")
            ok = False
            continue
        elapsed = time.perf_counter() - started
        # the one read, after the loop
        groups = len(clip.histories)
        columns = [torch.stack([i.grad_norm for i in infos])]
        if clip.per_group:
            columns += [torch.stack([i.group_grad_norms[k] for i in infos]) for k in range(groups)]
            columns += [torch.stack([i.group_thresholds[k] for i in infos]) for k in range(groups)]
        else:
            columns += [columns[0], torch.stack([i.threshold for i in infos])]
        host = torch.stack(columns).cpu().numpy()
        totals, norms, thresholds = host[0], host[1 : 1 + groups], host[1 + groups :]
        mismatches = sum(
            int(np.sum(thresholds[k] != expected_thresholds(norms[k], totals, clip.p, clip.window)))
            for k in range(groups)
        )
        nonfinite = clip.nonfinite_steps
        entered = [len(h) for h in clip.histories]
        good = mismatches == 0 and nonfinite == len([t for t in range(STEPS) if t % 37 == 5 and t % 53 != 7])
        ok &= good
        print(
            f"   {name:<36} {'PASS' if good else 'FAIL'}: no sync in {STEPS} steps ({elapsed:.2f} s), "
            f"{mismatches} thresholds differ from numpy.percentile (float64, bit for bit), "
            f"{nonfinite} non-finite steps kept out, histories hold {entered}"
        )
    if device.type == "cuda":  # the control: the host path reads the norm every step, which the mode catches
        try:
            train(device, lambda m: AutoClip(m.parameters(), p=10, on_device=False), "error")
            print("   control: the host path did NOT raise under the sync mode: the check cannot be trusted  FAIL")
            ok = False
        except RuntimeError as e:
            print(f"   control: the host path raises under the same mode, as it must ({str(e).splitlines()[0][:70]})")
    return ok


# -- 2. cost --------------------------------------------------------------------------------------------


class Timer:
    """GPU time of one step between CUDA events (wall time off CUDA), collected and read at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pairs: list = []

    def time(self, step: Callable[[], object]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            self.pairs.append(time.perf_counter() - t0)

    def microseconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [1e3 * s.elapsed_time(e) for s, e in self.pairs]
        return [1e6 * t for t in self.pairs]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_cost(device: torch.device, steps: int, rounds: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(316, 316) for _ in range(10)]).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    saved = [p.grad.clone() for p in params]
    norm = torch.nn.utils.get_total_norm(saved).item()

    def refill() -> None:
        torch._foreach_copy_([p.grad for p in params], saved)

    rng = np.random.default_rng(0)
    histories = {n: (norm * np.exp(rng.normal(0.0, 0.5, n))).tolist() for n in HISTORY_SIZES}
    paths = {"host": False, "device": True}
    clips = {(path, n): AutoClip(params, p=10, on_device=flag) for path, flag in paths.items() for n in HISTORY_SIZES}
    variants: dict[str, Callable[[], object]] = {
        "refill only": lambda: None,  # the loop's own cost, subtracted from the loop times
        "bare": lambda: torch.nn.utils.clip_grad_norm_(params, 0.5 * norm),
    }
    variants.update({f"{path} {n}": clip.step for (path, n), clip in clips.items()})
    event_us: dict[str, list[float]] = {name: [] for name in variants}
    loop_us: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for (_, n), clip in clips.items():
            clip.histories[0].load(histories[n])
            refill()
            clip.step()  # untimed: the first step after a load
        names = list(variants)[r % len(variants) :] + list(variants)[: r % len(variants)]
        for name in names:
            step = variants[name]
            timer = Timer(device)
            for _ in range(steps):  # each step alone, between events
                refill()
                timer.time(step)
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):  # back to back, as a training loop: the host path's read stalls it
                refill()
                step()
            synchronize(device)
            loop = (time.perf_counter() - t0) / steps * 1e6
            if r:
                event_us[name].append(statistics.median(timer.microseconds()))
                loop_us[name].append(loop)

    refill_loop = statistics.median(loop_us["refill only"])
    loop_us = {name: [v - refill_loop for v in values] for name, values in loop_us.items()}
    clock = "GPU µs/step (CUDA events)" if device.type == "cuda" else "µs/step (wall)"
    print(f"2. Cost per clipping step, {sum(p.numel() for p in params):,} parameters, {rounds} rounds of {steps} steps")
    print(
        f"   median over rounds of: {clock} of each step alone | wall µs/step of a back-to-back loop "
        f"(less the loop's gradient refill, {refill_loop:.1f} µs/step)"
    )
    bare_event, bare_loop = statistics.median(event_us["bare"]), statistics.median(loop_us["bare"])
    print(f"   {'variant':<14} {'step alone':>11} {'x bare':>7} {'in a loop':>10} {'x bare':>7}")
    print(f"   {'bare clip':<14} {bare_event:>11.1f} {1.0:>7.2f} {bare_loop:>10.1f} {1.0:>7.2f}")
    for n in HISTORY_SIZES:
        for path in ("host", "device"):
            e, w = statistics.median(event_us[f"{path} {n}"]), statistics.median(loop_us[f"{path} {n}"])
            label = f"{path} 1e{round(math.log10(n))}"
            print(f"   {label:<14} {e:>11.1f} {e / bare_event:>7.2f} {w:>10.1f} {w / bare_loop:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test of this script)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        print(
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"AutoClip(on_device=None) picks on_device={AutoClip([torch.zeros(1, device=device)]).on_device}"
        )
    else:
        torch.set_num_threads(1)
    started = time.perf_counter()
    ok = check_no_sync(device)
    measure_cost(device, args.steps, args.rounds)
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
