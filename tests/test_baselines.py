"""ClipNorm, ClipValue and NoClip against the torch functions they mirror."""

import math

import pytest
import torch
from helpers import batches, grads_of, make_model

from autoclip import ClipNorm, ClipValue, NoClip


def _twin_with_grads(seed=0):
    """Two identical models holding identical gradients."""
    a, b = make_model(seed), make_model(seed)
    ((x, y),) = batches(1)
    for m in (a, b):
        m.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
    return a, b


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e3])
def test_clip_norm_equals_clip_grad_norm_bit_for_bit(max_norm):
    mine, ref = _twin_with_grads()
    expected_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    info = ClipNorm(mine.parameters(), max_norm).step()
    assert info.grad_norm == expected_norm
    assert info.threshold == max_norm
    assert info.clipped == (max_norm < expected_norm)
    for a, b in zip(grads_of(mine), grads_of(ref)):
        assert torch.equal(a, b)


def test_clip_norm_rescales_a_gradient_exactly_at_max_norm_as_torch_does():
    mine, ref = _twin_with_grads()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), norm)
    ClipNorm(mine.parameters(), norm).step()
    for a, b in zip(grads_of(mine), grads_of(ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip_value", [1e-3, 0.02, 1e3])
def test_clip_value_equals_clip_grad_value(clip_value):
    mine, ref = _twin_with_grads()
    peak = max(p.grad.abs().max().item() for p in ref.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    torch.nn.utils.clip_grad_value_(ref.parameters(), clip_value)
    info = ClipValue(mine.parameters(), clip_value).step()
    assert info.grad_norm == norm
    assert info.threshold == math.inf
    assert info.clipped == (peak > clip_value)
    for a, b in zip(grads_of(mine), grads_of(ref)):
        assert torch.equal(a, b)


def test_no_clip_measures_and_changes_nothing():
    mine, ref = _twin_with_grads()
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    info = NoClip(mine.parameters()).step()
    assert (info.grad_norm, info.threshold, info.clipped) == (norm, math.inf, False)
    for a, b in zip(grads_of(mine), grads_of(ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda ps: ClipNorm(ps, 1.0), lambda ps: ClipValue(ps, 0.1), NoClip])
def test_baselines_skip_nonfinite_steps(make):
    model = make_model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    info = make(model.parameters()).step()
    assert not info.finite and info.skip


def test_baselines_state_dict_round_trip():
    model = make_model()
    for clip in (
        ClipNorm(model.parameters(), 2.0),
        ClipValue(model.parameters(), 0.5),
        NoClip(model.parameters()),
    ):
        for x, y in batches(3):
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            clip.step()
        fresh = type(clip)(
            model.parameters(),
            *([2.0] if isinstance(clip, ClipNorm) else [0.5] if isinstance(clip, ClipValue) else []),
        )
        fresh.load_state_dict(clip.state_dict())
        assert fresh.steps == 3


def test_bad_thresholds_are_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="max_norm"):
        ClipNorm(model.parameters(), 0.0)
    with pytest.raises(ValueError, match="clip_value"):
        ClipValue(model.parameters(), -1.0)


def test_state_dict_and_repr_come_from_the_declared_settings():
    params = list(make_model().parameters())
    cases = [
        (ClipNorm(params, 2.0), {"max_norm": 2.0}, "ClipNorm(max_norm=2, nonfinite='skip')"),
        (ClipValue(params, 0.25, "zero"), {"clip_value": 0.25}, "ClipValue(clip_value=0.25, nonfinite='zero')"),
        (NoClip(params), {}, "NoClip(nonfinite='skip')"),
    ]
    for clip, settings, text in cases:
        assert clip.state_dict() == {"steps": 0, "nonfinite_steps": 0, **settings}
        assert repr(clip) == text
