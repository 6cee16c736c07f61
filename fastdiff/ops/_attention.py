"""Autograd formula and fake (meta) kernels of the fused cosine attention ops.

``fastdiff::cosine_attention(qkv, num_heads) -> (y, lse)`` saves ``qkv``, ``y`` and ``lse`` (the per-query
log-sum-exp of the scaled scores, float32, float64 for float64 inputs) and its backward is the fused
``fastdiff::cosine_attention_backward``, which recomputes the scores tile by tile. ``lse`` gets no
gradient.
"""

from __future__ import annotations

import torch

from fastdiff.ops import _ext
from fastdiff.ops.reference import acc_dtype as _lse_dtype

HEAD_DIM = 64


def _register() -> None:
    ops = torch.ops.fastdiff

    @torch.library.register_fake("fastdiff::cosine_attention")
    def _(qkv, num_heads):
        torch._check(qkv.dim() == 4, lambda: f"fastdiff.cosine_attention: expected qkv [N, 3C, H, W], got {qkv.shape}")
        torch._check(
            qkv.shape[1] == 3 * HEAD_DIM * num_heads,
            lambda: f"fastdiff.cosine_attention: expected 3 * 64 * num_heads channels, got {qkv.shape[1]}",
        )
        n, c3, h, w = qkv.shape
        y = qkv.new_empty((n, c3 // 3, h, w))
        lse = qkv.new_empty((n, num_heads, h * w), dtype=_lse_dtype(qkv.dtype))
        return y, lse

    @torch.library.register_fake("fastdiff::cosine_attention_backward")
    def _(grad, qkv, y, lse, num_heads):
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


if _ext.LOADED:
    _register()
