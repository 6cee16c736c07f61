"""Autograd formulas and fake (meta) kernels of the block-level fusions, and the switch that says where the
GPU route of the network runs.

- ``fastdiff::mp_sum_clip(a, b, t, limit)`` and ``mp_sum_clip_silu`` (the block epilogue: EDM2's residual
  ``mp_sum`` (Eq. 88) and the activation clip in one pass, optionally with the next block's ``mp_silu``
  (Eq. 81) as a second output); both differentiate through ``mp_sum_clip_backward``, which recomputes the
  sum from ``a`` and ``b``.
- ``fastdiff::attention_qkv_norm(qkv, num_heads, eps)`` (the pixel norm of q, k, v per head, written in the
  ``[N, tokens, heads, dim]`` memory that ``F.scaled_dot_product_attention`` reads without a copy) and its
  backward ``attention_qkv_norm_backward``.

``gpu_route(x)`` is the one switch for the network's CUDA design (channels-last activations, SDPA attention,
the fused epilogues): True on CUDA in eager mode. Tests patch it to run that route on the CPU.
"""

from __future__ import annotations

import torch

from fastdiff._runtime import is_compiling as _is_compiling
from fastdiff.ops import _ext
from fastdiff.ops._register import _dense

lib = "fastdiff::"


def gpu_route(x: torch.Tensor) -> bool:
    """Whether the network takes its GPU design for activation ``x``: CUDA, eager (under ``torch.compile`` the
    reference ops are traced instead)."""
    return x.device.type == "cuda" and not _is_compiling()


def _shared_like(ref: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The output layout of the flat kernels (block_ops.h ``shared_layout``): ``ref``'s dense layout when every
    input is dense with the same strides, else contiguous."""
    ts = (ref, *others)
    if all(_dense(t) for t in ts) and all(t.stride() == ref.stride() for t in ts):
        return torch.empty_like(ref, memory_format=torch.preserve_format)
    return torch.empty_like(ref, memory_format=torch.contiguous_format)


def _qkv_out(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    n, c3, h, w = qkv.shape
    return qkv.new_empty((n, h * w, num_heads, c3 // (3 * num_heads))).transpose(1, 2)


def _register() -> None:
    ops = torch.ops.fastdiff
    reg = torch.library.register_fake

    reg(lib + "mp_sum_clip")(lambda a, b, t, limit: _shared_like(a, b))
    reg(lib + "mp_sum_clip_silu")(lambda a, b, t, limit: (_shared_like(a, b), _shared_like(a, b)))

    @reg(lib + "mp_sum_clip_backward")
    def _(grad, grad_silu, a, b, t, limit):
        ts = (grad, b) if grad_silu is None else (grad, b, grad_silu)
        return _shared_like(a, *ts), _shared_like(a, *ts)

    @reg(lib + "attention_qkv_norm")
    def _(qkv, num_heads, eps):
        torch._check(qkv.dim() == 4, lambda: f"fastdiff.attention_qkv_norm: expected qkv [N, 3C, H, W], got {qkv.shape}")
        torch._check(num_heads >= 1 and qkv.shape[1] % (3 * num_heads) == 0,
                     lambda: f"fastdiff.attention_qkv_norm: expected a multiple of 3 * num_heads channels, got {qkv.shape[1]}")
        return _qkv_out(qkv, num_heads), _qkv_out(qkv, num_heads), _qkv_out(qkv, num_heads)

    @reg(lib + "attention_qkv_norm_backward")
    def _(grad_q, grad_k, grad_v, qkv, num_heads, eps):
        cl = not qkv.is_contiguous() and qkv.is_contiguous(memory_format=torch.channels_last)
        return torch.empty_like(qkv, memory_format=torch.channels_last if cl else torch.contiguous_format)

    # mp_sum_clip / mp_sum_clip_silu: a and b saved (the backward recomputes the sum and its clip mask).
    def sc_setup(ctx, inputs, output):
        a, b, t, limit = inputs
        ctx.save_for_backward(a, b)
        ctx.t, ctx.limit = t, limit

    def sc_backward(ctx, g):
        a, b = ctx.saved_tensors
        da, db = ops.mp_sum_clip_backward(g, None, a, b, ctx.t, ctx.limit)
        return da, db, None, None

    torch.library.register_autograd(lib + "mp_sum_clip", sc_backward, setup_context=sc_setup)

    def scs_backward(ctx, gx, gs):
        a, b = ctx.saved_tensors
        if gx is None:
            gx = torch.zeros_like(a)
        da, db = ops.mp_sum_clip_backward(gx, gs, a, b, ctx.t, ctx.limit)
        return da, db, None, None

    torch.library.register_autograd(lib + "mp_sum_clip_silu", scs_backward, setup_context=sc_setup)

    # attention_qkv_norm: qkv saved; an unused output's gradient is zero.
    def qn_setup(ctx, inputs, output):
        qkv, num_heads, eps = inputs
        ctx.save_for_backward(qkv)
        ctx.num_heads, ctx.eps = num_heads, eps

    def qn_backward(ctx, gq, gk, gv):
        (qkv,) = ctx.saved_tensors
        gs = [g if g is not None else _qkv_out(qkv, ctx.num_heads).zero_() for g in (gq, gk, gv)]
        return ops.attention_qkv_norm_backward(*gs, qkv, ctx.num_heads, ctx.eps), None, None

    torch.library.register_autograd(lib + "attention_qkv_norm", qn_backward, setup_context=qn_setup)


if _ext.LOADED and hasattr(torch.ops.fastdiff, "mp_sum_clip"):
    _register()
