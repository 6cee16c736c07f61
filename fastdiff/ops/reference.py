"""Plain-PyTorch reference of every fastdiff op.

These functions are the oracle in the tests and the fallback whenever no compiled kernel fits the
input (no extension built, an unsupported device or dtype). They follow the formulas of the EDM2
paper (MP conv / linear Eq. 47 with forced weight normalization Eq. 66, mp_silu Eq. 81, mp_sum Eq. 88,
mp_cat Eq. 103) literally and favour clarity over speed. All of them are differentiable with ordinary autograd.

Non-finite values (the kernels give the same):
- ``mp_silu``: the limits, ``mp_silu(-inf) = 0`` and ``mp_silu(+inf) = +inf`` (gradient: 0 and 1/0.596); NaN
  stays NaN.
- ``mp_silu_modulate(y, c)``: ``mp_silu`` of the IEEE product ``y * (1 + c)`` (so ``inf * 0`` is NaN).
- ``mp_sum``: the IEEE weighted sum ``wa * a + wb * b`` (``inf + finite = inf``, ``inf - inf = NaN``, and a zero
  weight at ``t = 0`` or ``1`` times an infinite input is NaN); a non-finite ``t`` is an error.
- ``mp_sum_clip``: the clamp of that sum (NaN passes through); its gradient is zero where the sum, as stored in the
  tensors' dtype, lies beyond the limit or is NaN (as ``clamp``'s).
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


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and sums accumulate in: float64 for float64 tensors, else float32."""
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
    check_floating("weight_norm_", w=w)
    with torch.no_grad():
        w.copy_(normalize(w.to(acc_dtype(w.dtype)), eps=eps))
    return w


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """``W_hat = gain * N(W) / sqrt(fan_in)`` computed in fp32 (fp64 for fp64 weights)."""
    check_floating("mp_weight", w=w, gain=gain)
    wf = w.to(acc_dtype(w.dtype))
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


# --- Winograd MP convolution ---------------------------------------------------------------------------
# F(4x4, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) . (B^T d B)] A per 4x4 output tile and 6x6 input patch.
WINOGRAD_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
WINOGRAD_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
WINOGRAD_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
# G of the other tile sizes the CPU kernels run in eval, F(2x2, 3x3) and F(6x6, 3x3) (Lavin & Gray 2016,
# Sec. 4: interpolation points 0, +-1, inf and 0, +-1, +-2, +-1/2, inf), by output tile side.
WINOGRAD_TILE_G = {
    2: [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    4: WINOGRAD_G,
    6: [[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9], [1 / 90, 1 / 45, 2 / 45],
        [1 / 90, -1 / 45, 2 / 45], [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]],
}


def _pad8(c: int) -> int:
    return (c + 7) // 8 * 8


def winograd_weight(w: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """``U = G g G^T`` of a 3x3 weight ``[out, in, 3, 3]`` for F(tile x tile, 3x3) (``tile`` 2, 4 or 6:
    P = 16, 36 or 64 points) as ``[P, strips, in_p, 32]``: per transform point, panels of 32 output channels
    (channels zero-padded to multiples of 8, output channels up to whole panels), computed in float64 and
    returned in ``w``'s dtype. ``winograd_weight_rows`` gives the F(4x4) ``[36, in_p, out_p]`` matrix."""
    g = torch.tensor(WINOGRAD_TILE_G[tile], dtype=torch.float64, device=w.device)
    p = g.shape[0] ** 2
    u = torch.einsum("ia,ocab,jb->ijco", g, w.double(), g)
    strips = -(-_pad8(w.shape[0]) // 32)
    out = torch.zeros(p, _pad8(w.shape[1]), strips * 32, dtype=torch.float64, device=w.device)
    out[:, : w.shape[1], : w.shape[0]] = u.reshape(p, w.shape[1], w.shape[0])
    return out.reshape(p, out.shape[1], strips, 32).permute(0, 2, 1, 3).contiguous().to(w.dtype)


def winograd_weight_rows(u: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The ``[36, in_p, out_p]`` matrix of a ``winograd_weight`` result (``out_p``: ``out_channels`` padded
    to a multiple of 8)."""
    return u.permute(0, 2, 1, 3).reshape(36, u.shape[2], -1)[:, :, : _pad8(out_channels)]


def winograd_conv(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, silu_in: bool = False, mod=None, res=None,
                  t: float = 0.5, clip: float = 0.0) -> torch.Tensor:
    """The Winograd convolution with its fused chain, in plain PyTorch (tiles by ``unfold``): see the
    ``winograd_conv`` schema in csrc/ops.cpp."""
    n, cin, h, w = x.shape
    cout = scale.shape[0]
    th, tw = -(-h // 4), -(-w // 4)
    if silu_in:
        x = mp_silu(x)
    d = F.pad(x, (1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))  # [n, cin, 4 th + 2, 4 tw + 2]
    d = d.unfold(2, 6, 4).unfold(3, 6, 4)  # [n, cin, th, tw, 6, 6]
    bt = torch.tensor(WINOGRAD_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(WINOGRAD_AT, dtype=x.dtype, device=x.device)
    v = torch.einsum("ia,ncyxab,jb->ijnyxc", bt, d, bt)
    u = winograd_weight_rows(u, cout)
    m = torch.einsum("ijnyxc,ijco->ijnyxo", v, u.reshape(6, 6, *u.shape[1:])[:, :, :cin, :cout].to(x.dtype))
    y = torch.einsum("ri,ijnyxo,sj->noyrxs", at, m, at).reshape(n, cout, 4 * th, 4 * tw)[:, :, :h, :w]
    y = y * scale.to(x.dtype).reshape(-1, 1, 1)
    if mod is not None:
        y = mp_silu_modulate(y, mod)
    if res is not None:
        y = mp_sum(res, y, t)
    if clip > 0:
        y = y.clamp(-clip, clip)
    return y.contiguous()


def conv1x1(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution of ``torch.ops.fastdiff.conv1x1``: ``y[n, o] = sum_i w[o, i] x[n, i]`` per pixel, for
    a weight ``[out, in]`` or ``[out, in, 1, 1]``."""
    return F.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1))


def winograd_weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, W, padding=1)`` w.r.t. a 3x3 ``W`` for the output gradient ``grad``, in
    plain PyTorch, by the Winograd form the kernel uses (Lavin & Gray 2016, Sec. 5):
    ``dU = sum over tiles of (A g A^T) . (B^T d B)``, ``dW = G^T dU G``."""
    n, cin, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    d = F.pad(x, (1, 4 * tw + 1 - w, 1, 4 * th + 1 - h)).unfold(2, 6, 4).unfold(3, 6, 4)  # [n, cin, th, tw, 6, 6]
    gy = F.pad(grad, (0, 4 * tw - w, 0, 4 * th - h)).unfold(2, 4, 4).unfold(3, 4, 4)  # [n, cout, th, tw, 4, 4]
    bt = torch.tensor(WINOGRAD_BT, dtype=x.dtype, device=x.device)
    at = torch.tensor(WINOGRAD_AT, dtype=x.dtype, device=x.device)
    g = torch.tensor(WINOGRAD_G, dtype=x.dtype, device=x.device)
    v = torch.einsum("ia,ncyxab,jb->ijcnyx", bt, d, bt)
    gt = torch.einsum("ri,noyxrs,sj->ijonyx", at, gy, at)
    du = torch.einsum("ijcnyx,ijonyx->ijoc", v, gt)
    return torch.einsum("ia,ijoc,jb->ocab", g, du, g).contiguous()


def mp_conv_fused(x: torch.Tensor, w: torch.Tensor, gain=1.0, *, silu_in: bool = False, c=None, res=None,
                  t: float = 0.5, clip: float = 0.0, eps: float = EPS) -> torch.Tensor:
    """The block chain the Winograd path fuses: ``mp_conv(mp_silu?(x))``, then ``mp_silu(y (1 + c))``,
    ``mp_sum(res, y, t)`` and ``clip`` where given."""
    y = mp_conv(mp_silu(x) if silu_in else x, w, gain, eps)
    if c is not None:
        y = mp_silu_modulate(y, c.to(y.dtype))
    if res is not None:
        y = mp_sum(res, y, t)
    if clip:
        y = y.clamp(-clip, clip)
    return y


# --- block epilogue and the attention's SDPA route --------------------------------------------------------


def mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, limit: float = 0.0, silu: bool = False):
    """The block epilogue ``clip(mp_sum(a, b, t), limit)`` (no clip for ``limit <= 0``); with ``silu`` also
    ``mp_silu`` of it, as a pair ``(x, mp_silu(x))``."""
    x = mp_sum(a, b, t)
    if limit > 0:
        x = clip(x, limit)
    return (x, mp_silu(x)) if silu else x


def attention_qkv_norm(qkv: torch.Tensor, num_heads: int, eps: float = EPS):
    """q, k, v of raw qkv ``[N, 3C, H, W]`` (EDM2's ``[N, heads, C/heads, 3, H*W]`` channel view), each
    normalized over its head's channels per pixel, as ``[N, heads, H*W, C/heads]`` views of
    ``[N, H*W, heads, C/heads]`` memory (the layout of ``fastdiff::attention_qkv_norm``)."""
    n, c3, h, w = qkv.shape
    d = c3 // (3 * num_heads)
    y = normalize(qkv.reshape(n, num_heads, d, 3, h * w), dim=2, eps=eps)
    q, k, v = y.permute(3, 0, 4, 1, 2).contiguous().unbind(0)  # each [N, H*W, heads, D]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def cosine_attention_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``cosine_attention`` as normalized q, k, v and ``F.scaled_dot_product_attention`` (its default scale is
    ``1 / sqrt(C/heads)``, the cosine attention's); the result ``[N, C, H, W]``."""
    n, c3, h, w = qkv.shape
    q, k, v = attention_qkv_norm(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(n, h, w, c3 // 3).permute(0, 3, 1, 2)


# --- the batched solver step ------------------------------------------------------------------------------


def per_sample(v, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A python number, 0-d or [N] tensor -> [N] tensor in the accumulation dtype on ``like``'s device."""
    acc = acc_dtype(like.dtype)
    if isinstance(v, torch.Tensor):
        if v.ndim == 0 or (v.ndim == 1 and v.numel() == 1):
            return v.reshape(()).to(device=like.device, dtype=acc).expand(n).contiguous()
        if v.ndim != 1 or v.shape[0] != n:
            raise ValueError(
                f"fastdiff.solver_step: expected '{name}' as a number or a tensor of shape [N] = [{n}], "
                f"got {tuple(v.shape)}"
            )
        return v.to(device=like.device, dtype=acc)
    return torch.full((n,), float(v), dtype=acc, device=like.device)


def solver_step_reference(x, d1, d0=None, w=1.0, sigma_cur=None, sigma_next=None, d_prev=None, x_base=None):
    """The batched guided Euler / Heun-correction step of ``fastdiff.ops.solver_step`` (differentiable)."""
    if sigma_cur is None or sigma_next is None:
        raise ValueError("fastdiff.solver_step: sigma_cur and sigma_next are required")
    if (d_prev is None) != (x_base is None):
        raise ValueError("fastdiff.solver_step: 'd_prev' and 'x_base' go together (a Heun correction needs both)")
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    shape = (n,) + (1,) * (x.ndim - 1)
    s_cur = per_sample(sigma_cur, n, x, "sigma_cur").reshape(shape)
    s_next = per_sample(sigma_next, n, x, "sigma_next").reshape(shape)
    if d0 is None:
        D = d1.to(acc)
    else:
        g = d0.to(acc)
        D = g + per_sample(w, n, x, "w").reshape(shape) * (d1.to(acc) - g)
    xa = x.to(acc)
    h = s_next - s_cur
    if d_prev is None:
        d = (xa - D) / s_cur
        x_next = xa + h * d
    else:
        d = (xa - D) / s_next
        x_next = x_base.to(acc) + h * (0.5 * d_prev.to(acc) + 0.5 * d)
    return x_next.to(x.dtype), d.to(x.dtype), D.to(x.dtype)
