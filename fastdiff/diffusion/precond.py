"""EDM preconditioning and loss weighting (EDM Table 1, Eq. 7; EDM2 Sec. 2)."""

from __future__ import annotations

import torch

__all__ = ["precond_coefficients", "loss_weight"]


def precond_coefficients(sigma, sigma_data: float = 0.5):
    """``(c_skip, c_out, c_in, c_noise)`` for noise level(s) ``sigma`` (a tensor or a number), the
    preconditioning of ``D(x; s) = c_skip x + c_out F(c_in x, c_noise)`` (EDM Eq. 7, Table 1).

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = ln(s) / 4``; each has ``sigma``'s shape.
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    sd2 = sigma_data**2
    s2 = sigma * sigma + sd2
    c_skip = sd2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma, sigma_data: float = 0.5):
    """The EDM loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (EDM Table 1)."""
    sigma = torch.as_tensor(sigma)
    return (sigma * sigma + sigma_data**2) / (sigma * sigma_data) ** 2
