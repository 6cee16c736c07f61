"""Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifold estimates.

Each set of features defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour within the set (k = 3). Precision is the fraction
of generated samples inside the real manifold; recall is the fraction of real samples inside the
generated manifold. Distances are computed in ``chunk_size`` x ``chunk_size`` blocks, so 50k x 50k
problems never hold the full distance matrix in memory.
"""

from __future__ import annotations

import torch

from fastdiff.metrics._util import check_features

__all__ = ["precision_recall", "knn_radii"]


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int = 3, chunk_size: int = 10_000) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point in the same set [N]."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    radii = []
    for rows in features.split(chunk_size):
        best = rows.new_empty(rows.shape[0], 0)
        for cols in features.split(chunk_size):
            cand = torch.cat([best, _sq_dists(rows, cols)], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])  # column 0 is the point itself (distance 0)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    """Fraction of ``queries`` within the radius of at least one ``support`` point."""
    inside = 0
    for q in queries.split(chunk_size):
        hit = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
        for s, r in zip(support.split(chunk_size), radii.split(chunk_size), strict=True):
            hit |= (_sq_dists(q, s) <= r[None]).any(dim=1)
        inside += int(hit.sum())
    return inside / queries.shape[0]


def precision_recall(real, fake, *, k: int = 3, chunk_size: int = 10_000, device=None,
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Precision and recall of ``fake`` features [M, D] against ``real`` features [N, D].

    Args:
        k: neighbourhood size of the manifold estimate (3 in the paper).
        chunk_size: rows/columns per distance block (memory ~ chunk_size^2 values).
        device: where to compute (default: the device of ``real`` when it is a tensor, else CPU).
        dtype: computation dtype (float32 default; float64 for exactness on CPU).
    Returns:
        ``{"precision": float, "recall": float}``.
    """
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features", real.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = torch.device(device) if device is not None else real.device
    real = real.to(device, dtype)
    fake = fake.to(device, dtype)
    with torch.inference_mode():
        precision = _fraction_inside(fake, real, knn_radii(real, k, chunk_size), chunk_size)
        recall = _fraction_inside(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return {"precision": precision, "recall": recall}
