"""STFT front end, the BLSTM mask-inference network and the paper's other networks (one per loss)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynamics.tasks.separation.kmeans import kmeans_masks
from dynamics.tasks.separation.losses import masked_waveforms


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


class _BlstmTrunk(nn.Module):
    """The shared trunk: stacked BLSTM on the (loudness-normalised) log-magnitude STFT."""

    def __init__(self, n_bins: int, hidden: int, layers: int, n_sources: int, dropout: float):
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

    def trunk(self, magnitude: Tensor) -> Tensor:
        """(batch, frames, bins) mixture magnitude -> (batch, frames, 2 * hidden) BLSTM output."""
        features = torch.log(magnitude + 1e-6)
        features = features - features.mean(dim=(1, 2), keepdim=True)  # loudness-invariant input
        out, _ = self.blstm(features)
        return out


class MaskInferenceNet(_BlstmTrunk):
    """Stacked BLSTM on the log-magnitude STFT, then linear + sigmoid: one mask per source.

    The paper's Fig. 1 network is ``layers=2, hidden=300``; its Table 1 one ``layers=4, hidden=600``.

    Example::

        net = MaskInferenceNet(hidden=300, layers=2)
        masks = net(torch.randn(4, 100, 129).abs())   # (batch, sources, frames, bins)
    """

    def __init__(self, n_bins: int = 129, hidden: int = 64, layers: int = 2, n_sources: int = 2, dropout: float = 0.0):
        super().__init__(n_bins, hidden, layers, n_sources, dropout)
        self.head = nn.Linear(2 * hidden, n_bins * n_sources)

    def forward(self, magnitude: Tensor) -> Tensor:
        """(batch, frames, bins) mixture magnitude -> (batch, sources, frames, bins) masks."""
        masks = torch.sigmoid(self.head(self.trunk(magnitude)))
        b, t, _ = masks.shape
        return masks.view(b, t, self.n_sources, self.n_bins).transpose(1, 2)


HEADS = {
    "mi": ("masks",),
    "snr": ("masks",),
    "dc": ("embedding",),
    "wkm": ("embedding",),
    "chimera": ("embedding", "masks"),
}


class SeparationNet(_BlstmTrunk):
    """The paper's networks (Sec. 4.2), one per loss: the BLSTM trunk of :class:`MaskInferenceNet`
    with the heads its loss needs.

    - "mi", "snr": two sigmoid masks (the "snr" network's inverse STFT is in the loss path,
      :func:`~dynamics.tasks.separation.losses.masked_waveforms`);
    - "dc", "wkm": a ``embedding_dim``-dimensional embedding per TF point, sigmoid then unit-normalised;
    - "chimera": both.

    ``forward`` returns a dict: "masks" (batch, sources, frames, bins) and/or "embedding"
    (batch, frames, bins, embedding_dim). The mask head is named ``head`` like MaskInferenceNet's, so
    ``SeparationNet("mi")`` has the same parameter names, and (built after the same seed) the same
    initial values.

    Example::

        net = SeparationNet("chimera", hidden=300, layers=2)
        out = net(torch.randn(4, 100, 129).abs())   # out["masks"], out["embedding"]
    """

    def __init__(
        self,
        loss: str,
        n_bins: int = 129,
        hidden: int = 64,
        layers: int = 2,
        n_sources: int = 2,
        embedding_dim: int = 20,
        dropout: float = 0.0,
    ):
        if loss not in HEADS:
            raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(HEADS)}")
        super().__init__(n_bins, hidden, layers, n_sources, dropout)
        self.loss, self.embedding_dim = loss, embedding_dim
        if "masks" in HEADS[loss]:
            self.head = nn.Linear(2 * hidden, n_bins * n_sources)
        if "embedding" in HEADS[loss]:
            self.embedding_head = nn.Linear(2 * hidden, n_bins * embedding_dim)

    def forward(self, magnitude: Tensor) -> dict[str, Tensor]:
        """(batch, frames, bins) mixture magnitude -> {"masks": ..., "embedding": ...} as the loss needs."""
        out = self.trunk(magnitude)
        b, t, _ = out.shape
        result = {}
        if "masks" in HEADS[self.loss]:
            masks = torch.sigmoid(self.head(out))
            result["masks"] = masks.view(b, t, self.n_sources, self.n_bins).transpose(1, 2)
        if "embedding" in HEADS[self.loss]:
            embedding = torch.sigmoid(self.embedding_head(out)).view(b, t, self.n_bins, self.embedding_dim)
            result["embedding"] = torch.nn.functional.normalize(embedding, dim=-1)
        return result


def estimate_sources(
    loss_name: str, outputs: dict, mixture_spec: Tensor, stft: Stft, length: int, n_sources: int = 2
) -> Tensor:
    """Separated waveforms (B, C, length) from a :class:`SeparationNet`'s outputs.

    Mask networks ("mi", "snr", "chimera": its mask head) apply their masks to the mixture STFT
    (B, T, F) and invert with the mixture phase; embedding networks ("dc", "wkm") first turn their
    embeddings into binary masks by k-means on each item (:func:`~dynamics.tasks.separation.kmeans.kmeans_masks`,
    ``n_sources`` clusters, weighted by the mixture magnitude; no gradient).
    """
    if loss_name not in HEADS:
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {', '.join(HEADS)}")
    if "masks" in HEADS[loss_name]:
        masks = outputs["masks"]
    else:
        masks = kmeans_masks(outputs["embedding"], mixture_spec.abs(), k=n_sources)
    return masked_waveforms(masks, mixture_spec, stft, length)
