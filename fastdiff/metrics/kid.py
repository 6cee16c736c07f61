"""Kernel Inception Distance (Binkowski et al., 2018).

The unbiased estimate of the squared maximum mean discrepancy with the polynomial kernel
``k(x, y) = (x . y / d + 1)^3``, averaged over ``num_subsets`` random subsets of ``subset_size``
samples drawn (without replacement) from each set.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdiff.metrics._util import check_features

__all__ = ["kernel_inception_distance", "mmd2_unbiased"]


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between samples x [m, d] and y [m', d] with the cubic polynomial kernel."""
    d = x.shape[1]
    m, n = x.shape[0], y.shape[0]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def kernel_inception_distance(real, fake, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                              device=None) -> float:
    """KID between ``real`` [N, D] and ``fake`` [M, D] features (float64; seeded subsets).

    ``subset_size`` is capped by the number of samples in either set.
    """
    real = check_features(real, "real features")
    fake = check_features(fake, "fake features", real.shape[1])
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    device = torch.device(device) if device is not None else real.device
    real = real.to(device, torch.float64)
    fake = fake.to(device, torch.float64)
    rng = np.random.default_rng(seed)
    total = 0.0
    with torch.inference_mode():
        for _ in range(num_subsets):
            ix = torch.from_numpy(rng.choice(real.shape[0], m, replace=False)).to(device)
            iy = torch.from_numpy(rng.choice(fake.shape[0], m, replace=False)).to(device)
            total += mmd2_unbiased(real[ix], fake[iy])
    return total / num_subsets
