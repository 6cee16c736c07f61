"""The formulas of EDM-family diffusion: preconditioning, loss weight and the EDM2 loss, the EDM noise
schedule and its inverse, and a noise level as a per-sample tensor. Imported by nn, sampling and
training; it imports nothing of fastdiff but itself."""

from fastdiff.diffusion.loss import EDM2Loss
from fastdiff.diffusion.precond import loss_weight, precond_coefficients
from fastdiff.diffusion.schedule import edm_sigma_steps, edm_time_of_sigma
from fastdiff.diffusion.sigma import sigma_per_sample

__all__ = ["EDM2Loss", "precond_coefficients", "loss_weight", "edm_sigma_steps", "edm_time_of_sigma",
           "sigma_per_sample"]
