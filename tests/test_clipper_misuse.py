"""Clippers under misuse and edge cases: steps without gradients, complex and duplicate parameters,
named parameters, copies of wrapped optimizers, LBFGS closures, bad settings and mismatched states."""

import copy
import functools
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import backward, batches, make_model, save_load

from autoclip import AutoClip, ClipNorm, ClipValue, NoClip, RunningPercentile, wrap


@pytest.fixture(params=[False, True], ids=["host", "device"])
def autoclip(request):
    """AutoClip on the host path, then on the device path: the same semantics, bit for bit."""
    return functools.partial(AutoClip, on_device=request.param)


KINDS = {
    "autoclip": lambda ps: AutoClip(ps, p=10),
    "autoclip-device": lambda ps: AutoClip(ps, p=10, on_device=True),
    "clipnorm": lambda ps: ClipNorm(ps, 0.5),
    "clipvalue": lambda ps: ClipValue(ps, 0.01),
    "noclip": NoClip,
}


def _two_groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2:].parameters()}]


# -- steps without gradients -------------------------------------------------------------------


def test_step_without_gradients_does_not_enter_history(autoclip):
    model = make_model()
    clip = autoclip(model.parameters(), p=0)
    norms = []
    for t, (x, y) in enumerate(batches(12)):
        if t % 3 == 1:
            model.zero_grad(set_to_none=True)  # an optimizer step without backward
            before = clip.threshold
            info = clip.step()
            assert (info.grad_norm, info.threshold, info.clipped, info.finite, info.skip) == (
                0.0,
                before,
                False,
                True,
                False,
            )
            assert len(clip.histories[0]) == len(norms)
            continue
        backward(model, x, y)
        info = clip.step()
        norms.append(info.grad_norm)
        assert info.threshold == float(np.percentile(norms, 0))
        assert info.threshold > 0
    assert clip.steps == 12


def test_first_step_without_gradients_reports_infinite_threshold(autoclip):
    model = make_model()
    for kwargs in ({"p": 10}, {"p": 0, "window": 3}, {"p": 10, "per_group": True}):
        groups = _two_groups(model) if kwargs.get("per_group") else model.parameters()
        info = autoclip(groups, **kwargs).step()
        assert info.grad_norm == 0.0 and info.threshold == math.inf and not info.clipped
    info = autoclip(_two_groups(model), per_group=True).step()
    assert info.group_grad_norms == (0.0, 0.0) and info.group_thresholds == (math.inf, math.inf)


def test_all_zero_gradients_do_not_enter_history(autoclip):
    # zero_grad(set_to_none=False) leaves zeros where no backward ran: still no measurement of the scale
    model = make_model()
    clip = autoclip(model.parameters(), p=0)
    (x, y), _ = batches(2)
    backward(model, x, y)
    first = clip.step()
    model.zero_grad(set_to_none=False)
    info = clip.step()
    assert info.grad_norm == 0.0 and info.threshold == first.grad_norm and not info.clipped
    assert clip.histories[0].values() == [first.grad_norm]


def test_windowed_history_skips_steps_without_gradients(autoclip):
    model = make_model()
    clip = autoclip(model.parameters(), p=30, window=3)
    norms = []
    for t, (x, y) in enumerate(batches(15)):
        if t % 2:
            model.zero_grad(set_to_none=True)
            assert clip.step().threshold == float(np.percentile(norms[-3:], 30))
            continue
        backward(model, x, y)
        info = clip.step()
        norms.append(info.grad_norm)
        assert info.threshold == float(np.percentile(norms[-3:], 30))
    assert clip.histories[0].values() == norms[-3:]


def _frozen_then_unfrozen(model, clip, data, frozen_steps):
    """Train with group 1 (model[2:]) frozen for the first steps; returns the infos."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    infos = []
    for t, (x, y) in enumerate(data):
        for p in model[2:].parameters():
            p.requires_grad_(t >= frozen_steps)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        infos.append(clip.step())
        opt.step()
    return infos


def test_per_group_frozen_then_unfrozen_group_keeps_training_at_p0(autoclip):
    model = make_model()
    start = [p.detach().clone() for p in model[2:].parameters()]
    clip = autoclip(_two_groups(model), p=0, per_group=True)
    infos = _frozen_then_unfrozen(model, clip, batches(12), frozen_steps=5)
    for info in infos[:5]:
        assert info.group_grad_norms[1] == 0.0 and info.group_thresholds[1] == math.inf
    assert len(clip.histories[1]) == 7 and len(clip.histories[0]) == 12
    for k in (0, 1):
        own = [i.group_grad_norms[k] for i in infos if i.group_grad_norms[k] > 0]
        assert clip.histories[k].value() == float(np.percentile(own, 0)) > 0
    assert infos[5].group_thresholds[1] == infos[5].group_grad_norms[1] > 0  # its own first norm, not 0
    assert all(not torch.equal(a, b) for a, b in zip(start, model[2:].parameters()))


def test_per_group_history_round_trips_with_a_frozen_group(autoclip):
    data = batches(16)
    whole_model = make_model()
    whole = _frozen_then_unfrozen(
        whole_model, autoclip(_two_groups(whole_model), p=20, per_group=True, window=6), data, frozen_steps=10
    )
    model = make_model()
    clip = autoclip(_two_groups(model), p=20, per_group=True, window=6)
    first = _frozen_then_unfrozen(model, clip, data[:8], frozen_steps=10)
    saved = save_load(clip.state_dict())
    assert len(saved["histories"][1]) == 0
    clip = autoclip(_two_groups(model), p=20, per_group=True, window=6)
    clip.load_state_dict(saved)
    second = _frozen_then_unfrozen(model, clip, data[8:], frozen_steps=2)
    assert [i.group_thresholds for i in first + second] == [i.group_thresholds for i in whole]
    for a, b in zip(model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_every_clipper_accepts_a_step_without_gradients(kind):
    model = make_model()
    expected = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5).item()  # torch: 0.0, no error
    info = KINDS[kind](model.parameters()).step()
    assert info.grad_norm == expected == 0.0
    assert not info.clipped and info.finite and not info.skip
    assert all(p.grad is None for p in model.parameters())


# -- complex parameters ------------------------------------------------------------------------


def _complex_params(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(7, dtype=torch.complex64, generator=g)),
        torch.nn.Parameter(torch.randn(3, 2, generator=g)),
        torch.nn.Parameter(torch.randn(4, dtype=torch.complex64, generator=g)),
    ]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g) * scale
    return params


def _twins(params):
    out = []
    for p in params:
        c = p.detach().clone().requires_grad_()
        c.grad = p.grad.clone()
        out.append(c)
    return out


@pytest.mark.parametrize("max_norm", [0.1, 2.0, 1e3])
def test_clip_norm_matches_clip_grad_norm_on_complex_parameters(max_norm):
    mine = _complex_params()
    ref = _twins(mine)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm).item()
    info = ClipNorm(mine, max_norm).step()
    assert info.grad_norm == expected
    assert info.clipped == (max_norm < expected)
    for a, b in zip(mine, ref):
        assert a.grad.dtype == b.grad.dtype and torch.equal(a.grad, b.grad)


def test_complex_gradient_norm_is_vector_norm_for_autoclip_and_noclip(autoclip):
    params = _complex_params()
    # independent oracle: sqrt of the sum of |z|^2 over every element, in float64
    exact = math.sqrt(sum((p.grad.to(torch.complex128).abs() ** 2).sum().item() for p in params))
    torch_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()  # clip_grad_norm_'s norm
    assert torch_norm == pytest.approx(exact, rel=1e-6)
    assert torch.linalg.vector_norm(params[0].grad).item() == pytest.approx(
        math.sqrt((params[0].grad.abs() ** 2).sum().item()), rel=1e-6
    )
    assert NoClip(params).step().grad_norm == torch_norm
    assert autoclip(params, p=100).step().grad_norm == torch_norm


def test_autoclip_scales_complex_gradients_by_the_real_factor(autoclip):
    large = _complex_params()
    clip = autoclip(large, p=0)
    threshold = float(clip.step().grad_norm)
    for p in large:
        p.grad = p.grad * 5.0  # a larger gradient next: p = 0 clips it to the first norm
    before = [p.grad.clone() for p in large]
    info = clip.step()
    assert info.clipped and info.threshold == threshold
    coef = threshold / float(info.grad_norm)
    for b, p in zip(before, large):
        assert torch.equal(p.grad, b * coef)  # phase kept: the real and imaginary parts scale alike
    after = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.to(torch.complex128)) for p in large])
    )
    assert after.item() == pytest.approx(threshold, rel=1e-6)


def test_clip_value_refuses_complex_parameters():
    params = _complex_params()
    with pytest.raises(NotImplementedError):  # the oracle: torch cannot clamp complex gradients
        torch.nn.utils.clip_grad_value_(_twins(params), 0.1)
    with pytest.raises(ValueError, match="complex.*ClipNorm or AutoClip"):
        ClipValue(params, 0.1)


# -- copies of wrapped optimizers ---------------------------------------------------------------


def _random_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * (30.0 if seed % 5 == 0 else 1.0) for p in params]


def _step_with(opt, grads):
    for p, g in zip(opt.param_groups[0]["params"], grads):
        p.grad = g.clone()
    opt.step()
    return opt.last_info


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_wrapped_optimizer_is_independent_and_steps_identically(how, autoclip):
    model = make_model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), autoclip(model.parameters(), p=20, window=8))
    params = list(model.parameters())
    for seed in range(6):
        _step_with(opt, _random_grads(params, seed))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(params, twin_params))
    assert all(a is b for a, b in zip(twin.clipper.groups[0], twin_params))  # one set of parameters, shared
    assert twin.last_info == opt.last_info
    infos = []
    for seed in range(6, 20):
        grads = _random_grads(params, seed)
        infos.append(_step_with(opt, grads))
        assert infos[-1] == _step_with(twin, grads)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert sum(i.clipped for i in infos) >= 5  # the copied history did the clipping
    # independence: stepping the original leaves the copy alone
    snapshot = [p.detach().clone() for p in twin_params]
    history = twin.clipper.histories[0].values()
    _step_with(opt, _random_grads(params, 99))
    assert twin.clipper.histories[0].values() == history and twin.clipper.steps == 20
    assert all(torch.equal(a, b) for a, b in zip(snapshot, twin_params))


@pytest.mark.parametrize("kind", KINDS)
def test_bare_clippers_deepcopy_and_pickle(kind):
    model = make_model()
    clip = KINDS[kind](model.parameters())
    for x, y in batches(4):
        backward(model, x, y)
        clip.step()
    for steps, duplicate in enumerate((copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))), start=4):
        twin = duplicate(clip)
        assert twin.state_dict().keys() == clip.state_dict().keys() and twin.steps == steps
        for p, q in zip(clip.groups[0], twin.groups[0]):
            q.grad = p.grad.clone()
        assert twin.step() == clip.step()


# -- closures and LBFGS -------------------------------------------------------------------------


def _lbfgs_run(model, steps, line_search, clipper=None, inner_clip=None, norms=None):
    """LBFGS where each closure evaluation draws the next batch (so gradient norms vary); wrapped when
    ``clipper`` is given, else ``inner_clip`` (if any) clips inside the closure."""
    data = iter(batches(200, seed=3))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=6, line_search_fn=line_search)
    if clipper is not None:
        opt = wrap(opt, clipper)
    losses, infos = [], []

    def closure():
        x, y = next(data)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if norms is not None:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        if inner_clip is not None:
            inner_clip.step()
        return loss

    for _ in range(steps):
        losses.append(opt.step(closure).item())
        if clipper is not None:
            infos.extend(opt.step_infos)
    return losses, infos


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_wrapped_with_p100_is_bit_identical_to_plain_lbfgs(line_search, autoclip):
    plain, wrapped = make_model(), make_model()
    plain_losses, _ = _lbfgs_run(plain, 3, line_search)
    losses, infos = _lbfgs_run(wrapped, 3, line_search, clipper=autoclip(wrapped.parameters(), p=100))
    assert losses == plain_losses
    assert len(infos) > 3 and not any(i.clipped for i in infos)  # LBFGS evaluated the closure many times
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_lbfgs_wrapped_clips_every_closure_evaluation(line_search, autoclip):
    # oracle: plain LBFGS whose closure calls its own AutoClip after backward
    reference = make_model()
    ref_losses, _ = _lbfgs_run(reference, 3, line_search, inner_clip=autoclip(reference.parameters(), p=30))
    model = make_model()
    norms = []
    losses, infos = _lbfgs_run(model, 3, line_search, clipper=autoclip(model.parameters(), p=30), norms=norms)
    assert losses == ref_losses
    for a, b in zip(reference.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert [i.grad_norm for i in infos] == norms  # the recorded norms are the closure's gradient norms
    for n, info in enumerate(infos, start=1):
        expected = float(np.percentile(norms[:n], 30))
        assert abs(info.threshold - expected) <= 1e-12 * expected
    assert sum(i.clipped for i in infos) > len(infos) // 2


def test_closure_step_with_sgd_equals_clip_then_step(autoclip):
    data = batches(10)
    plain, closed = make_model(), make_model()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain_clip = autoclip(plain.parameters(), p=10)
    opt = wrap(torch.optim.SGD(closed.parameters(), lr=0.05, momentum=0.9), autoclip(closed.parameters(), p=10))
    for x, y in data:
        backward(plain, x, y)
        expected = plain_clip.step()
        plain_opt.step()

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(closed(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        assert opt.last_info == expected and len(opt.step_infos) == 1
    for a, b in zip(plain.parameters(), closed.parameters()):
        assert torch.equal(a, b)


def test_closure_step_skips_a_nonfinite_first_evaluation(autoclip):
    model = make_model()
    opt = wrap(torch.optim.LBFGS(model.parameters()), autoclip(model.parameters(), p=10))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(torch.full((2, 6), float("nan"))).sum()
        loss.backward()
        return loss

    assert math.isnan(opt.step(closure).item())
    assert opt.last_info.skip and len(opt.step_infos) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- what params may be ---------------------------------------------------------------------------


def test_named_parameters_are_accepted_like_torch_optimizers(autoclip):
    data = batches(20)
    a, b = make_model(), make_model()
    by_tensor = autoclip(a.parameters(), p=10)
    by_name = autoclip(b.named_parameters(), p=10)
    named_groups = autoclip(
        [{"params": list(b[0].named_parameters())}, {"params": list(b[2:].named_parameters())}], per_group=True
    )
    assert [q for g in named_groups.groups for q in g] == list(b.parameters())
    for x, y in data:
        backward(a, x, y)
        backward(b, x, y)
        assert by_name.step() == by_tensor.step()


def test_param_groups_of_an_optimizer_built_from_named_parameters(autoclip):
    model = make_model()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    assert "param_names" in opt.param_groups[0]
    clip = autoclip(opt.param_groups, per_group=True)
    ((x, y),) = batches(1)
    backward(model, x, y)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert clip.step().grad_norm == expected
    wrap(opt, clip)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda m: [1.0], "can only clip tensors, but item 0 is a float"),
        (lambda m: ["weight"], "item 0 is a str"),
        (lambda m: [(1, m[0].weight)], "item 0 is a tuple"),
        (lambda m: [m[0]], "item 0 is a Linear module: pass module.parameters"),
        (lambda m: m, "Sequential module: pass module.parameters"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=1), "optimizer: pass optimizer.param_groups"),
        (lambda m: m.state_dict(), "got a dict"),
        (lambda m: m[0].weight, "single tensor: wrap it in a list"),
        (lambda m: set(m.parameters()), "set.*pass a list"),
        (lambda m: [{"params": set(m.parameters())}], "group 0's 'params' got a set"),
        (lambda m: [{"params": m[0].parameters()}, m[2].weight], "mixes parameter-group dicts with tensors"),
        (lambda m: 3, "iterable of tensors, got int"),
    ],
)
def test_non_tensor_params_are_rejected_naming_the_fix(bad, match):
    with pytest.raises(TypeError, match=match):
        AutoClip(bad(make_model()))


def test_non_leaf_tensor_is_rejected_as_torch_optimizers_do():
    model = make_model()
    doubled = model[0].weight * 2
    with pytest.raises(ValueError, match="non-leaf"):
        torch.optim.SGD([doubled], lr=1)
    for make in KINDS.values():
        with pytest.raises(ValueError, match="item 0 is not a leaf tensor.*pass the model's parameters"):
            make([doubled])
    doubled.retain_grad()  # torch optimizers accept it then, and its .grad gets filled
    clip = AutoClip([doubled], p=100)
    doubled.sum().backward()
    assert clip.step().grad_norm == torch.linalg.vector_norm(torch.ones_like(doubled)).item()


def test_used_up_generator_and_group_without_params_are_rejected():
    model = make_model()
    params = model.parameters()
    torch.optim.SGD(params, lr=0.1)  # consumes the generator
    with pytest.raises(ValueError, match="empty parameter list.*already used up.*list\\(model.parameters\\(\\)\\)"):
        AutoClip(params)
    with pytest.raises(ValueError, match="empty parameter list"):
        ClipNorm([{"params": []}], 1.0)
    with pytest.raises(ValueError, match="group 1 has no 'params'"):
        NoClip([{"params": model[0].parameters()}, {"lr": 0.1}])


def test_frozen_parameters_are_accepted(autoclip):
    model = make_model()
    model[0].requires_grad_(False)
    clip = autoclip(model.parameters(), p=100)
    ((x, y),) = batches(1)
    backward(model, x, y)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model[2:].parameters()]).item()
    assert clip.step().grad_norm == expected


# -- duplicate parameters ---------------------------------------------------------------------------


def test_duplicate_parameter_in_one_group_is_counted_once():
    model = make_model()
    ((x, y),) = batches(1)
    backward(model, x, y)
    params = list(model.parameters())
    ref = _twins(params)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.05).item()
    with pytest.warns(UserWarning, match="lists 2 parameter\\(s\\) more than once"):
        clip = ClipNorm(params + params[:2], 0.05)
    assert clip.groups == [params]
    info = clip.step()
    assert info.grad_norm == expected and info.clipped
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r.grad)  # scaled once, not twice
    with pytest.warns(UserWarning, match="more than once"):
        auto = AutoClip(list(model.named_parameters()) * 2, p=100)
    assert auto.step().grad_norm == torch.nn.utils.get_total_norm([p.grad for p in params]).item()


def test_parameter_in_two_groups_is_rejected():
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": [model[2].weight, model[0].bias]}]
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own rule
        torch.optim.SGD(copy.copy(groups), lr=0.1)
    for per_group in (False, True):
        with pytest.raises(ValueError, match="appears in parameter groups 0 and 1; list each parameter in one"):
            AutoClip(
                [{"params": model[0].parameters()}, {"params": [model[2].weight, model[0].bias]}], per_group=per_group
            )


def test_no_warning_for_distinct_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoClip(make_model().parameters())


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"p": float("nan")}, ValueError, "p must be in \\[0, 100\\]"),
        ({"p": float("inf")}, ValueError, "p must be in"),
        ({"p": -1.0}, ValueError, "p must be in"),
        ({"p": 100.5}, ValueError, "p must be in"),
        ({"p": True}, TypeError, "p must be a number"),
        ({"p": "10"}, TypeError, "p must be a number"),
        ({"p": None}, TypeError, "p must be a number"),
        ({"window": 0}, ValueError, "window must be a positive integer"),
        ({"window": -3}, ValueError, "window must be a positive integer"),
        ({"window": 2.5}, TypeError, "window must be a positive integer.*float"),
        ({"window": 2.0}, TypeError, "window must be a positive integer"),
        ({"window": True}, TypeError, "window must be a positive integer.*bool"),
        ({"window": "5"}, TypeError, "window must be a positive integer"),
        ({"per_group": "yes"}, TypeError, "per_group must be True or False"),
        ({"nonfinite": "skpi"}, ValueError, "nonfinite must be one of .*did you mean 'skip'"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be one of"),
    ],
)
def test_bad_autoclip_settings_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoClip(make_model().parameters(), **kwargs)


def test_numpy_numbers_are_accepted_as_settings():
    clip = AutoClip(make_model().parameters(), p=np.float32(12.5), window=np.int64(4))
    assert clip.p == 12.5 and clip.window == 4 and type(clip.window) is int


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_fixed_thresholds_are_rejected(value):
    params = list(make_model().parameters())
    error = TypeError if isinstance(value, (bool, str)) else ValueError
    match = "NoClip" if value == float("inf") else "must be a positive number"
    with pytest.raises(error, match=f"max_norm.*{match}|{match}"):
        ClipNorm(params, value)
    with pytest.raises(error, match=f"clip_value.*{match}|{match}"):
        ClipValue(params, value)


def test_torch_clip_grad_norm_does_not_validate_max_norm():
    # why ClipNorm raises instead of matching torch here: torch flips the gradient's sign
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    torch.nn.utils.clip_grad_norm_([p], -1.0)
    assert (p.grad < 0).all()


# -- mismatched states ------------------------------------------------------------------------------


def _trained(clip, model, n=4):
    for x, y in batches(n):
        backward(model, x, y)
        clip.step()
    return clip


@pytest.mark.parametrize(
    "source,target,match",
    [
        (lambda ps: ClipNorm(ps, 1.0), lambda ps: AutoClip(ps), "from a ClipNorm, not a AutoClip"),
        (lambda ps: AutoClip(ps), NoClip, "from a AutoClip, not a NoClip"),
        (NoClip, lambda ps: ClipValue(ps, 0.1), "from a NoClip, not a ClipValue"),
        (lambda ps: ClipValue(ps, 0.1), lambda ps: ClipNorm(ps, 0.1), "from a ClipValue, not a ClipNorm"),
        (lambda ps: AutoClip(ps, p=5), lambda ps: AutoClip(ps, p=10), "saved with p=5.0.*construct it with p=5.0"),
        (lambda ps: AutoClip(ps, p=5, on_device=True), lambda ps: AutoClip(ps, p=10, on_device=True), "saved with p=5"),
        (lambda ps: AutoClip(ps, window=8), lambda ps: AutoClip(ps, on_device=True), "saved with window=8"),
        (lambda ps: AutoClip(ps, window=8), lambda ps: AutoClip(ps), "saved with window=8.*has window=None"),
        (lambda ps: AutoClip(ps), lambda ps: AutoClip(ps, window=8), "saved with window=None"),
        (lambda ps: AutoClip(ps, per_group=True), lambda ps: AutoClip(ps), "saved with per_group=True"),
        (lambda ps: ClipNorm(ps, 1.0), lambda ps: ClipNorm(ps, 2.0), "saved with max_norm=1.0"),
        (lambda ps: ClipValue(ps, 0.1), lambda ps: ClipValue(ps, 0.2), "saved with clip_value=0.1"),
    ],
)
def test_load_state_dict_refuses_another_kind_or_setting(source, target, match):
    model = make_model()
    state = save_load(_trained(source(model.parameters()), model).state_dict())
    clip = _trained(target(model.parameters()), model, n=2)
    before = clip.state_dict()
    with pytest.raises(ValueError, match=match):
        clip.load_state_dict(state)
    after = clip.state_dict()
    assert after.keys() == before.keys() and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        for a, b in zip(before.values(), after.values())
        if not isinstance(a, list)
    )
    for a, b in zip(before.get("histories", []), after.get("histories", [])):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_number_of_groups_and_damaged_states():
    model = make_model()
    clip = _trained(AutoClip(_two_groups(model), per_group=True), model)
    three = AutoClip(
        [{"params": model[0].parameters()}, {"params": model[2].parameters()}, {"params": model[4].parameters()}],
        per_group=True,
    )
    with pytest.raises(ValueError, match="state_dict has 2 histories, this AutoClip has 3"):
        three.load_state_dict(clip.state_dict())
    state = clip.state_dict()
    broken = {**state, "histories": [state["histories"][0], torch.tensor([1.0, float("nan")], dtype=torch.float64)]}
    with pytest.raises(ValueError, match="history 1 must be a 1-D list of finite norms"):
        clip.load_state_dict(broken)
    with pytest.raises(ValueError, match="missing keys \\['histories'\\]"):
        clip.load_state_dict({k: v for k, v in state.items() if k != "histories"})
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        clip.load_state_dict({**state, "steps": -1})
    with pytest.raises(TypeError, match="expects the dict that state_dict\\(\\) returns"):
        clip.load_state_dict([1, 2])
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), AutoClip(model.parameters()))
    with pytest.raises(ValueError, match="wrapped optimizer's state_dict: pass its \\['clipper'\\] entry"):
        AutoClip(model.parameters()).load_state_dict(opt.state_dict())
    assert clip.state_dict()["steps"] == 4


def test_wrapped_load_state_dict_refuses_a_plain_optimizer_state_and_changes_nothing_on_mismatch(autoclip):
    model = make_model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.1), autoclip(model.parameters(), p=10))
    for seed in range(3):
        _step_with(opt, _random_grads(list(model.parameters()), seed))
    with pytest.raises(ValueError, match="load a plain optimizer's state_dict with .optimizer.load_state_dict"):
        opt.load_state_dict(opt.optimizer.state_dict())
    other = wrap(
        torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2:].parameters()}], lr=0.1),
        autoclip(model.parameters(), p=10),
    )
    other.clipper.steps = 7
    before = opt.clipper.histories[0].values()
    with pytest.raises(ValueError):  # torch refuses another number of groups; the clipper is put back
        opt.load_state_dict(other.state_dict())
    assert opt.clipper.steps == 3 and opt.clipper.histories[0].values() == before


def test_wrap_refuses_swapped_arguments_and_foreign_parameters():
    model, other = make_model(), make_model(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip = AutoClip(model.parameters())
    with pytest.raises(TypeError, match="optimizer must be a torch Optimizer, not AutoClip"):
        wrap(clip, opt)
    with pytest.raises(TypeError, match="clipper must be an autoclip clipper"):
        wrap(opt, torch.nn.utils.clip_grad_norm_)
    with pytest.raises(ValueError, match="6 parameter\\(s\\) the optimizer does not optimize"):
        wrap(opt, AutoClip(other.parameters()))
    wrap(opt, AutoClip(model[0].parameters()))  # clipping a subset is allowed


def test_running_percentile_refuses_nonfinite_values():
    rp = RunningPercentile(50.0, window=3)
    rp.add(1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite values only"):
            rp.add(bad)
    assert rp.values() == [1.0] and rp.value() == 1.0
    with pytest.raises(ValueError, match="finite values only"):
        rp.load([1.0, float("nan")])
