"""AutoClip with torch.amp.GradScaler on CPU: clip after unscale_, skipped steps stay out."""

import numpy as np
import pytest
import torch
from helpers import batches, make_model

from autoclip import AutoClip, wrap


def _reference_norms(data):
    """Gradient norms of a plain float32 run without scaling, clipping or stepping."""
    model = make_model()
    out = []
    for x, y in data:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        out.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
    return out


def test_clip_after_unscale_sees_the_true_norm():
    data = batches(10)
    expected = _reference_norms(data)
    model = make_model()
    # lr 0 keeps the parameters fixed, so every step's gradient matches the reference
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    clip = AutoClip(model.parameters(), p=10)
    for (x, y), norm in zip(data, expected):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.unscale_(opt)
        info = clip.step()
        assert info.grad_norm == pytest.approx(norm, rel=1e-6)
        scaler.step(opt)
        scaler.update()


def _overflowing_run(use_wrap: bool):
    """Every 4th step's scaled loss overflows to inf: those steps must stay out of the history."""
    data = batches(24)
    model = make_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    clip = AutoClip(model.parameters(), p=25)
    opt = wrap(base, clip) if use_wrap else base
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    norms, overflowed = [], 0
    for t, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if t % 4 == 1:
            loss = loss * 1e38  # scaled by 2**8 this is inf in float32
            overflowed += 1
        scaler.scale(loss).backward()
        if use_wrap:
            scaler.step(opt)  # unscales, then our step clips, unless the scaler skips it
            info = opt.last_info if t % 4 != 1 else None
        else:
            scaler.unscale_(opt)
            info = clip.step()
            scaler.step(opt)
        scaler.update()
        if info is not None and info.finite:
            norms.append(info.grad_norm)
            assert info.threshold == float(np.percentile(norms, 25))
    return clip, norms, overflowed


@pytest.mark.parametrize("use_wrap", [False, True])
def test_steps_the_scaler_skips_never_enter_the_history(use_wrap):
    clip, norms, overflowed = _overflowing_run(use_wrap)
    assert overflowed == 6
    assert len(clip.histories[0]) == len(norms) == 24 - overflowed
    assert sorted(clip.histories[0].values()) == sorted(norms)
