"""GradientNoiseScale against closed forms: loss ½‖θ − x‖² with x ~ N(μ, σ²I) per example and θ fixed, whose
per-example gradients θ − x have covariance σ²I, so B_simple = tr(Σ)/|G|² = σ²d/‖θ − μ‖².

Two oracles: every recorded value equals the estimator recomputed in numpy from the data (exact), and
the moving averages converge to the closed form (within 5%). Once from micro-batches on one process,
once from the ranks of a two-process DistributedDataParallel run (this file run as a script is the
worker, ``python tests/test_noise_scale.py RANK OUT_DIR``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_scenarios, save_load, scenario_results, spawn_ranks

from autoclip import AutoClip
from dynamics import Recorder, load_run
from dynamics.errors import DynamicsError
from dynamics.quantities import GradientNoiseScale, HessianTrace, Sharpness

D = 4096  # dimensions: the squared norms concentrate, so few steps suffice
SIGMA = 1.0
GAP = math.sqrt(D / 8)  # ‖θ − μ‖: B_simple = σ²d/‖θ − μ‖² = 8 examples
BETA = 0.9
WORLD = 2


class Mean(torch.nn.Module):
    """θ ∈ R^d, loss ½‖θ − x‖² averaged over the examples x."""

    def __init__(self):
        super().__init__()
        direction = torch.ones(D, dtype=torch.float64) / math.sqrt(D)
        self.theta = torch.nn.Parameter(GAP * direction)  # μ = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.theta - x).square().sum(dim=1).mean()


def examples(step: int, part: int, n: int) -> torch.Tensor:
    """``n`` examples x ~ N(0, σ²I) for micro-batch (or rank) ``part`` of ``step``: anyone can rebuild them."""
    g = torch.Generator().manual_seed(10_000 * step + part)
    return SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)


def estimator(small_grads: list[np.ndarray], b: int, state: dict) -> tuple[float, float, float]:
    """The McCandlish et al. estimators and their bias-corrected moving averages, in numpy."""
    k = len(small_grads)
    s = np.mean([g @ g for g in small_grads])
    big = np.mean(small_grads, axis=0)
    t = big @ big
    grad_sq, trace = (k * t - s) / (k - 1), b * k * (s - t) / (k - 1)
    state["g"] = BETA * state.get("g", 0.0) + (1 - BETA) * grad_sq
    state["tr"] = BETA * state.get("tr", 0.0) + (1 - BETA) * trace
    state["n"] = state.get("n", 0) + 1
    correction = 1 - BETA ** state["n"]
    return state["tr"] / state["g"], state["g"] / correction, state["tr"] / correction


def expected_series(theta: np.ndarray, steps: int, parts: int, b: int) -> np.ndarray:
    """``estimator`` at steps 1..steps, each from ``parts`` gradients of ``b`` examples at ``theta`` (the
    quadratic's gradient, theta - mean x): rows (noise scale, |G|^2, tr Sigma)."""
    state: dict = {}
    rows = []
    for step in range(1, steps + 1):
        grads = [theta - examples(step, part, b).numpy().mean(axis=0) for part in range(parts)]
        rows.append(estimator(grads, b, state))
    return np.array(rows)


def accumulate(rec: Recorder, model: Mean, step: int, n: int, b: int) -> None:
    """One optimizer step over ``n`` micro-batches of ``b`` examples, each loss scaled by 1/n."""
    rec.begin()
    total = 0.0
    for i in range(n):
        loss = model(examples(step, i, b)) / n
        loss.backward()
        rec.micro_batch()
        total += loss.detach()
    info = rec.after_backward()
    if not info.skip:
        rec.optimizer.step()
    rec.optimizer.zero_grad()
    rec.end(total)


def micro_batch_run(run_dir: Path, steps: int, n: int, b: int, micro_batch_size: int | None, every: int = 1):
    """A run with θ fixed: ``steps`` steps of ``n`` micro-batches of ``b`` examples; its metrics and θ."""
    model = Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # θ fixed
    quantity = GradientNoiseScale(beta=BETA, micro_batch_size=micro_batch_size)
    rec = Recorder(model, opt, run_dir, every=every, quantities=[quantity])
    for step in range(1, steps + 1):
        accumulate(rec, model, step, n, b)
    rec.close()
    return load_run(run_dir).metrics, model.theta.detach().numpy()


def test_noise_scale_from_micro_batches_is_the_estimator_and_converges_to_the_closed_form(tmp_path):
    steps, n, b = 40, 4, 4
    metrics, theta = micro_batch_run(tmp_path / "run", steps, n, b, micro_batch_size=b)
    expected = expected_series(theta, steps, n, b)
    np.testing.assert_allclose(metrics.gradient_noise_scale, expected[:, 0], rtol=1e-9)
    np.testing.assert_allclose(metrics.gns_grad_sq, expected[:, 1], rtol=1e-9)
    np.testing.assert_allclose(metrics.gns_trace_sigma, expected[:, 2], rtol=1e-9)
    last = metrics.iloc[-1]
    assert last.gradient_noise_scale == pytest.approx(SIGMA**2 * D / GAP**2, rel=0.05)
    assert last.gns_trace_sigma == pytest.approx(SIGMA**2 * D, rel=0.05)
    assert last.gns_grad_sq == pytest.approx(GAP**2, rel=0.05)
    # without the micro-batch size, B_simple and tr(Σ) count micro-batches
    units, _ = micro_batch_run(tmp_path / "units", 5, n, b, micro_batch_size=None)
    np.testing.assert_allclose(units.gradient_noise_scale * b, metrics.gradient_noise_scale[:5], rtol=1e-12)
    np.testing.assert_allclose(units.gns_grad_sq, metrics.gns_grad_sq[:5], rtol=1e-12)


def test_noise_scale_without_micro_batches_says_how_to_get_them(tmp_path):
    model = Mean()
    rec = Recorder(
        model, torch.optim.SGD(model.parameters(), lr=0.0), tmp_path / "run", every=1, quantities=[GradientNoiseScale()]
    )
    with pytest.raises(DynamicsError, match=r"call rec.micro_batch\(\) after each one's backward"):
        rec.step(lambda: model(examples(1, 0, 4)))


def test_bad_arguments_name_the_fix():
    with pytest.raises(DynamicsError, match=r"beta must be in \[0, 1\)"):
        GradientNoiseScale(beta=1.0)
    with pytest.raises(DynamicsError, match="micro_batch_size must be a positive integer"):
        GradientNoiseScale(micro_batch_size=0)
    assert repr(GradientNoiseScale(every=40, micro_batch_size=8)) == (
        "GradientNoiseScale(every=40, beta=0.9, micro_batch_size=8)"
    )


def test_noise_scale_resumes_exactly(tmp_path):
    straight, _ = micro_batch_run(tmp_path / "straight", 8, 3, 2, micro_batch_size=2, every=2)
    model = Mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def recorder(resume):
        quantities = [GradientNoiseScale(beta=BETA, micro_batch_size=2)]
        return Recorder(model, opt, tmp_path / "parts", every=2, quantities=quantities, resume=resume)

    rec = recorder(False)
    for step in range(1, 5):
        accumulate(rec, model, step, 3, 2)
    rec = recorder(save_load(rec.release()))  # the averages travel through torch.save(weights_only)
    for step in range(5, 9):
        accumulate(rec, model, step, 3, 2)
    rec.close()
    parts = load_run(tmp_path / "parts").metrics
    columns = ["step", "gradient_noise_scale", "gns_grad_sq", "gns_trace_sigma"]
    assert parts[columns].equals(straight[columns])
    assert parts.step.tolist() == [2, 4, 6, 8]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))


def _mlp_batch(step: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + part)
    return torch.randn(6, 5, generator=g), torch.randn(6, 1, generator=g)


def test_attaching_it_never_changes_training(tmp_path):
    def train(record: bool):
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        clip = AutoClip(model.parameters(), p=50)
        torch.manual_seed(9)
        rec = None
        if record:
            quantities = [*Recorder.default_quantities(), GradientNoiseScale(micro_batch_size=6)]
            rec = Recorder(model, opt, tmp_path / "run", clipper=clip, every=2, quantities=quantities)
        for step in range(1, 9):
            parts = [_mlp_batch(step, i) for i in range(3)]
            if rec is not None:
                rec.begin()
            total = 0.0
            for x, y in parts:
                loss = torch.nn.functional.mse_loss(model(x), y) / 3
                loss.backward()
                total += loss.detach()
                if rec is not None:
                    rec.micro_batch()
            info = rec.after_backward() if rec is not None else clip.step()
            if not info.skip:
                opt.step()
            opt.zero_grad()
            if rec is not None:
                rec.end(total)
        if rec is not None:
            rec.close()
        return [p.detach().clone() for p in model.parameters()], torch.rand(3)

    plain, recorded = train(False), train(True)
    assert all(torch.equal(a, b) for a, b in zip(plain[0], recorded[0]))
    assert torch.equal(plain[1], recorded[1])
    metrics = load_run(tmp_path / "run").metrics
    assert np.isfinite(metrics.gns_trace_sigma).all() and (metrics.gns_trace_sigma > 0).all()


# -- two processes, DistributedDataParallel ----------------------------------------------------------------------

DDP_STEPS = 40
DDP_BATCH = 8


def scenario_closed_form(rank: int, out_dir: Path) -> dict:
    """θ fixed, each rank its own 8 examples a step; GNS from the ranks, and H = I for the HVPs."""
    from torch.nn.parallel import DistributedDataParallel

    module = Mean()
    model = DistributedDataParallel(module)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    quantities = [
        GradientNoiseScale(beta=BETA, micro_batch_size=DDP_BATCH),
        Sharpness(every=20, iters=2),
        HessianTrace(every=20, samples=2),
    ]
    rec = Recorder(model, opt, out_dir / "run", every=1, quantities=quantities)
    for step in range(1, DDP_STEPS + 1):
        x = examples(step, rank, DDP_BATCH)
        rec.step(lambda x=x: model(x))
    rec.close()
    return {"theta": module.theta.detach().numpy().copy()}


def scenario_training_unchanged(rank: int, out_dir: Path) -> dict:
    """The same DDP training with and without the quantity: bit-identical parameters and RNG."""
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for record in (False, True):
        model = DistributedDataParallel(_mlp())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(9 + rank)
        rec = None
        if record:
            quantities = [*Recorder.default_quantities(), GradientNoiseScale()]
            rec = Recorder(model, opt, out_dir / "mlp", every=2, quantities=quantities)
        for step in range(1, 7):
            x, y = _mlp_batch(step, rank)

            def loss(x=x, y=y, model=model):
                return torch.nn.functional.mse_loss(model(x), y)

            if rec is not None:
                rec.step(loss)
            else:
                opt.zero_grad()
                loss().backward()
                opt.step()
        if rec is not None:
            rec.close()
        results[record] = ([p.detach().clone() for p in model.parameters()], torch.rand(3))
    same = all(torch.equal(a, b) for a, b in zip(results[False][0], results[True][0]))
    return {"same_params": same, "same_rng": torch.equal(results[False][1], results[True][1])}


def scenario_autograd_refused(rank: int, out_dir: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Mean())
    rec = Recorder(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        out_dir / "refused",
        every=1,
        quantities=[Sharpness(hvp="autograd")],
    )
    try:
        rec.step(lambda: model(examples(1, rank, 2)))
    except DynamicsError as e:
        return {"error": str(e)}
    return {"error": None}


SCENARIOS = {
    "closed_form": scenario_closed_form,
    "training_unchanged": scenario_training_unchanged,
    "autograd_refused": scenario_autograd_refused,
}


def _worker(rank: int, out_dir: Path) -> None:
    run_scenarios(rank, out_dir, WORLD, SCENARIOS, rank, out_dir)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    """The two workers, run once; the folder of their results."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return spawn_ranks(__file__, tmp_path_factory.mktemp("gns_ddp"), WORLD, 150)


def _results(out_dir: Path, name: str) -> list[dict]:
    return scenario_results(out_dir, name, WORLD)


def test_noise_scale_from_the_ranks_is_the_estimator_and_converges_to_the_closed_form(ddp):
    theta = _results(ddp, "closed_form")[0]["theta"]
    metrics = load_run(ddp / "run").metrics
    expected = expected_series(theta, DDP_STEPS, WORLD, DDP_BATCH)
    np.testing.assert_allclose(metrics.gradient_noise_scale, expected[:, 0], rtol=1e-9)
    np.testing.assert_allclose(metrics.gns_trace_sigma, expected[:, 2], rtol=1e-9)
    assert metrics.gradient_noise_scale.iloc[-1] == pytest.approx(SIGMA**2 * D / GAP**2, rel=0.05)


def test_hessian_vector_products_under_ddp_are_of_the_averaged_loss(ddp):
    metrics = load_run(ddp / "run").metrics.set_index("step")
    measured = metrics.loc[[20, 40]]
    # H = I: top eigenvalue 1, and vᵀv = d for every Rademacher v (ranks summed instead of averaged would give 2)
    assert measured.sharpness.tolist() == pytest.approx([1.0] * 2, rel=1e-6)
    assert measured.hessian_trace.tolist() == pytest.approx([D] * 2, rel=1e-6)


def test_attaching_it_under_ddp_never_changes_training(ddp):
    for result in _results(ddp, "training_unchanged"):
        assert result["same_params"] and result["same_rng"]
    metrics = load_run(ddp / "mlp").metrics
    assert np.isfinite(metrics.gradient_noise_scale).all()


def test_autograd_hvps_under_ddp_are_refused_naming_fd(ddp):
    for result in _results(ddp, "autograd_refused"):
        assert result["error"] is not None and "use hvp='fd' under torch.distributed" in result["error"]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
