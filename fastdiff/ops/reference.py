"""Plain-PyTorch reference of every fastdiff op.

These functions are the oracle in the tests and the fallback whenever no compiled kernel fits the
input (no extension built, an unsupported device or dtype). They follow the formulas of the EDM2
paper (MP conv / linear Eq. 47 with forced weight normalization Eq. 66, mp_silu Eq. 81, mp_sum Eq. 88,
mp_cat Eq. 103) literally and favour clarity over speed. All of them are differentiable with ordinary autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-4
MP_SILU_DIVISOR = 0.596
CLIP_LIMIT = 256.0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and sums accumulate in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-output-row factor ``1 / (eps + ||w_o|| / sqrt(n))`` in float32 (float64 for float64)."""
    n = w[0].numel() if w.shape[0] > 0 else 1
    norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=acc_dtype(w.dtype))
    return 1.0 / (eps + norm / math.sqrt(n))


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """``N(x)``: unit RMS over ``dim`` (default: all dims but the first), norm accumulated in fp32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc_dtype(x.dtype))
    n = x.numel() / max(norm.numel(), 1)
    norm = eps + norm / math.sqrt(n)
    return x / norm.to(x.dtype)


def weight_norm(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization, functional form: ``N(W)`` per output row."""
    return normalize(w, eps=eps)


def weight_norm_(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization in place (no gradient through the write)."""
    with torch.no_grad():
        w.copy_(normalize(w.to(acc_dtype(w.dtype)), eps=eps))
    return w


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """``W_hat = gain * N(W) / sqrt(fan_in)`` computed in fp32 (fp64 for fp64 weights)."""
    wf = w.to(acc_dtype(w.dtype))
    fan_in = w[0].numel()
    return normalize(wf, eps=eps) * (gain / math.sqrt(fan_in))


def mp_conv(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """MP convolution (4-D weight, padding k//2) or MP linear (2-D weight), no bias."""
    w_hat = mp_weight(w, gain, eps).to(x.dtype)
    if w.ndim == 2:
        return x @ w_hat.t()
    return F.conv2d(x, w_hat, padding=w.shape[-1] // 2)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    return mp_conv(x, w, gain, eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / MP_SILU_DIVISOR


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[dim], b.shape[dim]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = k / math.sqrt(na) * (1 - t)
    wb = k / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def pixel_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``N(x)`` over the channel dim (dim 1) only, per pixel."""
    return normalize(x, dim=1, eps=eps)


def mp_silu_modulate(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block's chain ``mp_silu(y * (1 + c))`` with ``c`` of shape ``[N, C]``."""
    scale = (c + 1).to(y.dtype)
    return mp_silu(y * scale.reshape(*scale.shape, *([1] * (y.ndim - 2))))


def clip(x: torch.Tensor, limit: float = CLIP_LIMIT) -> torch.Tensor:
    return x.clamp(-limit, limit)


def cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EDM2 cosine self-attention on raw qkv activations ``[N, 3C, H, W]`` -> ``[N, C, H, W]``.

    Channels are viewed as ``[N, heads, C/heads, 3, H*W]`` (official layout); q, k, v are pixel-normed
    over their per-head channels, scores are ``q^T k / sqrt(head_dim)``, softmax over keys.
    """
    n, c3, h, w = qkv.shape
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)
    att = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    out = torch.einsum("nhqk,nhck->nhcq", att, v)
    return out.reshape(n, c3 // 3, h, w)
