"""Atomic checkpoints: written to a temporary name, then renamed over the old one."""

from __future__ import annotations

import errno
import os
import random
import shutil
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
    """torch.save to ``path`` atomically (and durably: fsync before the rename).

    On failure nothing is left under either name, the previous checkpoint stays, and a full
    disk is reported as such (torch's own message, "unexpected pos", does not say it).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError) and isinstance(e, Exception) and disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """True when the file system of ``folder`` has less than ``margin`` bytes free."""
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    # weights_only=False: the checkpoint holds numpy and Python RNG states, and only this
    # project writes it, inside the user's own run directory.
    return torch.load(path, map_location=map_location, weights_only=False)
