"""AutoClip against independent oracles: numpy.percentile, clip_grad_norm_, a plain loop."""

import functools
import math

import numpy as np
import pytest
import torch
from helpers import backward, batches, grads_of, make_model, save_load, total_norm, train

from autoclip import AutoClip, NonFiniteGradientError


@pytest.fixture(params=[False, True], ids=["host", "device"])
def autoclip(request):
    """AutoClip on the host path, then on the device path: the same semantics, bit for bit."""
    return functools.partial(AutoClip, on_device=request.param)


def test_grad_norm_equals_clip_grad_norm_return_value(autoclip):
    model = make_model()
    ((x, y),) = batches(1)
    backward(model, x, y)
    model[2].bias.grad = None  # parameters without a gradient are skipped, as torch does
    reference = [p.detach().clone() for p in model.parameters()]
    for p, r in zip(model.parameters(), reference):
        r.grad = None if p.grad is None else p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm=math.inf).item()
    info = autoclip(model.parameters(), p=100).step()
    assert info.grad_norm == expected


def test_grad_norm_equals_clip_grad_norm_with_mixed_dtypes(autoclip):
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5)),
        torch.nn.Parameter(torch.randn(3, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4)),
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    copies = [p.detach().clone() for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, math.inf).item()
    assert autoclip(params, p=50).step().grad_norm == expected


@pytest.mark.parametrize("p", [0.0, 10.0, 37.5, 90.0])
def test_thresholds_equal_numpy_percentile_of_norm_history(p, autoclip):
    infos = train(make_model(), batches(60), lambda ps: autoclip(ps, p=p))
    norms = [i.grad_norm for i in infos]
    for n, info in enumerate(infos, start=1):
        expected = float(np.percentile(norms[:n], p))
        assert abs(info.threshold - expected) <= 1e-12 * expected
        assert info.clipped == (info.grad_norm > info.threshold)


def test_window_thresholds_use_only_the_last_w_norms(autoclip):
    infos = train(make_model(), batches(60), lambda ps: autoclip(ps, p=25, window=10))
    norms = [i.grad_norm for i in infos]
    for n, info in enumerate(infos, start=1):
        assert info.threshold == float(np.percentile(norms[max(0, n - 10) : n], 25))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_clipped_total_norm_is_min_of_grad_norm_and_threshold(dtype, tol, autoclip):
    model = make_model(dtype=dtype)
    clip = autoclip(model.parameters(), p=10)
    n_clipped = 0
    for x, y in batches(40, dtype=dtype):
        backward(model, x, y)
        info = clip.step()
        after = total_norm(grads_of(model))
        expected = min(info.grad_norm, info.threshold)
        assert abs(after - expected) <= tol * expected
        n_clipped += info.clipped
    assert n_clipped > 20  # p = 10 clips most steps: the check above was exercised


def test_gradient_at_the_threshold_is_untouched(autoclip):
    # p = 0 with the same gradient twice: the threshold equals the norm. The paper's
    # eq. 3 has no epsilon, so nothing changes (clip_grad_norm_ would scale by 1 - 1e-6).
    model = make_model()
    ((x, y),) = batches(1)
    clip = autoclip(model.parameters(), p=0)
    for _ in range(2):
        backward(model, x, y)
        before = grads_of(model)
        info = clip.step()
        assert info.threshold == info.grad_norm and not info.clipped
        assert all(torch.equal(a, b) for a, b in zip(before, grads_of(model)))


def test_p100_run_is_bit_identical_to_no_clipper(autoclip):
    data = batches(50)
    plain, clipped = make_model(), make_model()
    train(plain, data)
    infos = train(clipped, data, lambda ps: autoclip(ps, p=100))
    assert not any(i.clipped for i in infos)
    for a, b in zip(plain.parameters(), clipped.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"p": 10}, {"p": 30, "window": 8}, {"p": 10, "per_group": True}])
def test_state_dict_resume_at_step_25_gives_same_thresholds(kwargs, autoclip):
    data = batches(50)

    def clipper(model):
        if kwargs.get("per_group"):
            return autoclip([{"params": model[0].parameters()}, {"params": model[2:].parameters()}], **kwargs)
        return autoclip(model.parameters(), **kwargs)

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    whole = train(model, data, optimizer=opt, clipper=clipper(model))

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clip = clipper(model)
    first = train(model, data[:25], optimizer=opt, clipper=clip)
    saved = save_load({"model": model.state_dict(), "opt": opt.state_dict(), "clip": clip.state_dict()})

    model = make_model(seed=123)
    model.load_state_dict(saved["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    clip = clipper(model)
    clip.load_state_dict(saved["clip"])
    second = train(model, data[25:], optimizer=opt, clipper=clip)

    assert [i.threshold for i in first + second] == [i.threshold for i in whole]
    assert [i.group_thresholds for i in first + second] == [i.group_thresholds for i in whole]
    assert clip.steps == 50


def test_per_group_thresholds_follow_each_groups_own_history(autoclip):
    model = make_model()
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters()},
        {"params": model[4].parameters()},
    ]
    clip = autoclip(groups, p=20, per_group=True)
    histories = [[], [], []]
    for x, y in batches(30):
        backward(model, x, y)
        expected_norms = [total_norm(p.grad for p in model[i].parameters()) for i in (0, 2, 4)]
        info = clip.step()
        for k in range(3):
            assert float(info.group_grad_norms[k]) == pytest.approx(expected_norms[k], rel=1e-6)
            histories[k].append(float(info.group_grad_norms[k]))
            assert info.group_thresholds[k] == float(np.percentile(histories[k], 20))
            after = total_norm(p.grad for p in model[2 * k].parameters())
            assert after == pytest.approx(min(expected_norms[k], float(info.group_thresholds[k])), rel=1e-6)
        assert float(info.threshold) == pytest.approx(math.sqrt(sum(float(t) ** 2 for t in info.group_thresholds)))


def test_per_group_total_norm_equals_clip_grad_norm(autoclip):
    model = make_model()
    ((x, y),) = batches(1)
    backward(model, x, y)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    clip = autoclip([{"params": model[0].parameters()}, {"params": model[2:].parameters()}], per_group=True)
    assert clip.step().grad_norm == expected


def _poison(model, value):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    next(model.parameters()).grad.view(-1)[0] = value


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_history_and_grads_alone(bad, autoclip):
    model = make_model()
    clip = autoclip(model.parameters(), p=10)
    train(model, batches(5), clipper=clip)
    history = sorted(clip.histories[0].values())
    threshold = clip.threshold
    _poison(model, bad)
    before = grads_of(model)
    info = clip.step()
    assert not info.finite and info.skip and not info.clipped
    assert info.threshold == threshold
    assert sorted(clip.histories[0].values()) == history
    for a, b in zip(before, grads_of(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert clip.nonfinite_steps == 1


def test_nonfinite_raise_raises_a_clear_error():
    model = make_model()
    clip = AutoClip(model.parameters(), nonfinite="raise")
    _poison(model, float("inf"))
    with pytest.raises(NonFiniteGradientError, match="gradient norm is inf at step 1"):
        clip.step()
    assert len(clip.histories[0]) == 0


def test_nonfinite_zero_zeroes_gradients_and_keeps_history(autoclip):
    model = make_model()
    clip = autoclip(model.parameters(), nonfinite="zero")
    _poison(model, float("nan"))
    info = clip.step()
    assert not info.finite and not info.skip
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(model))
    assert len(clip.histories[0]) == 0


def test_skipped_nonfinite_steps_in_a_run_stay_out_of_the_history(autoclip):
    model = make_model()
    clip = autoclip(model.parameters(), p=10)
    finite_norms = []
    for t, (x, y) in enumerate(batches(30)):
        backward(model, x, y)
        if t % 5 == 2:
            _poison(model, float("nan"))
        info = clip.step()
        if info.finite:
            finite_norms.append(info.grad_norm)
        assert info.threshold == float(np.percentile(finite_norms, 10))
    assert len(clip.histories[0]) == 24


def test_one_host_transfer_per_step(monkeypatch):
    model = make_model()
    ((x, y),) = batches(1)
    clips = [
        AutoClip(model.parameters(), p=10),
        AutoClip([{"params": model[0].parameters()}, {"params": model[2:].parameters()}], per_group=True),
    ]
    count = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, **k):
            count["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for clip in clips:
        for _ in range(3):
            backward(model, x, y)
            count["n"] = 0
            clip.step()
            assert count["n"] == 1


def test_bad_arguments_are_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="p must be in"):
        AutoClip(model.parameters(), p=101)
    with pytest.raises(ValueError, match="nonfinite"):
        AutoClip(model.parameters(), nonfinite="ignore")
    with pytest.raises(ValueError, match="empty parameter list"):
        AutoClip([])
    clip = AutoClip(model.parameters(), per_group=True)
    with pytest.raises(ValueError, match="histories"):
        clip.load_state_dict(AutoClip([{"params": [p]} for p in model.parameters()], per_group=True).state_dict())
