"""dynamics: record step size, gradient norm, loss, smoothness and threshold along training.

Names are imported on first use, so reading runs (``load_run``) does not import torch.
"""

from importlib import import_module

_NAMES = {
    "DynamicsError": "dynamics.errors",
    "Recorder": "dynamics.recorder",
    "Run": "dynamics.run",
    "RunError": "dynamics.run",
    "load_run": "dynamics.run",
    "load_runs": "dynamics.index",
    "save_run": "dynamics.run",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'dynamics' has no attribute {name!r}")
