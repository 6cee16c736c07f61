"""EDM2 cosine self-attention (EDM2 Eq. 95 ff.: q, k, v pixel-normed per head, softmax of their dot products):
``cosine_attention`` and its route (``attention_impl``: our tiled kernel, SDPA or the reference), and
``attention_qkv_norm``, the per-head norm of q, k, v in the memory ``F.scaled_dot_product_attention`` reads;
with the fake kernels and autograd formulas of their kernels.

``fastdiff::cosine_attention(qkv, num_heads) -> (y, lse)`` saves ``qkv``, ``y`` and ``lse`` (the per-query
log-sum-exp of the scaled scores, float32, float64 for float64 inputs); its backward, the fused
``cosine_attention_backward``, recomputes the scores tile by tile. ``lse`` gets no gradient.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fw_ad

from fastdiff.ops import _dispatch, reference
from fastdiff.ops._dispatch import EPS, call, channels_last, check, check_float, check_same, register, uses_kernel
from fastdiff.ops.reference import acc_dtype as _lse_dtype

HEAD_DIM = 64
ATTENTION_IMPLS = ("auto", "kernel", "sdpa", "reference")

__all__ = ["cosine_attention", "attention_impl", "attention_qkv_norm", "ATTENTION_IMPLS"]


def attention_impl(qkv: torch.Tensor, num_heads: int, impl: str | None = None) -> str:
    """The route ``cosine_attention`` takes for ``qkv``: ``impl`` checked, or for ``None`` / ``"auto"``:
    ``"sdpa"`` on the GPU route (``gpu_route``: CUDA, eager) in float16 / bfloat16 / float32 (our
    q/k/v norm kernel, then ``F.scaled_dot_product_attention``: flash / memory-efficient, tensor cores),
    ``"kernel"`` (our tiled kernel: CPU, float64, 64 channels per head) where it fits, else ``"reference"``."""
    if impl not in (None, *ATTENTION_IMPLS):
        raise ValueError(f"fastdiff.cosine_attention: expected impl in {ATTENTION_IMPLS} (or None), got {impl!r}")
    head_dim = qkv.shape[1] // (3 * num_heads)
    if impl == "kernel" and not (head_dim == HEAD_DIM and uses_kernel("cosine_attention", qkv)):
        raise ValueError(
            f"fastdiff.cosine_attention: impl='kernel' needs the compiled kernel for {qkv.device.type} / {qkv.dtype} "
            f"and 64 channels per head, got {head_dim}"
        )
    if impl not in (None, "auto"):
        return impl
    if _fw_ad._current_level >= 0:  # forward-mode AD: the reference (no forward formulas on the custom ops)
        return "reference"
    if _dispatch.gpu_route(qkv) and qkv.dtype != torch.float64 and qkv.numel() > 0 and head_dim <= 256:
        return "sdpa"
    if head_dim == HEAD_DIM and uses_kernel("cosine_attention", qkv):
        return "kernel"
    return "reference"


def cosine_attention(qkv: torch.Tensor, num_heads: int, impl: str | None = None) -> torch.Tensor:
    """EDM2 cosine self-attention on raw qkv ``[N, 3C, H, W]`` (official channel order) -> ``[N, C, H, W]``.

    ``impl``: ``"kernel"`` (the fused tiled kernel), ``"sdpa"`` (``attention_qkv_norm`` then
    ``F.scaled_dot_product_attention``; channels-last in, channels-last out without a layout copy where SDPA
    returns its native ``[N, tokens, heads, dim]`` memory), ``"reference"``, or ``None`` / ``"auto"``
    (``attention_impl``)."""
    if not isinstance(qkv, torch.Tensor) or qkv.ndim != 4:
        raise ValueError(f"fastdiff.cosine_attention: expected qkv of shape [N, 3C, H, W], got {getattr(qkv, 'shape', qkv)}")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(
            f"fastdiff.cosine_attention: expected the channel count ({qkv.shape[1]}) to be divisible by "
            f"3 * num_heads = {3 * num_heads}"
        )
    route = attention_impl(qkv, num_heads, impl)
    if route == "kernel":
        return call(torch.ops.fastdiff.cosine_attention.default, qkv, num_heads)[0]
    if route == "sdpa":
        n, c3, h, w = qkv.shape
        q, k, v = attention_qkv_norm(qkv, num_heads)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = o.transpose(1, 2).reshape(n, h, w, c3 // 3).permute(0, 3, 1, 2)
        return y if channels_last(qkv) is not None else y.contiguous()
    return reference.cosine_attention(qkv, num_heads)


def attention_qkv_norm(qkv: torch.Tensor, num_heads: int, eps: float = EPS):
    """q, k, v for ``F.scaled_dot_product_attention`` from raw qkv ``[N, 3C, H, W]``: each pixel-normed over its
    head's channels, ``[N, heads, H*W, C/heads]`` views of ``[N, H*W, heads, C/heads]`` memory
    (``reference.attention_qkv_norm``); one fused kernel where compiled, channels-first or channels-last."""
    if uses_kernel("attention_qkv_norm", qkv) and qkv.ndim == 4:
        return call(torch.ops.fastdiff.attention_qkv_norm.default, qkv, num_heads, float(eps))
    return reference.attention_qkv_norm(qkv, num_heads, eps)


def _check_attention_qkv(op: str, qkv, num_heads: int) -> None:
    check_float(op, qkv=qkv)
    check(qkv.ndim == 4, op, f"expected qkv of shape [N, 3C, H, W], got shape {tuple(qkv.shape)}")
    check(num_heads >= 1, op, f"expected num_heads >= 1, got {num_heads}")
    check(qkv.shape[1] == 3 * HEAD_DIM * num_heads, op,
          f"the fused kernel needs 64 channels per head, i.e. qkv with 3 * 64 * num_heads = {3 * HEAD_DIM * num_heads} "
          f"channels, got {qkv.shape[1]}")


def _check_qkv(op: str, qkv, num_heads: int) -> None:
    check_float(op, qkv=qkv)
    check(qkv.ndim == 4, op, f"expected qkv of shape [N, 3C, H, W], got {tuple(qkv.shape)}")
    check(num_heads >= 1 and qkv.shape[1] % (3 * num_heads) == 0 and qkv.shape[1] > 0, op,
          f"expected the channel count ({qkv.shape[1]}) to be a positive multiple of 3 * num_heads = {3 * num_heads}")


def _qkv_out(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    n, c3, h, w = qkv.shape
    return qkv.new_empty((n, h * w, num_heads, c3 // (3 * num_heads))).transpose(1, 2)


@register("cosine_attention", "cosine_attention_backward")
def _register_cosine() -> None:
    ops = torch.ops.fastdiff

    @torch.library.register_fake("fastdiff::cosine_attention")
    def _(qkv, num_heads):
        _check_attention_qkv("cosine_attention", qkv, num_heads)
        n, c3, h, w = qkv.shape
        y = qkv.new_empty((n, c3 // 3, h, w))
        lse = qkv.new_empty((n, num_heads, h * w), dtype=_lse_dtype(qkv.dtype))
        return y, lse

    @torch.library.register_fake("fastdiff::cosine_attention_backward")
    def _(grad, qkv, y, lse, num_heads):
        op = "cosine_attention_backward"
        _check_attention_qkv(op, qkv, num_heads)
        check_float(op, grad=grad, y=y)
        check_same(op, "grad", grad, "y", y)
        n, c3, h, w = qkv.shape
        check(y.dtype == qkv.dtype and y.device == qkv.device, op,
              f"expected y with qkv's dtype and device, got {y.dtype} on {y.device}")
        check(tuple(y.shape) == (n, c3 // 3, h, w), op, f"expected y of shape {(n, c3 // 3, h, w)}, got {tuple(y.shape)}")
        check(lse.dtype == _lse_dtype(qkv.dtype) and lse.device == qkv.device, op,
              f"expected lse of dtype {_lse_dtype(qkv.dtype)} on {qkv.device}, got {lse.dtype} on {lse.device}")
        check(tuple(lse.shape) == (n, num_heads, h * w), op,
              f"expected lse of shape {(n, num_heads, h * w)}, got {tuple(lse.shape)}")
        return qkv.new_empty(qkv.shape)

    def setup_context(ctx, inputs, output):
        qkv, num_heads = inputs
        y, lse = output
        ctx.save_for_backward(qkv, y, lse)
        ctx.num_heads = num_heads

    def backward(ctx, grad_y, grad_lse):
        qkv, y, lse = ctx.saved_tensors
        if grad_y is None:
            return torch.zeros_like(qkv), None
        return ops.cosine_attention_backward(grad_y, qkv, y, lse, ctx.num_heads), None

    torch.library.register_autograd("fastdiff::cosine_attention", backward, setup_context=setup_context)


@register("attention_qkv_norm", "attention_qkv_norm_backward")
def _register_qkv_norm() -> None:
    ops = torch.ops.fastdiff

    @torch.library.register_fake("fastdiff::attention_qkv_norm")
    def _(qkv, num_heads, eps):
        _check_qkv("attention_qkv_norm", qkv, num_heads)
        return _qkv_out(qkv, num_heads), _qkv_out(qkv, num_heads), _qkv_out(qkv, num_heads)

    @torch.library.register_fake("fastdiff::attention_qkv_norm_backward")
    def _(grad_q, grad_k, grad_v, qkv, num_heads, eps):
        op = "attention_qkv_norm_backward"
        _check_qkv(op, qkv, num_heads)
        n, c3, h, w = qkv.shape
        want = (n, num_heads, h * w, c3 // (3 * num_heads))
        for name, g in (("grad_q", grad_q), ("grad_k", grad_k), ("grad_v", grad_v)):
            check_same(op, name, g, "qkv", qkv, same_shape=False)
            check(tuple(g.shape) == want, op, f"expected '{name}' of shape {list(want)}, got {tuple(g.shape)}")
        cl = not qkv.is_contiguous() and qkv.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(qkv, memory_format=torch.channels_last if cl else torch.contiguous_format)

    # qkv saved; an unused output's gradient is zero.
    def qn_setup(ctx, inputs, output):
        qkv, num_heads, eps = inputs
        ctx.save_for_backward(qkv)
        ctx.num_heads, ctx.eps = num_heads, eps

    def qn_backward(ctx, gq, gk, gv):
        (qkv,) = ctx.saved_tensors
        gs = [g if g is not None else _qkv_out(qkv, ctx.num_heads).zero_() for g in (gq, gk, gv)]
        return ops.attention_qkv_norm_backward(*gs, qkv, ctx.num_heads, ctx.eps), None, None

    torch.library.register_autograd("fastdiff::attention_qkv_norm", qn_backward, setup_context=qn_setup)
