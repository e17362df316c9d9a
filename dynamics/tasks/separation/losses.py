"""Separation losses: the paper's five (Sec. 4.1) -- L_DC, L_WKM, L_MI, L_MI+WKM (Chimera) and L_SNR.

The mask and waveform losses (L_MI, the MI part of Chimera, L_SNR) are permutation-invariant (PIT) over
the sources; the embedding losses (L_DC, L_WKM) are permutation-free by construction.
:func:`separation_loss` picks one by name.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def pit_min(per_pair: Tensor) -> Tensor:
    """Given losses[b, i, j] of estimate i against reference j, the mean over the batch of the
    best permutation's mean loss."""
    n = per_pair.shape[-1]
    perms = list(itertools.permutations(range(n)))
    totals = torch.stack([sum(per_pair[:, i, p[i]] for i in range(n)) / n for p in perms], dim=-1)
    return totals.min(dim=-1).values.mean()


def psa_target(mixture: Tensor, sources: Tensor) -> Tensor:
    """Truncated phase-sensitive target T_0^{|X|}(|S| cos(theta_X - theta_S)) (paper eq. 4)."""
    mix_mag = mixture.abs().unsqueeze(1)
    cos = torch.cos(torch.angle(mixture).unsqueeze(1) - torch.angle(sources))
    return torch.minimum(torch.clamp(sources.abs() * cos, min=0.0), mix_mag)


def mask_inference_loss(masks: Tensor, mixture: Tensor, sources: Tensor) -> Tensor:
    """L_MI (paper eq. 4): mean |M_i |X| - T(S_j)| over TF points, minimised over permutations.

    masks (B, C, T, F) real; mixture (B, T, F) and sources (B, C, T, F) complex STFTs.
    """
    estimate = masks * mixture.abs().unsqueeze(1)  # |S_hat| = M |X|; its phase is the mixture's
    target = psa_target(mixture, sources)
    per_pair = (estimate.unsqueeze(2) - target.unsqueeze(1)).abs().mean(dim=(-2, -1))
    return pit_min(per_pair)


# --- the paper's other four losses (Sec. 4.1, eqs. 5-8) ---------------------------------------------

LOSS_NAMES = ("dc", "wkm", "mi", "chimera", "snr")
CHIMERA_ALPHA = 0.75
SNR_EPS = 1e-8
WKM_RIDGE = 1e-10


def ideal_binary_assignment(sources: Tensor) -> Tensor:
    """One-hot ideal binary assignment Y: the dominant source (largest |S_c|) of each TF point.

    sources (B, C, T, F) complex -> (B, T, F, C) in the real dtype matching ``sources``.
    """
    mag = sources.abs()
    dominant = torch.zeros(mag[:, 0].shape, dtype=torch.long, device=mag.device)
    best = mag[:, 0]
    for c in range(1, mag.shape[1]):  # argmax over a short, strided axis: this is ~10x faster on CPU
        louder = mag[:, c] > best  # ties go to the lower index, as with argmax
        dominant = torch.where(louder, c, dominant)
        best = torch.where(louder, mag[:, c], best)
    return torch.nn.functional.one_hot(dominant, mag.shape[1]).to(mag.dtype)


def magnitude_weights(mixture: Tensor) -> Tensor:
    """Magnitude-ratio TF weights w_tf = |X_tf| / sum_tf |X_tf| (each item's weights sum to 1).

    mixture (B, T, F) complex -> (B, T, F) real. Loud TF points count more, silent ones hardly at
    all; with sum w = 1 and non-negative unit-norm embeddings L_DC lies in [0, 1] (paper Sec. 4.1).
    """
    mag = mixture.abs()
    return mag / mag.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(mag.dtype).tiny)


def deep_clustering_loss(embedding: Tensor, mixture: Tensor, sources: Tensor) -> Tensor:
    """L_DC (paper eq. 5): ||W^1/2 (V V^T - Y Y^T) W^1/2||_F^2, mean over the batch.

    embedding (B, T, F, D) real, unit-norm per TF point; mixture (B, T, F) and sources (B, C, T, F)
    complex STFTs. Y is the one-hot ideal binary assignment (:func:`ideal_binary_assignment`), W the
    diagonal of magnitude-ratio weights |X_tf| / sum |X| (:func:`magnitude_weights`), which normalises
    the loss to [0, 1] for the non-negative unit-norm embeddings of the paper's networks.

    Computed in the low-rank form ||V'^T V'||^2 - 2 ||V'^T Y'||^2 + ||Y'^T Y'||^2 with V' = W^1/2 V and
    Y' = W^1/2 Y, i.e. with (D x D), (D x C), (C x C) matrices only: the (TF x TF) affinity is never formed.
    Permutation-free by construction.
    """
    b, d = embedding.shape[0], embedding.shape[-1]
    root_w = magnitude_weights(mixture).reshape(b, -1, 1).sqrt()
    v = embedding.reshape(b, -1, d) * root_w
    y = (ideal_binary_assignment(sources).reshape(b, -1, sources.shape[1]) * root_w).to(v.dtype)
    vv = v.transpose(1, 2) @ v
    vy = v.transpose(1, 2) @ y
    yy = y.transpose(1, 2) @ y
    per_item = vv.square().sum(dim=(1, 2)) - 2 * vy.square().sum(dim=(1, 2)) + yy.square().sum(dim=(1, 2))
    return per_item.mean()


def whitened_kmeans_loss(embedding: Tensor, mixture: Tensor, sources: Tensor, ridge: float = WKM_RIDGE) -> Tensor:
    """L_WKM (paper eq. 6): D - tr((V^T V)^-1 V^T Y (Y^T Y)^-1 Y^T V) per item, mean over the batch.

    embedding (B, T, F, D) real; mixture (B, T, F) complex (unused: eq. 6 has no TF weights; taken so
    that every loss has the same arguments); sources (B, C, T, F) complex, giving the one-hot ideal
    binary assignment Y. Unweighted, as in eq. 6. Equals D - tr(P_V P_Y) with P the orthogonal
    projections onto the column spans of V and Y, so it lies in [D - min(D, C), D]: 0 only when
    D = C and V spans Y's columns. Permutation-free by construction.

    Numerics: the whole computation runs in float64 (the matrices are (D x D) and smaller, and V^T V
    from near-identical sigmoid embeddings is ill-conditioned), the result is cast back to V's dtype.
    Y^T Y is diagonal (source counts); a source dominant nowhere has a zero count and a zero column
    in V^T Y, so its term is dropped exactly (count clamped to 1: the pseudo-inverse, no ridge).
    V^T V gets a ridge of ``ridge * tr(V^T V) / D`` (default 1e-10, relative) only to keep it
    invertible when the embeddings span fewer than D dimensions; it changes the loss by ~D * ridge.
    """
    b, d = embedding.shape[0], embedding.shape[-1]
    v = embedding.reshape(b, -1, d).double()
    y = ideal_binary_assignment(sources).reshape(b, -1, sources.shape[1]).double()
    vv = v.transpose(1, 2) @ v  # (B, D, D)
    vy = v.transpose(1, 2) @ y  # (B, D, C)
    counts = y.sum(dim=1).clamp_min(1.0)  # diagonal of Y^T Y, (B, C)
    scale = vv.diagonal(dim1=1, dim2=2).sum(-1) / d  # (B,)
    eye = torch.eye(d, dtype=vv.dtype, device=vv.device)
    vv = vv + (ridge * scale)[:, None, None] * eye
    solved = torch.linalg.solve(vv, vy)  # (V^T V)^-1 V^T Y
    trace = (solved * vy / counts[:, None, :]).sum(dim=(1, 2))  # tr(A^-1 B C^-1 B^T), C diagonal
    return (d - trace).mean().to(embedding.dtype)


def chimera_loss(
    masks: Tensor, embedding: Tensor, mixture: Tensor, sources: Tensor, alpha: float = CHIMERA_ALPHA
) -> Tensor:
    """L_MI+WKM (paper eq. 7): alpha * L_MI + (1 - alpha) * L_WKM, alpha = 0.75 as in the paper.

    masks (B, C, T, F) real; embedding (B, T, F, D) real; mixture (B, T, F), sources (B, C, T, F)
    complex. The MI part is permutation-invariant (:func:`mask_inference_loss`), the WKM part
    permutation-free.
    """
    return alpha * mask_inference_loss(masks, mixture, sources) + (1 - alpha) * whitened_kmeans_loss(
        embedding, mixture, sources
    )


def masked_waveforms(masks: Tensor, mixture: Tensor, stft, length: int) -> Tensor:
    """Waveforms of the masked mixture STFT with the mixture phase: istft(M_i |X| e^{j theta_X}).

    masks (B, C, T, F) real; mixture (B, T, F) complex; ``stft`` a :class:`~dynamics.tasks.separation.model.Stft`
    (anything with ``inverse(spec, length)``) -> (B, C, length).
    """
    return stft.inverse(masks * mixture.unsqueeze(1), length)


def snr_loss(estimates: Tensor, references: Tensor, eps: float = SNR_EPS) -> Tensor:
    """L_SNR (paper eq. 8) on waveforms: -10 log10(||s||^2 / ||s - s_hat||^2), PIT, mean over the batch.

    estimates s_hat and references s (B, C, n). ``eps`` (1e-8) is added to both energies so that a
    silent reference or a perfect estimate gives a finite loss and gradient; it is negligible
    against the energies of real signals. The per-item loss is the best permutation's mean over sources.
    """
    ref_energy = references.square().sum(-1)  # (B, C)
    err = (estimates.unsqueeze(2) - references.unsqueeze(1)).square().sum(-1)  # (B, C_est, C_ref)
    per_pair = -10 * torch.log10((ref_energy.unsqueeze(1) + eps) / (err + eps))
    return pit_min(per_pair)


def mask_snr_loss(masks: Tensor, mixture: Tensor, source_wav: Tensor, stft, eps: float = SNR_EPS) -> Tensor:
    """L_SNR for a mask network: masks (B, C, T, F) applied to the mixture STFT (B, T, F), inverted
    with the mixture phase (:func:`masked_waveforms`) and compared with source_wav (B, C, n)."""
    return snr_loss(masked_waveforms(masks, mixture, stft, source_wav.shape[-1]), source_wav, eps)


def separation_loss(
    loss_name: str, outputs: dict, mixture_spec: Tensor, source_spec: Tensor, source_wav: Tensor, stft
) -> Tensor:
    """Any of the paper's five losses by name ("dc", "wkm", "mi", "chimera", "snr").

    outputs: the dict of :class:`~dynamics.tasks.separation.model.SeparationNet` ("masks" (B, C, T, F) and/or
    "embedding" (B, T, F, D)); mixture_spec (B, T, F) and source_spec (B, C, T, F) complex STFTs;
    source_wav (B, C, n) time-domain sources (used by "snr" only); stft the STFT module (used by
    "snr" only, for the inverse STFT).
    """
    if loss_name == "dc":
        return deep_clustering_loss(outputs["embedding"], mixture_spec, source_spec)
    if loss_name == "wkm":
        return whitened_kmeans_loss(outputs["embedding"], mixture_spec, source_spec)
    if loss_name == "mi":
        return mask_inference_loss(outputs["masks"], mixture_spec, source_spec)
    if loss_name == "chimera":
        return chimera_loss(outputs["masks"], outputs["embedding"], mixture_spec, source_spec)
    if loss_name == "snr":
        return mask_snr_loss(outputs["masks"], mixture_spec, source_wav, stft)
    raise ValueError(f"unknown loss {loss_name!r}; expected one of {', '.join(LOSS_NAMES)}")
