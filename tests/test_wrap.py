"""wrap(optimizer, clipper): clip inside step(), one state_dict, works with schedulers."""

import functools
import io
import math

import pytest
import torch
from helpers import batches, make_model, train

from autoclip import AutoClip, ClippedOptimizer, wrap


@pytest.fixture(params=[False, True], ids=["host", "device"])
def autoclip(request):
    """AutoClip on the host path, then on the device path: the same semantics, bit for bit."""
    return functools.partial(AutoClip, on_device=request.param)


def _loop(opt, model, data, scheduler=None):
    infos = []
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        infos.append(opt.last_info)
        if scheduler is not None:
            scheduler.step()
    return infos


def test_wrapped_step_equals_clip_then_step(autoclip):
    data = batches(30)
    plain = make_model()
    expected = train(plain, data, lambda ps: autoclip(ps, p=10))
    model = make_model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), autoclip(model.parameters(), p=10))
    infos = _loop(opt, model, data)
    assert [i.threshold for i in infos] == [i.threshold for i in expected]
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_wrapped_optimizer_works_with_a_scheduler_and_a_closure(autoclip):
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), autoclip(model.parameters(), p=50))
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, ClippedOptimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ((x, y),) = batches(1)
    for _ in range(4):
        opt.zero_grad()

        def closure():
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        assert opt.step(closure) is not None
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.1 * 0.5**2
    assert opt.clipper.steps == 4


def test_wrapped_state_dict_holds_both_and_round_trips_weights_only(autoclip):
    data = batches(20)
    model = make_model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), autoclip(model.parameters(), p=10))
    _loop(opt, model, data[:10])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert set(saved["opt"]) == {"optimizer", "clipper"}
    rest = _loop(opt, model, data[10:])

    model2 = make_model(seed=9)
    model2.load_state_dict(saved["model"])
    opt2 = wrap(torch.optim.Adam(model2.parameters(), lr=1e-2), autoclip(model2.parameters(), p=10))
    opt2.load_state_dict(saved["opt"])
    rest2 = _loop(opt2, model2, data[10:])
    assert [i.threshold for i in rest] == [i.threshold for i in rest2]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_wrapped_step_skips_the_optimizer_on_nonfinite_gradients(autoclip):
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), autoclip(model.parameters(), p=10))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert opt.last_info.skip
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    assert math.isinf(opt.last_info.threshold)
