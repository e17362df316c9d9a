"""The built-in task: two-speaker separation with a BLSTM mask-inference network, as in the paper."""

from dynamics.separation.data import SyntheticMixtures, Wsj0Mix, synth_source
from dynamics.separation.losses import mask_inference_loss
from dynamics.separation.metrics import pit_si_sdr, si_sdr
from dynamics.separation.model import MaskInferenceNet, Stft

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
