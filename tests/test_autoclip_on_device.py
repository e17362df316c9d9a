"""AutoClip(on_device=True): the device path against numpy.percentile, clip_grad_norm_ and the host path.

The host path (heaps of Python floats) is the reference the device path must equal bit for bit;
numpy.percentile (float64) is the oracle for every threshold; and step() must not read the device.
"""

import contextlib
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import backward, batches, grads_of, make_model, save_load, train
from hypothesis import given, settings
from hypothesis import strategies as st

from autoclip import AutoClip, ClipInfo, NonFiniteGradientError, wrap
from autoclip.autoclip import choose_on_device
from autoclip.sorted_history import PENDING, SortedHistories

# -- the sorted history against numpy.percentile --------------------------------------------------------

# a small pool makes ties frequent; 0, NaN and inf must never enter
POOL = np.array([0.5, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 7.25])
PERCENTILES = [0.0, 100.0, 10.0, 37.5, 50.0, 99.9, 100.0 / 3.0, 1e-9]


def _stream(rng: np.random.Generator, n: int, groups: int) -> np.ndarray:
    """Norms for ``groups`` histories: log-normal or tied values, with zeros, NaN and inf mixed in."""
    x = np.where(rng.random((n, groups)) < 0.5, rng.lognormal(size=(n, groups)), rng.choice(POOL, (n, groups)))
    odd = rng.random((n, groups))
    x[odd < 0.05] = 0.0
    x[(odd >= 0.05) & (odd < 0.08)] = np.nan
    x[(odd >= 0.08) & (odd < 0.10)] = np.inf
    return x


def _expected(rows: list[list[float]], p: float) -> list[float]:
    return [float(np.percentile(row, p)) if row else math.inf for row in rows]


@pytest.mark.parametrize(
    ("window", "pending"),
    # pending 1, 4 and 7 merge the pending norms into the main row many times within the 60 pushes
    [(None, 1024), (None, 1), (None, 4), (None, 7), (1, 1024), (5, 1024), (17, 1024)],
)
def test_percentiles_are_bit_identical_to_numpy_for_every_prefix(window, pending):
    rng = np.random.default_rng(pending if window is None else window)
    groups = 3
    for p in PERCENTILES:
        store = SortedHistories(groups, p, window, pending=pending)
        assert store.percentiles().tolist() == [math.inf] * groups  # empty: inf
        rows: list[list[float]] = [[] for _ in range(groups)]
        for x in _stream(rng, 60, groups):
            valid = rng.random(groups) < 0.9  # a masked entry never enters either
            store.push(torch.from_numpy(x), torch.from_numpy(valid))
            for k in range(groups):
                if valid[k] and np.isfinite(x[k]) and x[k] > 0:
                    rows[k].append(float(x[k]))
                    if window is not None:
                        rows[k] = rows[k][-window:]
            assert store.percentiles().tolist() == _expected(rows, p), (p, window)
        assert store.counts() == [len(row) for row in rows]
        for k in range(groups):
            assert store.values(k) == (rows[k] if window else sorted(rows[k]))


norms = st.one_of(st.floats(min_value=1e-300, max_value=1e300), st.sampled_from([0.5, 1.0, 2.0, 3.0]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(norms, min_size=1, max_size=40),
    st.floats(min_value=0.0, max_value=100.0),
    st.none() | st.integers(1, 12),
    st.integers(1, 9),
)
def test_any_history_any_p_matches_numpy(history, p, window, pending):
    store = SortedHistories(1, p, window, pending=pending)
    for n, x in enumerate(history, start=1):
        store.push(torch.tensor([x], dtype=torch.float64))
        kept = history[:n] if window is None else history[max(0, n - window) : n]
        assert store.percentiles().item() == float(np.percentile(kept, p))


def test_single_norm_is_its_own_percentile_for_any_p():
    for p in (0.0, 0.1, 50.0, 100.0):
        store = SortedHistories(1, p)
        store.push(torch.tensor([2.5], dtype=torch.float64))
        assert store.percentiles().item() == 2.5


def test_push_takes_valid_as_a_plain_bool_too():
    store = SortedHistories(1, 50.0)
    store.push(torch.tensor([2.0], dtype=torch.float64), True)
    store.push(torch.tensor([4.0], dtype=torch.float64), False)
    store.push(torch.tensor([6.0], dtype=torch.float64), torch.tensor([True]))
    assert store.values(0) == [2.0, 6.0] and store.percentiles().item() == 4.0


def test_history_grows_geometrically():
    store = SortedHistories(1, 10.0, pending=8)
    capacities = []
    for x in np.random.default_rng(1).lognormal(size=1000):
        store.push(torch.tensor([x], dtype=torch.float64))
        capacities.append(store._capacity)
    # the main row, merged into every 8 norms, doubles from 64: 5 allocations for 1000 norms, so
    # amortized O(1) allocation per step
    assert sorted(set(capacities)) == [64, 128, 256, 512, 1024]
    assert store.counts() == [1000]
    windowed = SortedHistories(1, 10.0, window=100)
    for x in range(300):
        windowed.push(torch.tensor([float(x + 1)], dtype=torch.float64))
    assert windowed._capacity == 100 and windowed.values(0) == [float(x) for x in range(201, 301)]


def test_load_then_push_matches_numpy_and_round_trips():
    rng = np.random.default_rng(2)
    first, second = rng.lognormal(size=30).tolist(), rng.lognormal(size=200).tolist()
    for window, pending in ((None, 1024), (None, 3), (7, 1024)):
        store = SortedHistories(2, 25.0, window, pending=pending)
        store.load([first, first[:3]])
        for x in second:
            store.push(torch.tensor([x, x], dtype=torch.float64))
        for k, start in enumerate((first, first[:3])):
            kept = (start + second)[-(window or 10**9) :]
            assert store.percentiles()[k].item() == float(np.percentile(kept, 25.0))
            assert store.values(k) == (kept if window else sorted(kept))


# -- step() reads nothing back -------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu", "__array__")


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every Tensor method that moves a value to the host raises inside the block."""
    with monkeypatch.context() as m:
        for name in HOST_READS:

            def refuse(self, *a, _name=name, **k):
                raise AssertionError(f"a host read: Tensor.{_name}")

            m.setattr(torch.Tensor, name, refuse)
        yield


def _two_groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2:].parameters()}]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p": 10},
        {"p": 30, "window": 3},
        {"p": 10, "per_group": True},
        {"p": 10, "nonfinite": "zero"},
        {"p": 50, "window": 4, "per_group": True, "nonfinite": "zero"},
    ],
)
def test_step_reads_nothing_back_to_the_host(monkeypatch, kwargs):
    model = make_model()
    params = _two_groups(model) if kwargs.get("per_group") else model.parameters()
    clip = AutoClip(params, on_device=True, **kwargs)
    infos = []
    data = batches(9)
    with no_host_reads(monkeypatch):
        with pytest.raises(AssertionError, match="host read"):  # the guard is on
            torch.ones(()).item()
        for t, (x, y) in enumerate(data):
            backward(model, x, y)
            if t == 3:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            if t == 5:
                model.zero_grad(set_to_none=True)  # a step without gradients
            if t == 6:
                model.zero_grad(set_to_none=False)  # all-zero gradients
            infos.append(clip.step())
    # the control: the host path does read (once a step), so the guard would have caught one
    host = AutoClip(_two_groups(model) if kwargs.get("per_group") else model.parameters(), on_device=False)
    backward(model, *data[0])
    with no_host_reads(monkeypatch), pytest.raises(AssertionError, match="host read"):
        host.step()
    # read after the loop: 6 norms entered (not the NaN, no-gradient and zero-gradient steps)
    assert [len(h) for h in clip.histories] == [min(6, kwargs.get("window") or 6)] * len(clip.histories)
    assert clip.nonfinite_steps == 1
    assert all(i.on_device for i in infos)
    assert [bool(i.finite) for i in infos] == [t != 3 for t in range(9)]


def test_merging_pending_norms_into_the_main_row_reads_nothing_back_to_the_host(monkeypatch):
    rng = np.random.default_rng(5)
    stream = _stream(rng, 23, 2)
    store = SortedHistories(2, 10.0, pending=3)  # 7 merges in 23 pushes
    thresholds = []
    with no_host_reads(monkeypatch):
        for x in stream:
            store.push(torch.from_numpy(x))
            thresholds.append(store.percentiles())
    rows: list[list[float]] = [[], []]
    for x, got in zip(stream, thresholds, strict=True):
        for k in range(2):
            if np.isfinite(x[k]) and x[k] > 0:
                rows[k].append(float(x[k]))
        assert got.tolist() == _expected(rows, 10.0)


# aten ops that read a CUDA tensor back to the host: item, nonzero and masked_select always; a scatter
# or index_put_ when torch.use_deterministic_algorithms routes it through a sort that checks its
# indices' range on the host
READ_BACK_ON_CUDA = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::index_put_",
    "aten::scatter",
    "aten::scatter_",
    "aten::scatter_add",
    "aten::scatter_add_",
    "aten::scatter_reduce_",
    "aten::index_copy_",
}


@pytest.mark.parametrize("window", [None, 4])
def test_push_merge_and_percentiles_use_no_op_that_reads_back_on_cuda(window):
    store = SortedHistories(2, 10.0, window, pending=3)
    stream = _stream(np.random.default_rng(6), 20, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for x in stream:
            store.push(torch.from_numpy(x), torch.tensor([True, False]))
            store.percentiles()
    ops = {event.name for event in prof.events()}
    assert "aten::searchsorted" in ops or "aten::clamp" in ops  # the profiler saw the store's ops
    assert not ops & READ_BACK_ON_CUDA


@pytest.mark.parametrize(
    "kwargs", [{"p": 10}, {"p": 30, "window": 3}, {"p": 10, "per_group": True, "nonfinite": "zero"}]
)
def test_autoclip_step_on_device_uses_no_op_that_reads_back_on_cuda(kwargs):
    model = make_model()
    params = _two_groups(model) if kwargs.get("per_group") else model.parameters()
    clip = AutoClip(params, on_device=True, **kwargs)
    ops: set[str] = set()
    for t, (x, y) in enumerate(batches(6)):
        backward(model, x, y)
        if t == 3:
            next(model.parameters()).grad.view(-1)[0] = math.nan
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            clip.step()
        ops |= {event.name for event in prof.events()}
    assert "aten::clamp" in ops  # the profiler saw the history's insert
    assert not ops & READ_BACK_ON_CUDA


def test_skip_is_plain_false_unless_the_policy_can_skip():
    model = make_model()
    backward(model, *batches(1)[0])
    assert AutoClip(model.parameters(), nonfinite="zero", on_device=True).step().skip is False
    skip = AutoClip(model.parameters(), nonfinite="skip", on_device=True).step().skip
    assert isinstance(skip, torch.Tensor) and skip.dtype == torch.bool and not skip
    assert AutoClip(model.parameters(), on_device=False).step().skip is False


# -- clipping ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_grads_equal_clip_grad_norm_at_the_same_threshold(dtype):
    model = make_model(dtype=dtype)
    clip = AutoClip(model.parameters(), p=10, on_device=True)
    clipped = 0
    for x, y in batches(30, dtype=dtype):
        backward(model, x, y)
        raw = grads_of(model)
        info = clip.step().to_host()
        twins = [torch.nn.Parameter(g.clone()) for g in raw]
        for t, g in zip(twins, raw):
            t.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(twins, info.threshold).item()
        assert norm == info.grad_norm
        if info.clipped:
            clipped += 1
            # clip_grad_norm_ divides by norm + 1e-6 in the gradients' dtype; the paper's rule has no epsilon
            for mine, theirs in zip(grads_of(model), (t.grad for t in twins)):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=0)
            # exactly: every gradient times the float factor threshold / norm, as the host path scales
            for mine, g in zip(grads_of(model), raw):
                assert torch.equal(mine, g * (info.threshold / info.grad_norm))
        else:
            assert all(torch.equal(a, b) for a, b in zip(grads_of(model), raw))
    assert clipped > 15


# -- the device path equals the host path, bit for bit ------------------------------------------------------


SETTINGS = {
    "p10": {"p": 10},
    "p0": {"p": 0},
    "p100": {"p": 100},
    "fractional p, window": {"p": 37.5, "window": 9},
    "per-group": {"p": 20, "per_group": True},
    "per-group window zero": {"p": 15, "window": 6, "per_group": True, "nonfinite": "zero"},
}


def _fields(info: ClipInfo) -> tuple:
    """Every field of a host ClipInfo, NaN made comparable (NaN != NaN would fail a list comparison)."""
    return tuple(
        tuple(map(_nan_equal, v)) if isinstance(v, tuple) else _nan_equal(v)
        for v in (getattr(info, f) for f in info.__dataclass_fields__)
    )


def _nan_equal(v):
    return "nan" if isinstance(v, float) and math.isnan(v) else v


def _same_infos(device_infos, host_infos) -> bool:
    """Equal field for field, bit for bit; but the per-group summary threshold (the norm of the group
    thresholds, which clips nothing) may differ in the last bit: torch's CPU sqrt is not always
    correctly rounded, math.sqrt is."""
    device_infos = [i.to_host() for i in device_infos]
    for k, (d, h) in enumerate(zip(device_infos, host_infos)):
        if h.group_thresholds and d.threshold != h.threshold:
            assert abs(d.threshold - h.threshold) <= math.ulp(h.threshold), (d, h)
            assert d.clip_coef == pytest.approx(h.clip_coef, rel=1e-15, abs=0)  # threshold / grad_norm
            device_infos[k] = replace(d, threshold=h.threshold, clip_coef=h.clip_coef)
    return [_fields(i) for i in device_infos] == [_fields(i) for i in host_infos]


def _make(model, on_device, kwargs):
    params = _two_groups(model) if kwargs.get("per_group") else model.parameters()
    return AutoClip(params, on_device=on_device, **kwargs)


def _poisoned(data):
    """Batches where every 11th input is NaN: non-finite gradients in the middle of a run."""
    out = []
    for t, (x, y) in enumerate(data):
        out.append((torch.full_like(x, math.nan) if t % 11 == 5 else x, y))
    return out


@pytest.mark.parametrize("name", SETTINGS)
def test_both_paths_give_bit_identical_parameters_over_50_steps(name):
    kwargs = SETTINGS[name]
    data = _poisoned(batches(50))
    runs = {}
    for on_device in (False, True):
        model = make_model()
        infos = train(model, data, clipper=_make(model, on_device, kwargs))
        runs[on_device] = (model, infos)
    (host_model, host_infos), (device_model, device_infos) = runs[False], runs[True]
    assert _same_infos(device_infos, host_infos)  # every field of every step, exactly
    assert sum(not i.finite for i in host_infos) == 5
    for a, b in zip(host_model.parameters(), device_model.parameters()):
        assert torch.equal(a, b)
    # the thresholds are numpy's (the global one of per-group clipping aside, a norm of thresholds)
    if not kwargs.get("per_group"):
        entered = [i.grad_norm for i in host_infos if i.finite]
        window = kwargs.get("window") or len(entered)
        assert float(device_infos[-1].threshold) == float(np.percentile(entered[-window:], kwargs["p"]))


@pytest.mark.parametrize("kwargs", [{"p": 10}, {"p": 25, "per_group": True}])
def test_both_paths_stay_bit_identical_across_a_merge_of_the_pending_norms(kwargs):
    data = _poisoned(batches(PENDING + 76))  # the device path merges its pending norms once
    runs = {}
    for on_device in (False, True):
        model = make_model()
        runs[on_device] = (model, train(model, data, clipper=_make(model, on_device, kwargs)))
    (host_model, host_infos), (device_model, device_infos) = runs[False], runs[True]
    assert _same_infos(device_infos, host_infos)
    assert all(torch.equal(a, b) for a, b in zip(host_model.parameters(), device_model.parameters()))


def test_both_paths_agree_under_wrap_and_grad_scaler():
    data = batches(30)
    results = []
    for on_device in (False, True):
        model = make_model()
        clip = AutoClip(model.parameters(), p=25, on_device=on_device)
        opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), clip)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
        infos = []
        for t, (x, y) in enumerate(data):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) * (1e38 if t % 6 == 1 else 1.0)  # overflows
            scaler.scale(loss).backward()
            scaler.step(opt)  # unscales, then clips and steps unless the scaler skips the step
            scaler.update()
            infos.append(opt.last_info)
        results.append((model, clip, infos))
    (a, clip_a, infos_a), (b, clip_b, infos_b) = results
    assert _same_infos(infos_b, infos_a)
    assert sorted(clip_b.histories[0].values()) == sorted(clip_a.histories[0].values())
    assert len(clip_b.histories[0]) == 25  # the 5 overflowing steps never reached the clipper
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs", [{"p": 10}, {"p": 30, "window": 8}, {"p": 10, "per_group": True}])
@pytest.mark.parametrize("first,second", [(False, True), (True, False)])
def test_state_dict_saved_on_one_path_resumes_on_the_other(kwargs, first, second):
    data = batches(50)
    whole_model = make_model()
    whole = train(whole_model, data, clipper=_make(whole_model, False, kwargs))

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clip = _make(model, first, kwargs)
    head = train(model, data[:25], optimizer=opt, clipper=clip)
    saved = save_load({"model": model.state_dict(), "opt": opt.state_dict(), "clip": clip.state_dict()})

    model = make_model(seed=5)
    model.load_state_dict(saved["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    clip = _make(model, second, kwargs)
    clip.load_state_dict(saved["clip"])
    tail = train(model, data[25:], optimizer=opt, clipper=clip)

    assert _same_infos(head + tail, whole)
    assert clip.steps == 50 and clip.on_device is second
    for a, b in zip(whole_model.parameters(), model.parameters()):
        assert torch.equal(a, b)


# -- steps that must not enter the history --------------------------------------------------------------


def test_steps_without_gradient_never_enter():
    model = make_model()
    clip = AutoClip(model.parameters(), p=0, window=4, on_device=True)
    entered = []
    for t, (x, y) in enumerate(batches(15)):
        backward(model, x, y)
        if t % 3 == 1:
            model.zero_grad(set_to_none=t % 2 == 0)  # no gradient at all, or all-zero gradients
        before = clip.threshold
        info = clip.step().to_host()
        if t % 3 == 1:
            assert (info.grad_norm, info.threshold, info.clipped, info.clip_coef) == (0.0, before, False, 1.0)
        else:
            entered.append(info.grad_norm)
            assert info.threshold == float(np.percentile(entered[-4:], 0)) > 0
    assert clip.histories[0].values() == entered[-4:]


def test_first_step_without_gradients_reports_infinite_thresholds():
    model = make_model()
    info = AutoClip(_two_groups(model), per_group=True, on_device=True).step().to_host()
    assert (info.grad_norm, info.threshold, info.clipped) == (0.0, math.inf, False)
    assert info.group_grad_norms == (0.0, 0.0) and info.group_thresholds == (math.inf, math.inf)


# -- non-finite gradients, per policy --------------------------------------------------------------------


def _poison(model, value):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    next(model.parameters()).grad.view(-1)[0] = value


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_skip_reports_skip_and_leaves_grads_and_history(bad):
    model = make_model()
    clip = AutoClip(model.parameters(), p=10, on_device=True)
    train(model, batches(5), clipper=clip)
    history, threshold = clip.histories[0].values(), clip.threshold
    _poison(model, bad)
    before = grads_of(model)
    info = clip.step()
    assert bool(info.skip) and not bool(info.finite) and not bool(info.clipped)
    assert float(info.threshold) == threshold and float(info.clip_coef) == 1.0
    assert clip.histories[0].values() == history and clip.nonfinite_steps == 1
    for a, b in zip(before, grads_of(model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_nonfinite_zero_zeroes_grads_without_a_skip():
    model = make_model()
    clip = AutoClip(model.parameters(), nonfinite="zero", on_device=True)
    _poison(model, math.inf)
    info = clip.step()
    assert info.skip is False and not bool(info.finite)
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(model))
    assert len(clip.histories[0]) == 0 and clip.nonfinite_steps == 1


def test_nonfinite_raise_needs_the_host_path():
    model = make_model()
    with pytest.raises(ValueError, match="nonfinite='raise'.*on_device=False to raise"):
        AutoClip(model.parameters(), nonfinite="raise", on_device=True)
    clip = AutoClip(model.parameters(), nonfinite="raise")  # None: the host path, which can raise
    assert not clip.on_device
    _poison(model, math.nan)
    with pytest.raises(NonFiniteGradientError):
        clip.step()


# -- choosing the path, reading the info -------------------------------------------------------------------


def test_default_path_by_device():
    assert choose_on_device(None, torch.device("cpu"), "skip") is False
    assert choose_on_device(None, torch.device("cuda", 0), "skip") is True
    assert choose_on_device(None, torch.device("cuda", 0), "raise") is False
    assert choose_on_device(True, torch.device("cpu"), "zero") is True
    assert choose_on_device(None, torch.device("mps"), "skip") is False  # no float64 there
    with pytest.raises(ValueError, match="mps has no float64.*on_device=False"):
        choose_on_device(True, torch.device("mps"), "skip")
    assert AutoClip(make_model().parameters()).on_device is False
    assert "on_device=True" in repr(AutoClip(make_model().parameters(), on_device=True))
    for bad in ("yes", 1):
        with pytest.raises(TypeError, match="on_device must be True, False or None"):
            AutoClip(make_model().parameters(), on_device=bad)


def test_to_host_reads_the_info_in_one_transfer(monkeypatch):
    model = make_model()
    clip = AutoClip(_two_groups(model), p=10, per_group=True, on_device=True)
    backward(model, *batches(1)[0])
    info = clip.step()
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    host = info.to_host()
    assert len(calls) == 1
    assert isinstance(host, ClipInfo) and not host.on_device and host.to_host() is host
    assert host.group_grad_norms == tuple(float(t) for t in info.group_grad_norms)
    assert type(host.clipped) is bool and type(host.finite) is bool


# -- the reference page's examples run as written ------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "autoclip.md"
DOC_EXAMPLES = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)


@pytest.mark.parametrize("code", DOC_EXAMPLES, ids=[f"example{i}" for i in range(len(DOC_EXAMPLES))])
def test_docs_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    if "print(clip)" in code:
        assert "AutoClip(p=10, window=None, per_group=False, nonfinite='skip', on_device=True)" in out
    if "clip.nonfinite_steps, len(clip.histories[0])" in code:
        assert out.strip().endswith("1 5")
