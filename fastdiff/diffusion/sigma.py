"""A noise level as the per-sample ``[N]`` tensor that denoisers, samplers and training pass around."""

from __future__ import annotations

import torch

__all__ = ["sigma_per_sample"]


def sigma_per_sample(sigma, n: int, *, device=None, dtype: torch.dtype | None = None, image_shaped: bool = False,
                     who: str = "sigma") -> torch.Tensor:
    """``sigma`` (a number, or a tensor of shape ``[]``, ``[1]``, ``[N]``, and with ``image_shaped`` also
    ``[1, 1, 1, 1]`` / ``[N, 1, 1, 1]``) as a per-sample ``[N]`` tensor on ``device``.

    ``dtype``: the result's dtype (default: a tensor keeps its floating dtype, anything else becomes
    float32). A broadcast scalar is an expanded view, not a copy. Other shapes are a ValueError naming
    ``who``."""
    if isinstance(sigma, torch.Tensor):
        t = sigma if device is None else sigma.to(device)
        if dtype is None:
            dtype = t.dtype if t.is_floating_point() else torch.float32
    else:  # made in the result's dtype directly: a float64 sigma keeps every digit
        dtype = torch.float32 if dtype is None else dtype
        t = torch.as_tensor(sigma, dtype=dtype, device=device)
    ok = t.ndim == 0 or (t.ndim == 1 and t.shape[0] in (1, n)) or (
        image_shaped and t.ndim == 4 and t.shape[0] in (1, n) and t.shape[1:] == (1, 1, 1))
    if not ok:
        shapes = f"a scalar, [N={n}]" + (f" or [N={n}, 1, 1, 1]" if image_shaped else "")
        raise ValueError(f"{who}: expected sigma as {shapes}, got shape {tuple(t.shape)}")
    t = t.to(dtype).reshape(-1)
    return t.expand(n) if t.shape[0] != n else t
