"""Small helpers shared by the metrics modules (atomic file writes, array conversion)."""

from __future__ import annotations


import numpy as np
import torch

from fastdiff._atomic import atomic_open as atomic_write  # noqa: F401  (used as `with atomic_write(path) as f`)


def to_numpy64(x, name: str) -> np.ndarray:
    """``x`` (tensor, array or nested list) as a float64 numpy array; a clear error if not numeric."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}") from e
    return arr


def check_features(x, name: str, dim: int | None = None) -> torch.Tensor:
    """``x`` as a 2-D floating tensor [N, D] with finite values (numpy arrays are accepted)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {x.shape[1]}, expected {dim}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x
