"""The Recorder's phase calls in a user's own loop: same as step(), AMP with accumulation, resume from state_dict."""

import copy
import gc
import math

import numpy as np
import pandas as pd
import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, load_run

MICRO = 4


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )


def _data(n: int, rows: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(rows, 5, generator=g) * (1 + 9 * (t % 6 == 0)), torch.randn(rows, 1, generator=g))
        for t in range(n)
    ]


def _tables(run_dir) -> dict[str, pd.DataFrame]:
    run = load_run(run_dir)
    return {
        name: getattr(run, name).drop(columns=["time_s"], errors="ignore") for name in ("metrics", "steps", "layers")
    }


def _assert_same_tables(a, b) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


def test_phase_calls_equal_step(tmp_path):
    data = _data(12)

    def train(run_dir, phases: bool):
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        rec = Recorder(model, opt, run_dir, clipper=AutoClip(model.parameters(), p=25), every=2, probes=2)
        for x, y in data:
            closure = lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
            if phases:
                rec.begin()
                opt.zero_grad()
                loss = closure()
                loss.backward()
                if not rec.after_backward().skip:
                    opt.step()
                rec.end(loss, closure=closure)
            else:
                rec.step(closure)
        rec.close()
        return model, torch.rand(3)

    stepped, phased = train(tmp_path / "step", False), train(tmp_path / "phases", True)
    for a, b in zip(stepped[0].state_dict().values(), phased[0].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(stepped[1], phased[1])
    a, b = _tables(tmp_path / "step"), _tables(tmp_path / "phases")
    _assert_same_tables(a, b)
    assert list(a["metrics"].step) == [2, 4, 6, 8, 10, 12]
    assert np.isfinite(a["metrics"].smoothness).all()


def _amp_loop(model, opt, scaler, data, dtype, rec=None, clip=None, overflow_at=(), steps=None, norms=None):
    """The loop of a user with CPU autocast, a GradScaler and 4 micro-batches per step.

    ``norms`` collects the float64 norm of the unscaled accumulated gradients just before the clipper runs.
    """
    for t, (x, y) in enumerate(data, start=1):
        if steps is not None and t not in steps:
            continue
        micro = list(zip(x.chunk(MICRO), y.chunk(MICRO)))

        def full_loss(micro=micro):
            total = 0.0
            for xm, ym in micro:
                with torch.autocast("cpu", dtype=dtype):
                    total = total + torch.nn.functional.mse_loss(model(xm).float(), ym) / MICRO
            return total

        if rec is not None:
            rec.begin()
        loss_total = torch.zeros(())
        for k, (xm, ym) in enumerate(micro):
            with torch.autocast("cpu", dtype=dtype):
                loss = torch.nn.functional.mse_loss(model(xm).float(), ym) / MICRO
            if t in overflow_at and k == 1:
                loss = loss * math.inf
            scaler.scale(loss).backward()
            loss_total += loss.detach()
        scaler.unscale_(opt)
        if norms is not None:
            grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        info = rec.after_backward() if rec is not None else clip.step()
        if not info.skip:
            scaler.step(opt)
        scaler.update()
        if rec is not None:
            rec.end(loss_total, closure=full_loss)
        opt.zero_grad()


def _amp_setup(seed=0):
    model = _net(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return model, opt, scaler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_accumulation_records_unscaled_norm_and_skips_overflow(tmp_path, dtype):
    data = _data(14)
    model, opt, scaler = _amp_setup()
    clip = AutoClip(model.parameters(), p=25)
    rec = Recorder(model, opt, tmp_path / "run", clipper=clip, every=2, probes=2)
    norms: list[float] = []
    _amp_loop(model, opt, scaler, data, dtype, rec=rec, overflow_at={5}, norms=norms)
    rec.close()
    steps = load_run(tmp_path / "run").steps
    assert list(steps.step) == list(range(1, 15))
    finite = np.isfinite(norms)
    assert list(np.flatnonzero(~finite) + 1) == [5]
    np.testing.assert_allclose(steps.grad_norm[finite], np.asarray(norms)[finite], rtol=1e-6)
    assert not np.isfinite(steps.grad_norm[4])
    assert steps.threshold[4] == steps.threshold[3]  # the overflow left the threshold where it was
    assert not steps.clipped[4]
    history = clip.histories[0].values()
    assert len(history) == 13  # one entry per finite step
    assert sorted(history) == sorted(steps.grad_norm[finite])
    for t in range(14):  # every threshold is the percentile of the finite norms seen so far
        seen = steps.grad_norm[: t + 1][np.isfinite(steps.grad_norm[: t + 1])]
        assert steps.threshold[t] == np.percentile(seen, 25)
    metrics = load_run(tmp_path / "run").metrics
    assert np.isfinite(metrics.smoothness).all()
    assert scaler.get_scale() < 2.0**8 * 2 ** (14 // 3)  # the overflow did shrink the scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recording_an_amp_loop_leaves_training_unchanged(tmp_path, dtype):
    data = _data(10)
    results = []
    for record in (False, True):
        model, opt, scaler = _amp_setup()
        clip = AutoClip(model.parameters(), p=25)
        rec = Recorder(model, opt, tmp_path / f"run{record}", clipper=clip, every=2, probes=2) if record else None
        _amp_loop(model, opt, scaler, data, dtype, rec=rec, clip=clip, overflow_at={4})
        if rec is not None:
            rec.close()
        results.append((model.state_dict(), opt.state_dict()["state"], scaler.state_dict(), clip, torch.rand(3)))
    (m0, o0, s0, c0, r0), (m1, o1, s1, c1, r1) = results
    for k in m0:
        assert torch.equal(m0[k], m1[k]), k
    for i in o0:
        for k in o0[i]:
            assert torch.equal(o0[i][k], o1[i][k])
    assert s0 == s1
    assert c0.histories[0].values() == c1.histories[0].values()
    assert torch.equal(r0, r1)


def test_resume_from_state_dict_after_a_crash_records_every_step_once(tmp_path):
    data = _data(20)
    dtype = torch.bfloat16

    def recorder(model, opt, run_dir, resume=False):
        clip = AutoClip(model.parameters(), p=25)
        return Recorder(model, opt, run_dir, clipper=clip, every=2, probes=1, resume=resume)

    model, opt, scaler = _amp_setup()
    rec = recorder(model, opt, tmp_path / "whole")
    _amp_loop(model, opt, scaler, data, dtype, rec=rec, overflow_at={13})
    rec.close()
    whole = (model.state_dict(), _tables(tmp_path / "whole"))

    model, opt, scaler = _amp_setup()
    rec = recorder(model, opt, tmp_path / "crashed")
    _amp_loop(model, opt, scaler, data, dtype, rec=rec, overflow_at={13}, steps=range(1, 11))
    sd = rec.state_dict()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scaler.state_dict(), torch.get_rng_state()))
    _amp_loop(model, opt, scaler, data, dtype, rec=rec, overflow_at={13}, steps=range(11, 16))
    del rec  # the process dies at step 15: no close(), rows of steps 11-15 are in the journal
    gc.collect()
    assert list(load_run(tmp_path / "crashed").metrics.step) == [2, 4, 6, 8, 10, 12, 14]

    model, opt, scaler = _amp_setup(seed=1)  # a fresh process: restore the step-10 checkpoint
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    scaler.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    rec = recorder(model, opt, tmp_path / "crashed", resume=sd)
    assert rec.t == 10
    _amp_loop(model, opt, scaler, data, dtype, rec=rec, overflow_at={13}, steps=range(11, 21))
    rec.close()
    for k, v in whole[0].items():
        assert torch.equal(v, model.state_dict()[k]), k
    resumed = _tables(tmp_path / "crashed")
    assert list(resumed["steps"].step) == list(range(1, 21))
    assert list(resumed["metrics"].step) == list(range(2, 21, 2))
    _assert_same_tables(whole[1], resumed)
