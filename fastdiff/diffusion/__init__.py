"""Noise-level maths and the EDM2 loss."""

from fastdiff.diffusion.loss import EDM2Loss
from fastdiff.diffusion.precond import loss_weight, precond_coefficients

__all__ = ["EDM2Loss", "precond_coefficients", "loss_weight"]
