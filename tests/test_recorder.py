"""Recorder: measurements against plain-autograd references, and no trace on training."""

import math

import numpy as np
import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, RunError, load_run


def _least_squares(seed=0, n=6, m=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    y = torch.randn(m, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Linear(n, 1, bias=False).to(torch.float64)
    return model, x, y


def _run_recorded(model, closure_of, steps, tmp_path, every=1, probes=1, clipper=None, opt=None, **kw):
    opt = opt or torch.optim.Adam(model.parameters(), lr=0.05)
    rec = Recorder(model, opt, tmp_path / "run", clipper=clipper, every=every, probes=probes, **kw)
    snapshots = [[p.detach().clone() for p in model.parameters()]]
    for t in range(1, steps + 1):
        rec.step(closure_of(t))
        snapshots.append([p.detach().clone() for p in model.parameters()])
    rec.close()
    return load_run(tmp_path / "run"), snapshots


@pytest.mark.parametrize("probes", [1, 3])
def test_smoothness_on_least_squares_is_hessian_times_update(tmp_path, probes):
    model, x, y = _least_squares()
    hessian = x.T @ x / x.shape[0]  # of 1/2 mean((x w - y)^2)
    top = torch.linalg.eigvalsh(hessian).max().item()

    def closure_of(t):
        return lambda: 0.5 * ((model(x) - y) ** 2).mean()

    run, snaps = _run_recorded(
        model, closure_of, 30, tmp_path, probes=probes, clipper=AutoClip(model.parameters(), p=50)
    )
    assert len(run.metrics) == 30
    for t, row in zip(run.metrics.step, run.metrics.itertuples()):
        d = (snaps[t][0] - snaps[t - 1][0]).reshape(-1)
        expected = (torch.linalg.vector_norm(hessian @ d) / torch.linalg.vector_norm(d)).item()
        assert row.smoothness == pytest.approx(expected, rel=1e-8)
        assert row.smoothness <= top * (1 + 1e-12)


def test_step_size_is_norm_of_parameter_change(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 4, generator=g) for _ in range(40)]

    def closure_of(t):
        return lambda: (model(data[t - 1]) - data[t - 1].sum(1, keepdim=True)).pow(2).mean()

    run, snaps = _run_recorded(model, closure_of, 40, tmp_path, every=4)
    assert run.metrics.step.tolist() == list(range(4, 41, 4))
    for row in run.metrics.itertuples():
        diff = torch.cat([(a - b).double().reshape(-1) for a, b in zip(snaps[row.step], snaps[row.step - 1])])
        assert row.step_size == pytest.approx(torch.linalg.vector_norm(diff).item(), rel=1e-6)
        layer = run.layers[run.layers.step == row.step]
        assert math.sqrt((layer.step_size**2).sum()) == pytest.approx(row.step_size, rel=1e-6)


class _MaskRecorder:
    """Keeps the dropout mask of the first forward pass in each training step."""

    def __init__(self, dropout):
        self.masks = []
        self.fresh = True
        dropout.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.fresh:
            self.masks.append((output != 0).to(inputs[0].dtype) / (1 - module.p))
            self.fresh = False


def test_probes_replay_the_training_dropout_masks(tmp_path):
    # Dropout on the output of a linear model: with the training mask fixed the loss is
    # quadratic with Hessian X^T diag(mask^2) X / m. A probe with another mask would not match.
    model, x, y = _least_squares(seed=1, m=64)
    dropout = torch.nn.Dropout(0.5)
    masks = _MaskRecorder(dropout)

    def closure_of(t):
        masks.fresh = True
        return lambda: 0.5 * ((dropout(model(x)) - y) ** 2).mean()

    run, snaps = _run_recorded(model, closure_of, 12, tmp_path, opt=torch.optim.SGD(model.parameters(), lr=0.1))
    for row in run.metrics.itertuples():
        mask = masks.masks[row.step - 1]
        hessian = x.T @ (mask**2 * x) / x.shape[0]
        d = (snaps[row.step][0] - snaps[row.step - 1][0]).reshape(-1)
        expected = (torch.linalg.vector_norm(hessian @ d) / torch.linalg.vector_norm(d)).item()
        assert row.smoothness == pytest.approx(expected, rel=1e-8)


def _net():
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
    )


def test_recorded_run_ends_bit_identical_to_unrecorded(tmp_path):
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(16, 5, generator=g) * (1 + 9 * (t % 6 == 0)), torch.randn(16, 1, generator=g)) for t in range(30)
    ]

    def train(record: bool):
        torch.manual_seed(0)
        model = _net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        clip = AutoClip(model.parameters(), p=25)
        rec = Recorder(model, opt, tmp_path / "run", clipper=clip, every=1, probes=2) if record else None
        for x, y in data:
            closure = lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
            if record:
                rec.step(closure)
            else:
                opt.zero_grad()
                closure().backward()
                if not clip.step().skip:
                    opt.step()
        if record:
            rec.close()
        return model, opt, clip, torch.rand(3)

    plain, recorded = train(False), train(True)
    for a, b in zip(plain[0].state_dict().values(), recorded[0].state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    for sa, sb in zip(plain[1].state.values(), recorded[1].state.values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])  # Adam moments and step counts
    assert plain[2].histories[0].values() == recorded[2].histories[0].values()
    assert torch.equal(plain[3], recorded[3])  # the RNG stream carries on unchanged


def test_gradient_direction_option_probes_along_the_gradient(tmp_path):
    # On a quadratic, probing along -g gives ||A g|| / ||g||, whatever the update was.
    model, x, y = _least_squares(seed=2)
    hessian = x.T @ x / x.shape[0]
    rec = Recorder(model, torch.optim.Adam(model.parameters(), lr=0.1), tmp_path / "run", every=1, direction="gradient")
    expected = []
    for _ in range(5):
        w = model.weight.detach().clone()
        g = (x.T @ (x @ w.T - y) / x.shape[0]).reshape(-1)
        expected.append((torch.linalg.vector_norm(hessian @ g) / torch.linalg.vector_norm(g)).item())
        rec.step(lambda: 0.5 * ((model(x) - y) ** 2).mean())
    rec.close()
    assert load_run(tmp_path / "run").metrics.smoothness.tolist() == pytest.approx(expected, rel=1e-8)


def test_same_seed_writes_identical_tables(tmp_path):
    def run_once(name):
        torch.manual_seed(0)
        model = _net()
        g = torch.Generator().manual_seed(1)
        rec = Recorder(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            tmp_path / name,
            clipper=AutoClip(model.parameters(), p=10),
            every=3,
        )
        for _ in range(25):
            x, y = torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g)
            rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        rec.log_eval(score=1.5)
        rec.close()
        return load_run(tmp_path / name)

    a, b = run_once("a"), run_once("b")
    for table in ("metrics", "steps", "layers", "eval"):
        x, y = getattr(a, table), getattr(b, table)
        cols = [c for c in x.columns if c != "time_s"]
        assert len(x) > 0
        assert x[cols].equals(y[cols])


def test_steps_table_has_every_step_and_metrics_match_it(tmp_path):
    model, x, y = _least_squares()
    run, _ = _run_recorded(
        model,
        lambda t: lambda: 0.5 * ((model(x) - y) ** 2).mean(),
        47,
        tmp_path,
        every=10,
        clipper=AutoClip(model.parameters(), p=10),
    )
    assert run.steps.step.tolist() == list(range(1, 48))
    merged = run.metrics.merge(run.steps, on="step", suffixes=("", "_s"))
    assert (merged.loss == merged.loss_s).all() and (merged.grad_norm == merged.grad_norm_s).all()
    assert np.allclose(run.metrics.clip_coef, np.minimum(1, run.metrics.threshold / run.metrics.grad_norm))
    assert run.config["status"] == "finished" and run.config["clipper"]["kind"] == "AutoClip"


def test_recorder_refuses_an_existing_run(tmp_path):
    model, x, y = _least_squares()
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run")
    rec.close()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(RunError, match="already holds a run"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
