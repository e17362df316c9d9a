"""Small models and loops shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from autoclip import Clipper


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    ).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Regression batches whose gradient norms vary a lot (every 7th batch is scaled up)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        x = torch.randn(8, 6, generator=g, dtype=dtype) * (20.0 if t % 7 == 3 else 1.0)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


def train(
    model: torch.nn.Module,
    data: list,
    clipper_factory=None,
    lr: float = 1e-2,
    optimizer: torch.optim.Optimizer | None = None,
    clipper: Clipper | None = None,
):
    """A plain loop: zero_grad, forward, backward, clip, step. Returns the infos."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    if clipper is None and clipper_factory is not None:
        clipper = clipper_factory(model.parameters())
    infos = []
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clipper is not None:
            info = clipper.step()
            infos.append(info)
            if info.skip:
                continue
        optimizer.step()
    return infos


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def total_norm(tensors) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])).item()


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}


def dyn(*args, **kw) -> subprocess.CompletedProcess:
    """Run `dyn ARGS...` as a user would (a fresh process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, env=CLI_ENV, **kw
    )
