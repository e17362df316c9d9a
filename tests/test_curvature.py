"""Hessian-vector products, Sharpness and HessianTrace against closed forms (quadratics with known spectra),
each other (finite differences vs double backward on the BLSTM), and on a torch.compile'd model."""

import math

import numpy as np
import pytest
import torch

from autoclip import AutoClip
from dynamics import Recorder, load_run
from dynamics.checkpoint import rng_state
from dynamics.errors import ArgumentTypeError, DynamicsError
from dynamics.probe import Probe
from dynamics.quantities import HessianTrace, HessianVectorProducts, Sharpness
from dynamics.tasks.separation.model import MaskInferenceNet

METHODS = ("fd", "autograd")


class Quadratic(torch.nn.Module):
    """f(θ) = ½ θᵀAθ: one parameter vector, the Hessian A."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.linspace(-1.0, 2.0, a.shape[0], dtype=a.dtype))
        self.register_buffer("a", a)

    def forward(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta


def spd(spectrum, seed=0) -> torch.Tensor:
    """Q diag(spectrum) Qᵀ with a random orthogonal Q, float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T


EIGENVALUES = [10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.05]


def record(model, quantities, run_dir, steps=4, every=1, lr=1e-3, call=None):
    """A plain Recorder run of ``steps`` steps on the loss ``call()`` (default: ``model()``); its metrics table."""
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=lr), run_dir, every=every, quantities=quantities)
    for _ in range(steps):
        rec.step(model if call is None else call)
    rec.close()
    return load_run(run_dir).metrics.set_index("step")


@pytest.fixture(scope="module")
def compiled_quadratic():
    """One compiled quadratic for the module (compiling is the slow part); tests reset θ."""
    module = Quadratic(spd(EIGENVALUES, seed=3))
    compiled = torch.compile(module)
    compiled().backward()  # compile forward and backward once, here
    return module, compiled, module.theta.detach().clone()


@pytest.mark.parametrize("method", METHODS)
def test_hessian_vector_product_is_a_times_v_at_every_scale_of_v(method):
    a = spd(EIGENVALUES)
    model = Quadratic(a)
    probe = Probe(list(model.parameters()), model, rng=rng_state())
    theta = [model.theta.detach().clone()]
    g = torch.Generator().manual_seed(5)
    with HessianVectorProducts(probe, theta, method) as hvp:
        for scale in (1e-6, 1.0, 1e6):
            v = torch.randn(len(EIGENVALUES), generator=g, dtype=torch.float64) * scale
            (hv,) = hvp([v])
            expected = a @ v
            assert torch.linalg.vector_norm(hv - expected) <= (1e-7 if method == "fd" else 1e-12) * expected.norm()
    assert torch.equal(model.theta.detach(), theta[0]) and model.theta.grad is None  # no trace


@pytest.mark.parametrize("method", METHODS)
def test_sharpness_is_the_top_eigenvalue_of_a_quadratic(tmp_path, method):
    metrics = record(Quadratic(spd(EIGENVALUES)), [Sharpness(iters=60, hvp=method)], tmp_path / "run", steps=2)
    assert metrics.sharpness.tolist() == pytest.approx([max(EIGENVALUES)] * 2, rel=1e-6)


def test_sharpness_and_trace_with_fd_on_a_compiled_model(tmp_path, compiled_quadratic):
    module, compiled, theta0 = compiled_quadratic
    with torch.no_grad():
        module.theta.copy_(theta0)
    a = module.a
    quantities = [Sharpness(iters=60), HessianTrace(samples=40)]
    metrics = record(compiled, quantities, tmp_path / "run", steps=3)
    assert metrics.sharpness.tolist() == pytest.approx([max(EIGENVALUES)] * 3, rel=1e-6)
    trace = a.trace().item()
    assert np.all(np.abs(metrics.hessian_trace - trace) <= 4 * metrics.hessian_trace_se)


def test_autograd_on_a_compiled_model_fails_naming_fd(tmp_path, compiled_quadratic):
    module, compiled, theta0 = compiled_quadratic
    with torch.no_grad():
        module.theta.copy_(theta0)
    with pytest.raises(DynamicsError, match=r"Sharpness\(hvp='autograd'\).*use hvp='fd'"):
        record(compiled, [Sharpness(hvp="autograd")], tmp_path / "a", steps=1)
    # the Recorder holds the plain module and the closure calls the compiled one: the double backward
    # itself fails, and the error still names the fix
    with pytest.raises(DynamicsError, match=r"HessianTrace\(hvp='autograd'\) needs a double backward.*use hvp='fd'"):
        record(module, [HessianTrace(hvp="autograd")], tmp_path / "b", steps=1, call=compiled)


@pytest.mark.parametrize("method", METHODS)
def test_hessian_trace_is_exact_for_a_diagonal_hessian(tmp_path, method):
    diagonal = torch.tensor([7.0, 3.0, 1.0, 0.5, 0.25, 4.0], dtype=torch.float64)
    metrics = record(Quadratic(torch.diag(diagonal)), [HessianTrace(samples=5, hvp=method)], tmp_path / "run", steps=3)
    rel = 1e-7 if method == "fd" else 1e-12
    assert metrics.hessian_trace.tolist() == pytest.approx([diagonal.sum().item()] * 3, rel=rel)
    assert (metrics.hessian_trace_se <= rel * diagonal.sum().item()).all()  # every sample is exact


def test_hessian_trace_is_within_four_standard_errors_on_a_dense_hessian(tmp_path):
    a = spd(EIGENVALUES, seed=1)
    samples = 30
    fd = record(Quadratic(a), [HessianTrace(samples=samples)], tmp_path / "fd", steps=5)
    exact = record(Quadratic(a), [HessianTrace(samples=samples, hvp="autograd")], tmp_path / "ag", steps=5)
    trace = a.trace().item()
    # Rademacher: Var vᵀAv = 2 (‖A‖²_F − Σ Aᵢᵢ²), the oracle for the standard error estimated from the samples
    se = math.sqrt(2 * ((a**2).sum() - (a.diagonal() ** 2).sum()).item() / samples)
    assert (np.abs(fd.hessian_trace - trace) <= 4 * fd.hessian_trace_se).all()
    assert (np.abs(fd.hessian_trace - trace) > 1e-6 * trace).all()  # an estimate, not tr(A) by another route
    assert ((fd.hessian_trace_se > se / 2) & (fd.hessian_trace_se < 2 * se)).all()
    assert len(set(fd.hessian_trace)) == 5  # new vectors each step
    np.testing.assert_allclose(fd.hessian_trace, exact.hessian_trace, rtol=1e-7)  # the same vectors either way


def _blstm():
    torch.manual_seed(0)
    return MaskInferenceNet(n_bins=6, hidden=5, layers=2, dropout=0.3).double()


def test_fd_and_autograd_agree_on_the_blstm(tmp_path):
    g = torch.Generator().manual_seed(2)
    magnitude = torch.rand(3, 7, 6, generator=g, dtype=torch.float64) + 0.1
    target = torch.rand(3, 2, 7, 6, generator=g, dtype=torch.float64)
    results = {}
    for method in METHODS:
        model = _blstm()

        def loss(model=model):
            return torch.nn.functional.mse_loss(model(magnitude), target)

        quantities = [Sharpness(iters=20, hvp=method), HessianTrace(samples=4, hvp=method)]
        results[method] = record(model, quantities, tmp_path / method, steps=2, lr=0.1, call=loss)
    fd, exact = results["fd"], results["autograd"]
    assert np.isfinite(fd[["sharpness", "hessian_trace", "hessian_trace_se"]].values).all()
    np.testing.assert_allclose(fd.sharpness, exact.sharpness, rtol=1e-3)
    np.testing.assert_allclose(fd.hessian_trace, exact.hessian_trace, rtol=1e-3)
    assert (fd.sharpness > 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_sharpness_and_trace_leave_no_trace_on_training(tmp_path, method):
    def mlp():
        torch.manual_seed(3)
        return torch.nn.Sequential(
            torch.nn.Linear(5, 12),
            torch.nn.BatchNorm1d(12),
            torch.nn.Tanh(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(12, 1),
        )

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)) for _ in range(6)]

    def train(quantities):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        clip = AutoClip(model.parameters(), p=50)
        torch.manual_seed(7)
        rec = (
            None
            if quantities is None
            else Recorder(model, opt, tmp_path / "run", clipper=clip, every=2, quantities=quantities)
        )
        for x, y in data:
            if rec is None:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                if not clip.step().skip:
                    opt.step()
            else:
                rec.step(lambda x=x, y=y: torch.nn.functional.mse_loss(model(x), y))
        if rec is not None:
            rec.close()
        return model, opt, clip, torch.rand(4)

    plain = train(None)
    probed = train([Sharpness(iters=3, hvp=method), HessianTrace(samples=3, hvp=method)])
    for a, b in zip(plain[0].state_dict().values(), probed[0].state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    for sa, sb in zip(plain[1].state.values(), probed[1].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert plain[2].histories[0].values() == probed[2].histories[0].values()
    assert torch.equal(plain[3], probed[3])  # the training RNG stream carries on unchanged
    metrics = load_run(tmp_path / "run").metrics
    assert np.isfinite(metrics[["sharpness", "hessian_trace", "hessian_trace_se"]].values).all()


def test_bad_arguments_name_the_fix():
    with pytest.raises(DynamicsError, match="hvp must be 'fd'"):
        Sharpness(hvp="exact")
    with pytest.raises(DynamicsError, match="samples must be a positive integer"):
        HessianTrace(samples=0)
    with pytest.raises(ArgumentTypeError, match="iters must be a positive integer"):
        Sharpness(iters=2.5)
    assert repr(HessianTrace(every=40, samples=4)) == "HessianTrace(every=40, samples=4, hvp='fd')"
