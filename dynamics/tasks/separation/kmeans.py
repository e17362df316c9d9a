"""Batched, deterministic k-means on TF embeddings: how the embedding networks (L_DC, L_WKM) separate."""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans(points: Tensor, k: int = 2, weights: Tensor | None = None, iterations: int = 20) -> Tensor:
    """Weighted k-means of each item's points, all items at once; returns assignments (B, N) in [0, k).

    points (B, N, D) real; weights (B, N) non-negative (None: all 1). Deterministic: the first centre
    is the heaviest point, each next one the point maximising weight * squared distance to the nearest
    chosen centre (a greedy k-means++); then ``iterations`` Lloyd steps of weighted means. A cluster
    left empty keeps its previous centre. No gradient flows through the result.
    """
    with torch.no_grad():
        b, n, _ = points.shape
        if weights is None:
            weights = points.new_ones(b, n)
        weights = weights.to(points.dtype)
        rows = torch.arange(b, device=points.device)
        centres = [points[rows, weights.argmax(dim=1)]]  # (B, D) each
        nearest = (points - centres[0][:, None]).square().sum(-1)
        for _ in range(1, k):
            centres.append(points[rows, (weights * nearest).argmax(dim=1)])
            nearest = torch.minimum(nearest, (points - centres[-1][:, None]).square().sum(-1))
        centres = torch.stack(centres, dim=1)  # (B, k, D)
        for _ in range(iterations):
            labels = torch.cdist(points, centres).argmin(dim=-1)  # (B, N)
            member = torch.nn.functional.one_hot(labels, k).to(points.dtype) * weights[..., None]  # (B, N, k)
            mass = member.sum(dim=1)  # (B, k)
            sums = member.transpose(1, 2) @ points  # (B, k, D)
            centres = torch.where(mass[..., None] > 0, sums / mass.clamp_min(1e-30)[..., None], centres)
        return torch.cdist(points, centres).argmin(dim=-1)


def kmeans_masks(
    embedding: Tensor, mixture_magnitude: Tensor | None = None, k: int = 2, iterations: int = 20
) -> Tensor:
    """Binary masks (B, k, T, F) from clustering each item's embeddings (B, T, F, D) into k clusters.

    mixture_magnitude (B, T, F), if given, weights the clustering so that loud TF points decide the
    centres (silent points, whose embeddings carry no information, hardly move them).
    """
    b, t, f, d = embedding.shape
    weights = None if mixture_magnitude is None else mixture_magnitude.reshape(b, -1)
    labels = kmeans(embedding.reshape(b, -1, d), k, weights, iterations)
    masks = torch.nn.functional.one_hot(labels, k).to(embedding.dtype)  # (B, N, k)
    return masks.transpose(1, 2).reshape(b, k, t, f)
