"""dynamics: record step size, gradient norm, loss, smoothness and threshold along training."""

from dynamics.recorder import Recorder
from dynamics.run import Run, RunError, load_run
from dynamics.smoothness import smoothness

__all__ = ["Recorder", "Run", "RunError", "load_run", "smoothness"]
