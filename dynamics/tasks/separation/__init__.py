"""The built-in task: two-speaker separation with a BLSTM mask-inference network, as in the paper.

Names are imported on first use, so reading the task's options does not import torch.
"""

from importlib import import_module

_NAMES = {
    "MaskInferenceNet": "dynamics.tasks.separation.model",
    "Stft": "dynamics.tasks.separation.model",
    "SyntheticMixtures": "dynamics.tasks.separation.data",
    "Wsj0Mix": "dynamics.tasks.separation.data",
    "synth_source": "dynamics.tasks.separation.data",
    "mask_inference_loss": "dynamics.tasks.separation.losses",
    "pit_si_sdr": "dynamics.tasks.separation.metrics",
    "si_sdr": "dynamics.tasks.separation.metrics",
    "TaskOptions": "dynamics.tasks.separation.options",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'dynamics.tasks.separation' has no attribute {name!r}")
