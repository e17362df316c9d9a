"""Atomic checkpoints: written to a temporary name, then renamed over the old one."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random stream a training step may draw from: torch (CPU and device), numpy, random."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to ``path`` atomically (and durably: fsync before the rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy and Python RNG states, and only this
    # project writes it, inside the user's own run directory.
    return torch.load(path, map_location=map_location, weights_only=False)
