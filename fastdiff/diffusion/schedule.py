"""The EDM noise schedule (EDM Eq. 5) and its inverse, the normalized time of a noise level."""

from __future__ import annotations

import torch

__all__ = ["edm_sigma_steps", "edm_time_of_sigma"]


def edm_sigma_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    *, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """EDM / Karras noise levels ``t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``,
    ``i = 0..N-1`` (EDM Eq. 5), followed by ``t_N = 0``: a tensor of ``num_steps + 1`` values."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"expected 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    num_steps = int(num_steps)
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_time_of_sigma(sigma: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0,
                      rho: float = 7.0) -> torch.Tensor:
    """The inverse of :func:`edm_sigma_steps` as a normalized time in [0, 1] (1 = pure noise):
    ``(sigma^(1/rho) - smin^(1/rho)) / (smax^(1/rho) - smin^(1/rho))`` in float64, clamped to [0, 1];
    it is ``1 - i/(N-1)`` at step ``i`` of ``N``."""
    r = 1.0 / rho
    lo, hi = sigma_min**r, sigma_max**r
    t = (sigma.double().clamp_min(0) ** r - lo) / max(hi - lo, 1e-30)
    return t.clamp(0.0, 1.0)
