"""The block epilogue of the GPU route: ``mp_sum_clip`` (EDM2's residual ``mp_sum``, Eq. 88, and the
activation clip in one pass, optionally with the next block's ``mp_silu``, Eq. 81, as a second output), with
the fake kernels and autograd formulas of ``fastdiff::mp_sum_clip`` / ``mp_sum_clip_silu``; both
differentiate through ``mp_sum_clip_backward``, which recomputes the sum from ``a`` and ``b``.
"""

from __future__ import annotations

import math

import torch

from fastdiff.ops import reference
from fastdiff.ops._dispatch import call, check, check_float, check_same, check_t, register, shared_like, uses_kernel

__all__ = ["mp_sum_clip"]


def mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, limit: float = 0.0, silu: bool = False):
    """The block epilogue ``clip(mp_sum(a, b, t), limit)`` in one pass (no clip for ``limit <= 0``); with
    ``silu=True`` the pair ``(x, mp_silu(x))``: the residual and the next block's activation, one read of
    ``a`` and ``b``. ``t`` must be finite."""
    reference.mp_sum_weights(t)  # checks t
    if uses_kernel("mp_sum_clip", a, b) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device:
        if silu:
            return tuple(call(torch.ops.fastdiff.mp_sum_clip_silu.default, a, b, float(t), float(limit)))
        return call(torch.ops.fastdiff.mp_sum_clip.default, a, b, float(t), float(limit))
    return reference.mp_sum_clip(a, b, t, limit, silu)


def _check(op: str, a, b, t, limit) -> None:
    check_float(op, a=a, b=b)
    check_same(op, "a", a, "b", b)
    check(not math.isnan(limit), op, "expected a clip limit (<= 0 for none), got NaN")
    check_t(op, t)


@register("mp_sum_clip", "mp_sum_clip_silu", "mp_sum_clip_backward")
def _register() -> None:
    lib, ops = "fastdiff::", torch.ops.fastdiff
    reg = torch.library.register_fake

    @reg(lib + "mp_sum_clip")
    def _(a, b, t, limit):
        _check("mp_sum_clip", a, b, t, limit)
        return shared_like(a, b)

    @reg(lib + "mp_sum_clip_silu")
    def _(a, b, t, limit):
        _check("mp_sum_clip_silu", a, b, t, limit)
        return shared_like(a, b), shared_like(a, b)

    @reg(lib + "mp_sum_clip_backward")
    def _(grad, grad_silu, a, b, t, limit):
        op = "mp_sum_clip_backward"
        _check(op, a, b, t, limit)
        check_same(op, "grad", grad, "a", a)
        if grad_silu is not None:
            check_same(op, "grad_silu", grad_silu, "a", a)
        ts = (grad, b) if grad_silu is None else (grad, b, grad_silu)
        return shared_like(a, *ts), shared_like(a, *ts)

    # a and b saved (the backward recomputes the sum and its clip mask).
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
