"""AutoClip under torch.distributed: DDP and FSDP2, 2 processes, gloo, CPU.

One group of two worker processes runs every scenario (process start with the torch import is the
expensive part); each scenario writes its per-rank results to a file and the tests below compare
them, in this process, with oracles that do not go through autoclip: numpy.percentile, an
unsharded single-process copy of the model, float64 norms summed by hand across ranks, and
torch.nn.utils.clip_grad_norm_.

The workers are this file run as a script (``python tests/test_distributed.py RANK OUT_DIR``), so
nothing depends on how pytest imported the module.
"""

from __future__ import annotations

import copy
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import run_scenarios, scenario_results, spawn_ranks

WORLD = 2
P = 10.0
DDP_STEPS = 20
FSDP_STEPS = 12
TIMEOUT_S = 150  # whole worker group; the scenarios themselves take a few seconds

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _has_fully_shard(), reason="torch.distributed.fsdp.fully_shard missing")


# -- shared by the workers -------------------------------------------------------------------------


def _batch(step: int, rank: int, n_in: int, n_out: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s shard at ``step``: every rank (and the reference) can rebuild every shard."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    scale = 1.0 + 3.0 * ((step * 7 + rank * 3) % 5)  # gradient norms that vary from step to step
    x = torch.randn(n, n_in, generator=g) * scale
    y = torch.randn(n, n_out, generator=g)
    return x, y


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _norm64(tensors) -> float:
    """L2 norm of plain tensors, in float64, without torch's norm kernels."""
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def _global_norm64(grads) -> float:
    """Global L2 norm of DTensor gradients: each rank's local shards, summed across ranks by hand."""
    local = sum(float(g.to_local().double().square().sum()) for g in grads)
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    return math.sqrt(float(total))


def _mlp(seed: int) -> torch.nn.Module:
    # Odd sizes on purpose: FSDP2 shards dim 0 unevenly (3 rows -> 2 + 1) and the last layer's
    # weight (1 x 3) and bias (1,) leave rank 1 with an empty shard.
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 10),
        torch.nn.Tanh(),
        torch.nn.Linear(10, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    )


def _fsdp_pair(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(FSDP2-sharded model, unsharded reference with the same initial parameters)."""
    from torch.distributed.fsdp import fully_shard

    model = _mlp(seed)
    ref = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, ref


@torch.no_grad()
def _sync_reference(ref: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give the reference the sharded model's current (full) parameters: no drift between them."""
    for r, m in zip(ref.parameters(), model.parameters()):
        r.copy_(m.full_tensor())


def _reference_backward(ref: torch.nn.Module, step: int, loss_scale: float = 1.0) -> None:
    """FSDP2 averages the ranks' gradients: the reference differentiates the mean of the ranks' losses."""
    ref.zero_grad(set_to_none=True)
    loss = sum(_loss(ref, _batch(step, r, 5, 1)) for r in range(WORLD)) / WORLD
    (loss * loss_scale).backward()


def _full_grads(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.grad.full_tensor().double().numpy() for p in model.parameters()]


def _plain_grads(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.grad.detach().double().numpy().copy() for p in model.parameters()]


# -- scenarios (run in every worker) ---------------------------------------------------------------


def scenario_ddp(rank: int) -> dict:
    """DDP, each rank its own shard, AutoClip(p=10) + Adam; a 1-process full-batch reference in step."""
    from torch.nn.parallel import DistributedDataParallel

    from autoclip import AutoClip

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    clip = AutoClip(ddp.parameters(), p=P)
    ref_clip = AutoClip(ref.parameters(), p=P)
    out = defaultdict(list)
    for t in range(DDP_STEPS):
        with torch.no_grad():  # reference at the DDP model's parameters, on both ranks' shards (batch 2B)
            for r, m in zip(ref.parameters(), model.parameters()):
                r.copy_(m)
        ref.zero_grad(set_to_none=True)
        shards = [_batch(t, r, 8, 4) for r in range(WORLD)]
        full = (torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards]))
        _loss(ref, full).backward()
        ref_info = ref_clip.step()

        opt.zero_grad(set_to_none=True)
        loss = _loss(ddp, shards[rank])
        loss.backward()
        own = _norm64(p.grad for p in model.parameters())
        info = clip.step()
        opt.step()
        for key, value in (
            ("norm", info.grad_norm),
            ("threshold", info.threshold),
            ("clipped", info.clipped),
            ("loss", loss.item()),
            ("own_norm", own),
            ("ref_norm", ref_info.grad_norm),
            ("ref_threshold", ref_info.threshold),
        ):
            out[key].append(value)
    out["history"] = sorted(clip.histories[0].values())
    # The same numbers, gathered by the collective itself (not only by the files).
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, (out["norm"], out["threshold"]))
    out["gathered"] = gathered
    return dict(out)


def scenario_fsdp_autoclip(rank: int) -> dict:
    """FSDP2 + AutoClip(p=10) + Adam against an unsharded reference synced to it every step."""
    from autoclip import AutoClip

    model, ref = _fsdp_pair(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clip = AutoClip(model.parameters(), p=P)
    ref_clip = AutoClip(ref.parameters(), p=P)
    out = defaultdict(list)
    for t in range(FSDP_STEPS):
        _sync_reference(ref, model)
        _reference_backward(ref, t)
        out["ref_norm"].append(_norm64(p.grad for p in ref.parameters()))
        ref_info = ref_clip.step()

        opt.zero_grad(set_to_none=True)
        _loss(model, _batch(t, rank, 5, 1)).backward()
        info = clip.step()
        out["clipped_norm"].append(_global_norm64([p.grad for p in model.parameters()]))
        out["grads"].append(_full_grads(model))
        out["ref_grads"].append(_plain_grads(ref))
        opt.step()
        out["norm"].append(info.grad_norm)
        out["threshold"].append(info.threshold)
        out["clipped"].append(info.clipped)
        out["ref_threshold"].append(ref_info.threshold)
    return dict(out)


def scenario_fsdp_per_group(rank: int) -> dict:
    """FSDP2 + AutoClip(per_group=True) on two optimizer parameter groups."""
    from autoclip import AutoClip

    model, ref = _fsdp_pair(seed=2)

    def split(m: torch.nn.Module) -> list[dict]:  # two groups: the first layer, the other two
        return [
            {"params": list(m[0].parameters())},
            {"params": list(m[2].parameters()) + list(m[4].parameters())},
        ]

    opt = torch.optim.Adam(split(model), lr=1e-2)
    clip = AutoClip(opt.param_groups, p=P, per_group=True)
    ref_clip = AutoClip(split(ref), p=P, per_group=True)
    out = defaultdict(list)
    for t in range(FSDP_STEPS):
        _sync_reference(ref, model)
        _reference_backward(ref, t)
        out["ref_group_norms"].append([_norm64(p.grad for p in g["params"]) for g in split(ref)])
        ref_info = ref_clip.step()

        opt.zero_grad(set_to_none=True)
        _loss(model, _batch(t, rank, 5, 1)).backward()
        info = clip.step()
        out["clipped_group_norms"].append([_global_norm64([p.grad for p in g["params"]]) for g in opt.param_groups])
        out["grads"].append(_full_grads(model))
        out["ref_grads"].append(_plain_grads(ref))
        opt.step()
        out["norm"].append(info.grad_norm)
        out["group_norms"].append(list(info.group_grad_norms))
        out["group_thresholds"].append(list(info.group_thresholds))
        out["ref_group_thresholds"].append(list(ref_info.group_thresholds))
    return dict(out)


def scenario_fsdp_clipnorm(rank: int) -> dict:
    """FSDP2 + ClipNorm against clip_grad_norm_ on the unsharded model, clipping and not clipping."""
    from autoclip import ClipNorm

    out = []
    # max_norm = factor * the true norm. With tiny gradients (loss scaled by 1e-5) torch's 1e-6 added
    # to the norm changes the clip factor by ~7%: the clipped gradients show whether it is there.
    for case, (factor, loss_scale) in enumerate(((0.3, 1.0), (5.0, 1.0), (0.5, 1e-5))):
        model, ref = _fsdp_pair(seed=3 + case)
        _reference_backward(ref, step=case, loss_scale=loss_scale)
        true_norm = _norm64(p.grad for p in ref.parameters())
        max_norm = factor * true_norm
        torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        (_loss(model, _batch(case, rank, 5, 1)) * loss_scale).backward()
        info = ClipNorm(model.parameters(), max_norm).step()
        out.append(
            {
                "factor": factor,
                "loss_scale": loss_scale,
                "true_norm": true_norm,
                "norm": info.grad_norm,
                "clipped": info.clipped,
                "grads": _full_grads(model),
                "ref_grads": _plain_grads(ref),
            }
        )
    return out


SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp_autoclip": scenario_fsdp_autoclip,
    "fsdp_per_group": scenario_fsdp_per_group,
    "fsdp_clipnorm": scenario_fsdp_clipnorm,
}


def _worker(rank: int, out_dir: Path) -> None:
    run_scenarios(rank, out_dir, WORLD, SCENARIOS, rank)


# -- the parent side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Start the two workers once, wait for them, return the folder of their result files."""
    return spawn_ranks(__file__, tmp_path_factory.mktemp("distributed"), WORLD, TIMEOUT_S)


def _results(out_dir: Path, name: str) -> list:
    return scenario_results(out_dir, name, WORLD)


def _assert_rel(actual, expected, rtol: float, what: str) -> None:
    np.testing.assert_allclose(np.asarray(actual, float), np.asarray(expected, float), rtol=rtol, atol=0, err_msg=what)


def _assert_grads_close(grads, ref_grads, rtol: float, what: str) -> None:
    """Every gradient within rtol of the reference; entries near 0 within rtol/10 of the largest one."""
    assert len(grads) == len(ref_grads)
    atol = rtol / 10 * max(np.abs(r).max(initial=0.0) for r in ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape, f"{what}: parameter {i} has shape {g.shape}, reference {r.shape}"
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{what}: parameter {i}")


# -- DistributedDataParallel -----------------------------------------------------------------------


def test_ddp_every_rank_gets_the_same_norm_and_threshold(runs):
    r0, r1 = _results(runs, "ddp")
    assert r0["loss"] != r1["loss"], "the ranks should train on different shards"
    assert len(r0["norm"]) == DDP_STEPS
    # Averaged gradients are identical on every rank, so the norms and thresholds are too, bit for bit.
    assert r0["norm"] == r1["norm"]
    assert r0["threshold"] == r1["threshold"]
    assert r0["clipped"] == r1["clipped"]
    assert r0["gathered"] == r1["gathered"] == [(r0["norm"], r0["threshold"])] * WORLD
    assert 0 < sum(r0["clipped"]) < DDP_STEPS, "p=10 should clip some steps and not others"


def test_ddp_thresholds_are_numpy_percentiles_of_the_history(runs):
    r0, _ = _results(runs, "ddp")
    norms = r0["norm"]
    expected = [np.percentile(norms[: t + 1], P) for t in range(DDP_STEPS)]
    _assert_rel(r0["threshold"], expected, 1e-12, "threshold vs numpy.percentile of the norms so far")
    assert r0["history"] == sorted(norms), "the history holds exactly the norms seen"
    assert r0["clipped"] == [n > th for n, th in zip(norms, r0["threshold"])]


def test_ddp_norm_is_the_averaged_gradient_of_the_full_batch(runs):
    for r in _results(runs, "ddp"):
        # grad_norm is the norm of the (all-reduced) gradient that this rank holds ...
        _assert_rel(r["norm"], r["own_norm"], 1e-6, "AutoClip norm vs float64 norm of the DDP gradients")
        # ... which is the one-process gradient of the mean loss over batch 2B.
        _assert_rel(r["norm"], r["ref_norm"], 1e-5, "DDP norm vs one process on the full batch")
        _assert_rel(r["threshold"], r["ref_threshold"], 1e-5, "DDP threshold vs one process on the full batch")


# -- FSDP2 (fully_shard, DTensor gradients) --------------------------------------------------------


@needs_fsdp2
def test_fsdp2_grad_norm_is_the_global_norm(runs):
    results = _results(runs, "fsdp_autoclip")
    for rank, r in enumerate(results):
        # Not the local shard's norm: the norm of the unsharded model's (rank-averaged) gradient.
        _assert_rel(r["norm"], r["ref_norm"], 1e-5, f"rank {rank}: FSDP2 grad_norm vs unsharded gradient norm")
    assert results[0]["norm"] == results[1]["norm"]
    assert results[0]["threshold"] == results[1]["threshold"]


@needs_fsdp2
def test_fsdp2_threshold_and_clipped_norm(runs):
    for rank, r in enumerate(_results(runs, "fsdp_autoclip")):
        norms, thresholds = r["norm"], r["threshold"]
        expected = [np.percentile(norms[: t + 1], P) for t in range(FSDP_STEPS)]
        _assert_rel(thresholds, expected, 1e-12, f"rank {rank}: threshold vs numpy.percentile")
        _assert_rel(thresholds, r["ref_threshold"], 1e-5, f"rank {rank}: threshold vs one-process AutoClip")
        assert r["clipped"] == [n > th for n, th in zip(norms, thresholds)]
        assert 0 < sum(r["clipped"]) < FSDP_STEPS, "p=10 should clip some steps and not others"
        # After clipping, the global norm of the sharded gradients is min(grad_norm, threshold) ...
        _assert_rel(
            r["clipped_norm"],
            np.minimum(norms, thresholds),
            1e-5,
            f"rank {rank}: global norm after clipping vs min(grad_norm, threshold)",
        )
        # ... and the gradients themselves are the one-process AutoClip's clipped gradients.
        for t in range(FSDP_STEPS):
            _assert_grads_close(r["grads"][t], r["ref_grads"][t], 1e-5, f"rank {rank}, step {t}")


@needs_fsdp2
def test_fsdp2_per_group(runs):
    results = _results(runs, "fsdp_per_group")
    assert results[0]["group_norms"] == results[1]["group_norms"]
    assert results[0]["group_thresholds"] == results[1]["group_thresholds"]
    for rank, r in enumerate(results):
        group_norms = np.asarray(r["group_norms"])  # (steps, groups)
        thresholds = np.asarray(r["group_thresholds"])
        assert group_norms.shape == (FSDP_STEPS, 2)
        _assert_rel(group_norms, r["ref_group_norms"], 1e-5, f"rank {rank}: group norms vs unsharded")
        _assert_rel(r["norm"], np.sqrt((group_norms**2).sum(axis=1)), 1e-6, f"rank {rank}: total vs group norms")
        for k in range(2):
            expected = [np.percentile(group_norms[: t + 1, k], P) for t in range(FSDP_STEPS)]
            _assert_rel(thresholds[:, k], expected, 1e-12, f"rank {rank}: group {k} threshold vs numpy")
        _assert_rel(thresholds, r["ref_group_thresholds"], 1e-5, f"rank {rank}: vs one-process AutoClip")
        assert (group_norms > thresholds).any(), "some group should have been clipped"
        _assert_rel(
            r["clipped_group_norms"],
            np.minimum(group_norms, thresholds),
            1e-5,
            f"rank {rank}: each group's global norm after clipping vs min(norm, threshold)",
        )
        for t in range(FSDP_STEPS):
            _assert_grads_close(r["grads"][t], r["ref_grads"][t], 1e-5, f"rank {rank}, step {t}")


@needs_fsdp2
def test_fsdp2_clipnorm_matches_clip_grad_norm_unsharded(runs):
    for rank, cases in enumerate(_results(runs, "fsdp_clipnorm")):
        assert [c["clipped"] for c in cases] == [True, False, True]
        for c in cases:
            what = f"rank {rank}, max_norm = {c['factor']} x norm, loss x {c['loss_scale']}"
            _assert_rel(c["norm"], c["true_norm"], 1e-5, f"{what}: grad_norm vs unsharded")
            _assert_grads_close(c["grads"], c["ref_grads"], 1e-6, what)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
