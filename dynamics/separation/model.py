"""STFT front end and the BLSTM mask-inference network."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Stft(nn.Module):
    """8 kHz, 32 ms sqrt-Hann windows, 8 ms hop (256 / 64 samples, 129 bins), as in the paper."""

    def __init__(self, n_fft: int = 256, hop: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft).sqrt(), persistent=False)

    def forward(self, wav: Tensor) -> Tensor:
        """(..., n) -> complex (..., frames, bins)."""
        shape = wav.shape
        spec = torch.stft(
            wav.reshape(-1, shape[-1]), self.n_fft, self.hop, window=self.window, center=True, return_complex=True
        )
        return spec.transpose(-1, -2).reshape(*shape[:-1], spec.shape[-1], spec.shape[-2])

    def inverse(self, spec: Tensor, length: int) -> Tensor:
        """complex (..., frames, bins) -> (..., length)."""
        shape = spec.shape
        flat = spec.reshape(-1, shape[-2], shape[-1]).transpose(-1, -2)
        wav = torch.istft(flat, self.n_fft, self.hop, window=self.window, center=True, length=length)
        return wav.reshape(*shape[:-2], length)


class MaskInferenceNet(nn.Module):
    """Stacked BLSTM on the log-magnitude STFT, then linear + sigmoid: one mask per source.

    The paper's Fig. 1 network is ``layers=2, hidden=300``; its Table 1 one ``layers=4, hidden=600``.

    Example::

        net = MaskInferenceNet(hidden=300, layers=2)
        masks = net(torch.randn(4, 100, 129).abs())   # (batch, sources, frames, bins)
    """

    def __init__(self, n_bins: int = 129, hidden: int = 64, layers: int = 2, n_sources: int = 2, dropout: float = 0.0):
        super().__init__()
        self.n_bins, self.n_sources = n_bins, n_sources
        self.blstm = nn.LSTM(
            n_bins,
            hidden,
            num_layers=layers,
            bidirectional=True,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(2 * hidden, n_bins * n_sources)

    def forward(self, magnitude: Tensor) -> Tensor:
        """(batch, frames, bins) mixture magnitude -> (batch, sources, frames, bins) masks."""
        features = torch.log(magnitude + 1e-6)
        features = features - features.mean(dim=(1, 2), keepdim=True)  # loudness-invariant input
        out, _ = self.blstm(features)
        masks = torch.sigmoid(self.head(out))
        b, t, _ = masks.shape
        return masks.view(b, t, self.n_sources, self.n_bins).transpose(1, 2)
