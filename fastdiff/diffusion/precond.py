"""EDM preconditioning coefficients (SPEC.md section 2)."""

from __future__ import annotations

import torch

# Defined next to Precond (nn sits below diffusion in the layering); re-exported here.
from fastdiff.nn.precond import precond_coefficients

__all__ = ["precond_coefficients", "loss_weight"]


def loss_weight(sigma, sigma_data: float = 0.5):
    """The EDM loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2``."""
    sigma = torch.as_tensor(sigma)
    return (sigma * sigma + sigma_data**2) / (sigma * sigma_data) ** 2
