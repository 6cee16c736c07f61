"""Training expert denoisers (eDiff-I, Balaji et al. 2022): fine-tune a base network on part of the
noise levels only, for ``fastdiff.sampling.experts.Experts``.

``TruncatedEDM2Loss`` is the EDM2 loss with learned uncertainty (per-element
``lambda(s) / exp(u(s)) * |D(x + s n; s) - x|^2 + u(s)``) with the training noise levels drawn from EDM's
log-normal ``ln s ~ N(P_mean, P_std^2)`` truncated to ``(lo, hi]``: exactly, by the inverse CDF, ``z = Phi^-1(Phi(a) + u (Phi(b) - Phi(a)))`` with ``u``
uniform, ``a, b`` the standardized log-bounds, and ``s = exp(P_mean + P_std z)`` (in the upper tail the
mirrored form ``-Phi^-1(Phi(-b) + u (Phi(-a) - Phi(-b)))`` keeps the precision). The rest of the loss is
unchanged. ``load_init_weights`` copies a base network's weights into a freshly built one.
"""

from __future__ import annotations

import math
import os

import torch

from fastdiff.diffusion import EDM2Loss

__all__ = ["TruncatedEDM2Loss", "truncated_lognormal", "load_init_weights"]


def _standardized(sigma_range, P_mean: float, P_std: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in sigma_range)
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ValueError(f"sigma range ({lo}, {hi}]: expected 0 <= lo < hi (hi may be inf)")
    a = -math.inf if lo == 0 else (math.log(lo) - P_mean) / P_std
    b = math.inf if hi == math.inf else (math.log(hi) - P_mean) / P_std
    return a, b


def truncated_lognormal(shape, P_mean: float, P_std: float, sigma_range, device=None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``sigma`` (float32, ``shape``) with ``ln sigma ~ N(P_mean, P_std^2)`` conditioned on ``sigma`` in
    ``sigma_range = (lo, hi]``, drawn exactly by the inverse CDF from one uniform per value (see the module
    docstring)."""
    if not P_std > 0:
        raise ValueError(f"P_std must be positive, got {P_std}")
    a, b = _standardized(sigma_range, P_mean, P_std)
    ndtr = lambda v: float(torch.special.ndtr(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    mirrored = a > 0  # upper tail: Phi(a) ~ 1 would lose the digits; use the lower tail of -z instead
    p0, p1 = (ndtr(-b), ndtr(-a)) if mirrored else (ndtr(a), ndtr(b))
    if not p1 > p0:
        raise ValueError(f"sigma range {tuple(sigma_range)} holds no probability under the log-normal "
                         f"(P_mean={P_mean}, P_std={P_std}); choose a range nearer exp(P_mean)")
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    z = torch.special.ndtri(p0 + u * (p1 - p0))
    if mirrored:
        z = -z
    z = z.clamp(a, b)
    return (P_mean + P_std * z).exp().to(torch.float32)


class TruncatedEDM2Loss(EDM2Loss):
    """``EDM2Loss`` with the noise levels restricted to ``sigma_range = (lo, hi]`` (see the module docstring)."""

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5,
                 sigma_range=(0.0, math.inf)):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        truncated_lognormal((1,), self.P_mean, self.P_std, self.sigma_range)  # validates the range now

    def __repr__(self) -> str:
        return (f"TruncatedEDM2Loss(P_mean={self.P_mean}, P_std={self.P_std}, sigma_data={self.sigma_data}, "
                f"sigma_range=({self.sigma_range[0]:g}, {self.sigma_range[1]:g}])")

    def sample_sigma(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return truncated_lognormal([batch, 1, 1, 1], self.P_mean, self.P_std, self.sigma_range, device, generator)


def load_init_weights(net: torch.nn.Module, path) -> None:
    """Copy the weights of the fastdiff network file ``path`` (a ``.safetensors`` network, EMA snapshot or
    post-hoc EMA file) into ``net``; ``ValueError`` naming the file and the differing parameters when the two
    networks do not match. (An official EDM2 pickle: convert it first with ``fastdiff convert``.)"""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init: no such network file: {path}")
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"--init {path}: not a fastdiff .safetensors network file ({exc}); convert an official "
                         f"EDM2 pickle with `fastdiff convert` first") from None
    mine = net.state_dict()
    missing = sorted(set(mine) - set(tensors))
    unexpected = sorted(set(tensors) - set(mine))
    shapes = [k for k in mine if k in tensors and tuple(tensors[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing from the file (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown to this network (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(tensors[k].shape)} in the file, "
                         f"{tuple(mine[k].shape)} here)")
        raise ValueError(f"--init {path}: the file's network does not match the one this run builds: "
                         f"{'; '.join(parts)}; pass the --preset (and --cond/--uncond) it was trained with")
    with torch.no_grad():
        net.load_state_dict({k: v.to(mine[k].dtype) for k, v in tensors.items()})
