"""Plain-PyTorch reference of every fastdiff op.

These functions are the oracle in the tests and the fallback whenever no compiled kernel fits the
input (no extension built, an unsupported device or dtype). They follow the EDM2 paper's definitions
(Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 2 and
Appendix B) and favour clarity over speed. All of them are differentiable with ordinary autograd.

Non-finite values (the kernels give the same):
- ``mp_silu``: the limits, ``mp_silu(-inf) = 0`` and ``mp_silu(+inf) = +inf`` (gradient: 0 and 1/0.596); NaN
  stays NaN.
- ``mp_silu_modulate(y, c)``: ``mp_silu`` of the IEEE product ``y * (1 + c)`` (so ``inf * 0`` is NaN).
- ``mp_sum``: the IEEE weighted sum ``wa * a + wb * b`` (``inf + finite = inf``, ``inf - inf = NaN``, and a zero
  weight at ``t = 0`` or ``1`` times an infinite input is NaN); a non-finite ``t`` is an error.
- ``pixel_norm`` (and ``weight_norm`` per row): a pixel (row) holding an infinite value has an infinite
  norm, so its finite entries become 0 and its infinite entries NaN (``inf / inf``); NaN spreads over the
  pixel (row). The squared norm is accumulated in float32 (float64 for float64), so a pixel whose squared
  norm passes float32's range (entries beyond about 1e19) also has an infinite norm and becomes 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-4
MP_SILU_DIVISOR = 0.596
CLIP_LIMIT = 256.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(op: str, **tensors: torch.Tensor) -> None:
    """A clear error for a non-floating-point argument (an int32 weight would otherwise be normalized and
    cast back to zeros)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise RuntimeError(
                f"fastdiff.{op}: expected '{name}' to be a floating-point tensor (float32, float64, float16 or "
                f"bfloat16), got {t.dtype}"
            )


def _check_t(op: str, t: float) -> None:
    if not math.isfinite(t):
        raise ValueError(f"fastdiff.{op}: expected a finite blend weight t, got {t}")


def row_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-output-row factor ``1 / (eps + ||w_o|| / sqrt(n))`` in float32 (float64 for float64)."""
    n = w[0].numel() if w.shape[0] > 0 else 1
    norm = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1, dtype=_acc_dtype(w.dtype))
    return 1.0 / (eps + norm / math.sqrt(n))


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """``N(x)``: unit RMS over ``dim`` (default: all dims but the first), norm accumulated in fp32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_acc_dtype(x.dtype))
    n = x.numel() / max(norm.numel(), 1)
    norm = eps + norm / math.sqrt(n)
    return x / norm.to(x.dtype)


def weight_norm(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization, functional form: ``N(W)`` per output row."""
    return normalize(w, eps=eps)


def weight_norm_(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization in place (no gradient through the write)."""
    with torch.no_grad():
        w.copy_(normalize(w.to(_acc_dtype(w.dtype)), eps=eps))
    return w


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """``W_hat = gain * N(W) / sqrt(fan_in)`` computed in fp32 (fp64 for fp64 weights)."""
    check_floating("mp_weight", w=w, gain=gain)
    wf = w.to(_acc_dtype(w.dtype))
    fan_in = w[0].numel()
    return normalize(wf, eps=eps) * (gain / math.sqrt(fan_in))


def mp_conv(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """MP convolution (4-D weight, padding k//2) or MP linear (2-D weight), no bias."""
    check_floating("mp_conv", x=x, w=w, gain=gain)
    w_hat = mp_weight(w, gain, eps).to(x.dtype)
    if w.ndim == 2:
        return x @ w_hat.t()
    return F.conv2d(x, w_hat, padding=w.shape[-1] // 2)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    return mp_conv(x, w, gain, eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x) / 0.596`` (EDM2 Eq. 81), with the limits at +-inf: ``F.silu(-inf)`` is ``-inf * 0 = NaN``, so
    infinite entries take ``relu(x)`` instead, and ``silu`` sees a 0 there so no NaN reaches the gradient."""
    inf = torch.isinf(x)
    return torch.where(inf, x.clamp_min(0), F.silu(torch.where(inf, 0, x))) / MP_SILU_DIVISOR


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)`` (EDM2 Eq. 88). Written as the weighted sum rather than
    ``a.lerp(b, t)``, whose ``a + t (b - a)`` is NaN for an infinite ``a``."""
    wa, wb = mp_sum_weights(t)
    return a * wa + b * wb


def mp_sum_weights(t: float) -> tuple[float, float]:
    """The weights of ``a`` and ``b`` in ``mp_sum``: ``(1 - t, t) / sqrt((1 - t)^2 + t^2)``."""
    _check_t("mp_sum", t)
    d = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / d, t / d


def mp_cat_weights(na: int, nb: int, t: float) -> tuple[float, float]:
    """The weights of ``a`` (``na`` channels) and ``b`` (``nb``) in ``mp_cat``; an empty input has weight 0."""
    _check_t("mp_cat", t)
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return (k / math.sqrt(na) * (1 - t) if na else 0.0), (k / math.sqrt(nb) * t if nb else 0.0)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation that keeps unit magnitude (EDM2 Eq. 89); an empty input (0 channels) has no weight."""
    wa, wb = mp_cat_weights(a.shape[dim], b.shape[dim], t)
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
    y = qkv.reshape(n, num_heads, c3 // (3 * num_heads), 3, h * w)  # no -1: works for empty inputs too
    q, k, v = normalize(y, dim=2).unbind(3)
    att = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    out = torch.einsum("nhqk,nhck->nhcq", att, v)
    return out.reshape(n, c3 // 3, h, w)
