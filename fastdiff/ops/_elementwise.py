"""The MP elementwise chain of the EDM2 blocks: ``mp_silu`` (Eq. 81), ``mp_sum`` (Eq. 88), ``mp_cat``
(Eq. 103), ``pixel_norm``, ``mp_silu_modulate`` (the block's ``mp_silu(y * (1 + c))``), ``clip`` and
``normalize``, with the fake kernels and autograd formulas of their kernels.
"""

from __future__ import annotations

import torch

from fastdiff.ops import reference
from fastdiff.ops._dispatch import (
    EPS,
    call,
    channels_last,
    check,
    check_channels,
    check_cond,
    check_float,
    check_same,
    check_t,
    dense_like,
    register,
    shared_like,
    uses_kernel,
)

CLIP_LIMIT = reference.CLIP_LIMIT

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "pixel_norm", "mp_silu_modulate", "clip"]


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """``N(x)`` over ``dim`` (the reference; the fused forms are ``weight_norm`` and ``pixel_norm``)."""
    return reference.normalize(x, dim=dim, eps=eps)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x) / 0.596``."""
    if uses_kernel("mp_silu", x):
        return call(torch.ops.fastdiff.mp_silu.default, x)
    return reference.mp_silu(x)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``((1-t) a + t b) / sqrt((1-t)^2 + t^2)``; ``t`` must be finite."""
    reference.mp_sum_weights(t)  # checks t
    if uses_kernel("mp_sum", a, b) and a.shape == b.shape and a.dtype == b.dtype:
        return call(torch.ops.fastdiff.mp_sum.default, a, b, float(t))
    return reference.mp_sum(a, b, t)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along ``dim``; ``t`` must be finite."""
    reference.mp_cat_weights(1, 1, t)  # checks t
    if dim in (1, 1 - a.ndim) and a.ndim >= 2 and uses_kernel("mp_cat", a, b):
        return call(torch.ops.fastdiff.mp_cat.default, a, b, float(t))
    return reference.mp_cat(a, b, dim=dim, t=t)


def pixel_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``N(x)`` over the channel dim (1), per pixel."""
    if uses_kernel("pixel_norm", x):
        return call(torch.ops.fastdiff.pixel_norm.default, x, eps)
    return reference.pixel_norm(x, eps)


def mp_silu_modulate(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block's chain ``mp_silu(y * (1 + c))``, ``c`` of shape ``[N, C]`` broadcast over space."""
    if uses_kernel("mp_silu_modulate", y, c):
        return call(torch.ops.fastdiff.mp_silu_modulate.default, y, c)
    return reference.mp_silu_modulate(y, c)


def clip(x: torch.Tensor, limit: float = CLIP_LIMIT) -> torch.Tensor:
    """Clamp to ``[-limit, limit]``."""
    if uses_kernel("clip", x):
        return call(torch.ops.fastdiff.clip.default, x, float(limit))
    return reference.clip(x, limit)


def _binary(op: str, na: str, a, nb: str, b) -> torch.Tensor:
    check_float(op, **{na: a, nb: b})
    check_same(op, na, a, nb, b)
    return shared_like(a, b)


@register("mp_silu", "mp_silu_backward", "mp_sum", "clip", "clip_backward", "mp_cat", "pixel_norm",
          "pixel_norm_backward", "mp_silu_modulate", "mp_silu_modulate_backward")
def _register() -> None:
    lib, ops = "fastdiff::", torch.ops.fastdiff
    reg = torch.library.register_fake

    @reg(lib + "mp_silu")
    def _(x):
        check_float("mp_silu", x=x)
        return shared_like(x)

    reg(lib + "mp_silu_backward")(lambda grad, x: _binary("mp_silu_backward", "grad", grad, "x", x))

    @reg(lib + "mp_sum")
    def _(a, b, t):
        check_t("mp_sum", t)
        return _binary("mp_sum", "a", a, "b", b)

    @reg(lib + "clip")
    def _(x, limit):
        check(limit >= 0, "clip", f"expected a non-negative limit, got {limit}")
        check_float("clip", x=x)
        return shared_like(x)

    reg(lib + "clip_backward")(lambda grad, x, limit: _binary("clip_backward", "grad", grad, "x", x))

    @reg(lib + "pixel_norm")
    def _(x, eps):
        check_float("pixel_norm", x=x)
        check_channels("pixel_norm", "x", x)
        return dense_like(x)

    @reg(lib + "pixel_norm_backward")
    def _(grad, x, eps):
        check_float("pixel_norm_backward", x=x)
        check_same("pixel_norm_backward", "grad", grad, "x", x)
        check_channels("pixel_norm_backward", "x", x)
        return dense_like(x)

    @reg(lib + "mp_silu_modulate")
    def _(y, c):
        check_float("mp_silu_modulate", y=y)
        check_channels("mp_silu_modulate", "y", y)
        check_cond("mp_silu_modulate", y, c)
        return dense_like(y)

    @reg(lib + "mp_silu_modulate_backward")
    def _(grad, y, c):
        check_float("mp_silu_modulate_backward", y=y)
        check_same("mp_silu_modulate_backward", "grad", grad, "y", y)
        check_channels("mp_silu_modulate_backward", "y", y)
        check_cond("mp_silu_modulate_backward", y, c)
        return dense_like(y), c.new_empty(c.shape)

    @reg(lib + "mp_cat")
    def _(a, b, t):
        check_float("mp_cat", a=a, b=b)
        check_same("mp_cat", "a", a, "b", b, same_shape=False)
        check(a.ndim >= 2 and a.ndim == b.ndim and all(d == 1 or a.shape[d] == b.shape[d] for d in range(a.ndim)),
              "mp_cat", f"expected a and b of the same rank >= 2 matching in every dim but 1, got shapes "
              f"{tuple(a.shape)} and {tuple(b.shape)}")
        check_t("mp_cat", t)
        shape = list(a.shape)
        shape[1] = a.shape[1] + b.shape[1]
        fmt = channels_last(a)
        if fmt is None or channels_last(b) != fmt:
            return a.new_empty(shape)
        return a.new_empty(shape).contiguous(memory_format=fmt)

    def setup_x(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    # mp_silu
    torch.library.register_autograd(
        lib + "mp_silu", lambda ctx, g: ops.mp_silu_backward(g, ctx.saved_tensors[0]), setup_context=setup_x
    )

    # clip
    def clip_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.limit = inputs[1]

    torch.library.register_autograd(
        lib + "clip", lambda ctx, g: (ops.clip_backward(g, ctx.saved_tensors[0], ctx.limit), None), setup_context=clip_setup
    )

    # mp_sum: linear, so the gradient is two scalings.
    def sum_setup(ctx, inputs, output):
        ctx.wa, ctx.wb = reference.mp_sum_weights(inputs[2])

    torch.library.register_autograd(
        lib + "mp_sum", lambda ctx, g: (g * ctx.wa, g * ctx.wb, None), setup_context=sum_setup
    )

    # mp_cat: the gradient is the two scaled halves.
    def cat_setup(ctx, inputs, output):
        a, b, t = inputs
        ctx.na = a.shape[1]
        ctx.wa, ctx.wb = reference.mp_cat_weights(a.shape[1], b.shape[1], t)

    torch.library.register_autograd(
        lib + "mp_cat",
        lambda ctx, g: (g[:, : ctx.na] * ctx.wa, g[:, ctx.na :] * ctx.wb, None),
        setup_context=cat_setup,
    )

    # pixel_norm
    def pn_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    torch.library.register_autograd(
        lib + "pixel_norm",
        lambda ctx, g: (ops.pixel_norm_backward(g, ctx.saved_tensors[0], ctx.eps), None),
        setup_context=pn_setup,
    )

    # mp_silu_modulate
    def mod_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    torch.library.register_autograd(
        lib + "mp_silu_modulate",
        lambda ctx, g: ops.mp_silu_modulate_backward(g, *ctx.saved_tensors),
        setup_context=mod_setup,
    )
