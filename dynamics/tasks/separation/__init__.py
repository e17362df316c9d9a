"""The built-in task: two-speaker separation with a BLSTM mask-inference network, as in the paper."""

from dynamics.tasks.separation.data import SyntheticMixtures, Wsj0Mix, synth_source
from dynamics.tasks.separation.losses import mask_inference_loss
from dynamics.tasks.separation.metrics import pit_si_sdr, si_sdr
from dynamics.tasks.separation.model import MaskInferenceNet, Stft

__all__ = [
    "MaskInferenceNet",
    "Stft",
    "SyntheticMixtures",
    "Wsj0Mix",
    "mask_inference_loss",
    "pit_si_sdr",
    "si_sdr",
    "synth_source",
]
