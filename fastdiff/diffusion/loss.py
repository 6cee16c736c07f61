"""The EDM2 training loss with learned uncertainty (EDM2 Eqs. 14-16, 21; the loss weight and the sigma
distribution of EDM Table 1)."""

from __future__ import annotations

import torch

from fastdiff.diffusion.precond import loss_weight

__all__ = ["EDM2Loss"]


class EDM2Loss:
    """Per-element loss ``lambda(s) / exp(u(s)) * (D(x + s n; s) - x)^2 + u(s)``, ``ln s ~ N(P_mean, P_std^2)``.

    ``net`` is a ``Precond`` (anything with ``net(x, sigma, labels, return_logvar=True) -> (D, logvar)``).
    Pass a ``torch.Generator`` (on the images' device) for reproducible noise levels and noise.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def __repr__(self) -> str:
        return f"EDM2Loss(P_mean={self.P_mean}, P_std={self.P_std}, sigma_data={self.sigma_data})"

    def sample_sigma(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``sigma = exp(P_mean + P_std * randn)`` of shape ``[batch, 1, 1, 1]`` (float32)."""
        rnd = torch.randn([batch, 1, 1, 1], device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def __call__(self, net, images: torch.Tensor, labels=None, generator: torch.Generator | None = None):
        images = images.to(torch.float32)
        sigma = self.sample_sigma(images.shape[0], images.device, generator)
        weight = loss_weight(sigma, self.sigma_data)
        noise = torch.randn(images.shape, device=images.device, generator=generator) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar
