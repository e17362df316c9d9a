"""Quantities: each against a plain-autograd or closed-form oracle, and none leaves a trace on training."""

import math

import numpy as np
import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, load_run
from dynamics.quantities import DistanceFromInit, Quantity, Sharpness, UpdateCosine, UpdateRatio


class ParamSum(Quantity):
    name = "param_sum"
    columns = {"param_sum": "float64"}

    def compute(self, ctx):
        return {"param_sum": sum(p.sum() for p in ctx.params)}


def _quadratic(spectrum, seed=0):
    """f(θ) = ½ θᵀAθ with A = Q diag(spectrum) Qᵀ, as a bias-free linear 'model' in float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T
    torch.manual_seed(seed)
    model = torch.nn.Linear(len(spectrum), 1, bias=False).to(torch.float64)

    def loss():
        w = model.weight.reshape(-1)
        return 0.5 * w @ a @ w

    return model, a, loss


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(12, 1)
    )


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def test_user_defined_quantity_adds_its_column_with_the_right_values(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder(model, opt, tmp_path / "run", every=3, quantities=[*Recorder.default_quantities(), ParamSum()])
    expected = {}
    for t, (x, y) in enumerate(_data(12), start=1):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        if t % 3 == 0:
            expected[t] = sum(p.detach().double().sum().item() for p in model.parameters())
    rec.close()
    run = load_run(tmp_path / "run")
    assert list(run.metrics.columns[-3:]) == ["smoothness", "param_sum", "lr"]
    assert run.metrics.step.tolist() == sorted(expected)
    assert run.metrics.param_sum.tolist() == pytest.approx([expected[t] for t in sorted(expected)], rel=1e-6)
    assert np.isfinite(run.metrics.step_size).all() and np.isfinite(run.metrics.smoothness).all()


@pytest.mark.parametrize("hvp", ["fd", "autograd"])
@pytest.mark.parametrize("spectrum", [[10.0, 5.0, 2.0, 1.0, 0.5, 0.1], [3.0, 1.0, 0.2, 0.05]])
def test_sharpness_on_a_quadratic_is_the_top_eigenvalue(tmp_path, spectrum, hvp):
    model, a, loss = _quadratic(spectrum)
    top = torch.linalg.eigvalsh(a).max().item()
    rec = Recorder(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        tmp_path / "run",
        every=2,
        quantities=[Sharpness(every=4, iters=40, hvp=hvp)],
    )
    for _ in range(8):
        rec.step(loss)
    rec.close()
    metrics = load_run(tmp_path / "run").metrics
    measured = metrics.set_index("step").sharpness
    assert measured.loc[[4, 8]].tolist() == pytest.approx([top, top], rel=1e-6)
    assert measured.loc[[2, 6]].isna().all()  # off steps: NaN, not measured


def test_sharpness_leaves_no_trace_on_training(tmp_path):
    def train(quantities):
        model = _mlp(3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        clip = AutoClip(model.parameters(), p=50)
        torch.manual_seed(7)
        if quantities is None:
            for x, y in _data(10):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                if not clip.step().skip:
                    opt.step()
        else:
            rec = Recorder(model, opt, tmp_path / "run", clipper=clip, every=1, quantities=quantities)
            for x, y in _data(10):
                rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
            rec.close()
        return model, opt, clip, torch.rand(4)

    plain = train(None)
    probed = train([Sharpness(iters=5), DistanceFromInit(), UpdateCosine(), UpdateRatio()])
    for a, b in zip(plain[0].state_dict().values(), probed[0].state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    for sa, sb in zip(plain[1].state.values(), probed[1].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert plain[2].histories[0].values() == probed[2].histories[0].values()
    assert torch.equal(plain[3], probed[3])  # the training RNG stream carries on unchanged
    assert np.isfinite(load_run(tmp_path / "run").metrics.sharpness).all()


def test_distance_update_cosine_and_update_ratio_match_parameter_snapshots(tmp_path):
    model = _mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = Recorder(
        model,
        opt,
        tmp_path / "run",
        every=2,
        quantities=[*Recorder.default_quantities(), DistanceFromInit(), UpdateCosine(), UpdateRatio()],
    )
    names = [n for n, _ in model.named_parameters()]
    snaps = [[p.detach().clone().double() for p in model.parameters()]]
    for x, y in _data(10):
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        snaps.append([p.detach().clone().double() for p in model.parameters()])
    rec.close()
    run = load_run(tmp_path / "run")

    def flat(ps):
        return torch.cat([p.reshape(-1) for p in ps])

    previous = None
    for row in run.metrics.itertuples():
        t = row.step
        assert row.distance_from_init == pytest.approx((flat(snaps[t]) - flat(snaps[0])).norm().item(), rel=1e-6)
        update = flat(snaps[t]) - flat(snaps[t - 1])
        if previous is None:
            assert math.isnan(row.update_cosine)
        else:
            cos = (update @ previous / (update.norm() * previous.norm())).item()
            assert row.update_cosine == pytest.approx(cos, rel=1e-5, abs=1e-6)
        previous = update
        layers = run.layers[run.layers.step == t].set_index("name").update_ratio
        for name, before, after in zip(names, snaps[t - 1], snaps[t]):
            ratio = ((after - before).norm() / before.norm()).item()
            assert layers[name] == pytest.approx(ratio, rel=1e-5)


def test_quantity_every_must_fall_on_record_steps(tmp_path):
    model = _mlp()
    with pytest.raises(ValueError, match="multiple of the Recorder's every=20"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", quantities=[Sharpness(every=30)])
    assert not (tmp_path / "run").exists()  # nothing created for a bad argument


def test_quantity_columns_must_not_collide(tmp_path):
    class Loss(Quantity):
        name = "my_loss"
        columns = {"loss": "float64"}

        def compute(self, ctx):
            return {"loss": ctx.loss}

    model = _mlp()
    with pytest.raises(ValueError, match="already in the metrics table"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", quantities=[Loss()])


def test_quantities_move_to_the_host_in_one_transfer_per_record(tmp_path, monkeypatch):
    model = _mlp()
    rec = Recorder(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        tmp_path / "run",
        every=5,
        quantities=[*Recorder.default_quantities(), ParamSum(), DistanceFromInit(), UpdateRatio(), UpdateCosine()],
    )
    data = _data(10)
    calls = []
    for name in ("tolist", "item", "__float__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for x, y in data[:4]:
        rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
    per_step = len(calls) / 4  # the clipper's own transfer
    calls.clear()
    x, y = data[4]
    rec.step(lambda: torch.nn.functional.mse_loss(model(x), y))  # a record step
    monkeypatch.undo()
    rec.close()
    assert per_step == 1
    assert len(calls) == 2  # the clipper's transfer and the record's one
