"""Frechet distance between two Gaussians (the FID / FD_DINOv2 formula).

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))

computed in float64. By default ``Tr sqrtm(S1 S2)`` is the sum of the square roots of the eigenvalues of the
symmetric PSD ``sqrt(S1) S2 sqrt(S1)`` (two symmetric eigendecompositions, no regularising offset even for
singular covariances); ``method="sqrtm"`` is the classic route through ``scipy.linalg.sqrtm``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fastdiff.metrics._util import to_numpy64

__all__ = ["frechet_distance", "trace_sqrt_product", "check_covariance", "PSD_RTOL"]

# Round-off tolerance, relative to the matrix's scale (its largest |eigenvalue| or |entry|): float64 covariances
# from float32 features are symmetric and PSD to ~1e-12; anything beyond 1e-6 is a wrong matrix, not rounding.
PSD_RTOL = 1e-6


def check_covariance(sigma: np.ndarray, what: str = "sigma", rtol: float = PSD_RTOL) -> np.ndarray:
    """Raise ``ValueError`` unless ``sigma`` (float64 [D, D]) is finite, symmetric and positive semi-definite
    within ``rtol`` of its scale; returns its eigenvalues (ascending)."""
    if not np.isfinite(sigma).all():
        raise ValueError(f"{what} contains NaN or Inf values")
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asym = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asym > rtol * scale:
        raise ValueError(f"{what} is not symmetric: max |S - S^T| = {asym:.3g} against entries up to {scale:.3g} "
                         f"(tolerance {rtol:g} relative); a covariance matrix must be symmetric")
    eig = np.linalg.eigvalsh((sigma + sigma.T) * 0.5) if sigma.size else np.zeros(0)
    if eig.size and eig[0] < -rtol * max(float(np.abs(eig).max()), 1e-300):
        raise ValueError(f"{what} is not positive semi-definite: smallest eigenvalue {eig[0]:.6g} against a largest "
                         f"{eig[-1]:.6g} ({int((eig < -rtol * np.abs(eig).max()).sum())} clearly negative; tolerance "
                         f"{rtol:g} relative); a covariance matrix has no negative eigenvalues")
    return eig


def _check_gaussian(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = to_numpy64(mu, f"mu{which}")
    sigma = to_numpy64(sigma, f"sigma{which}")
    if mu.ndim != 1:
        raise ValueError(f"mu{which} must be a vector [D], got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma{which} must be a square matrix [D, D] matching mu{which} (D={mu.shape[0]}), "
            f"got shape {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{which} / sigma{which} contain NaN or Inf values")
    return mu, sigma


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh", device=None) -> float:
    """``Tr sqrtm(sigma1 @ sigma2)`` for symmetric PSD float64 matrices (real part).

    ``"eigh"``: with ``sigma1 = V diag(w) V^T``, the eigenvalues of ``sigma1 @ sigma2`` are those of the
    symmetric PSD ``diag(sqrt w) V^T sigma2 V diag(sqrt w)``; computed with torch in float64 on
    ``device`` (default CPU; a GPU makes 2048-d fast). ``"sqrtm"``: scipy's ``sqrtm`` of the product.
    """
    if method == "eigh":
        a = torch.as_tensor(sigma1, dtype=torch.float64, device=device)
        b = torch.as_tensor(sigma2, dtype=torch.float64, device=device)
        w, v = torch.linalg.eigh((a + a.T) * 0.5)
        if len(w) and float(w[0]) < -PSD_RTOL * float(w.abs().max()):
            raise ValueError(f"sigma1 is not positive semi-definite (eigenvalue {float(w[0]):.6g}, largest "
                             f"{float(w[-1]):.6g})")
        root_w = w.clamp_min(0).sqrt()  # negative eigenvalues here are round-off of a PSD matrix
        m = root_w[:, None] * (v.T @ b @ v) * root_w[None, :]
        ev = torch.linalg.eigvalsh((m + m.T) * 0.5)
        return float(ev.clamp_min(0).sqrt().sum())
    if method == "sqrtm":
        import scipy.linalg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns about singular products; handled below
            covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
            if not np.isfinite(covmean).all():
                offset = np.eye(sigma1.shape[0]) * 1e-6
                covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        return float(np.trace(covmean).real)
    raise ValueError(f"unknown method {method!r}; expected 'eigh' or 'sqrtm'")


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "eigh", device=None) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a Python float.

    Arguments may be numpy arrays or tensors; everything is computed in float64. ``method`` picks
    how ``Tr sqrtm(S1 S2)`` is computed (``"eigh"``, default, or ``"sqrtm"``); ``device`` is where
    the ``"eigh"`` route runs. A negative result within round-off of the scale (``PSD_RTOL`` times
    ``Tr S1 + Tr S2 + |mu1 - mu2|^2``) is returned as 0; a clearly negative one means a covariance is not
    positive semi-definite and is a ``ValueError``, never a clamped 0.
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    scale = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2))
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2, method, device)
    if fd < -PSD_RTOL * max(abs(scale), 1e-300) or scale < 0:
        raise ValueError(f"Frechet distance {float(fd):.6g} < 0 (scale {scale:.6g}): a covariance is not positive "
                         f"semi-definite; check the statistics (fastdiff.metrics.check_covariance)")
    return max(float(fd), 0.0)
