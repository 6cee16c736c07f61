"""Forced weight normalization and the MP weight (EDM2 Eqs. 47, 66): ``weight_norm``, ``weight_norm_``,
``weight_norm_scale`` and ``mp_weight`` (``gain * N(W) / sqrt(fan_in)``), with the fake kernels and autograd
formulas of their kernels (``weight_norm_backward`` and the internal ``scale_rows`` / ``scale_channels_``
included).
"""

from __future__ import annotations

import math

import torch

from fastdiff.ops import reference
from fastdiff.ops._dispatch import (
    EPS,
    call,
    check,
    check_channels,
    check_float,
    check_same,
    check_weight,
    gain_tensor,
    register,
    uses_kernel,
)
from fastdiff.ops.reference import acc_dtype as _acc

__all__ = ["weight_norm", "weight_norm_", "weight_norm_scale", "mp_weight", "fan_in"]


def weight_norm(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization, functional: ``N(W)`` per output row (differentiable)."""
    if uses_kernel("weight_norm", w):
        return call(torch.ops.fastdiff.weight_norm.default, w, eps)
    return reference.weight_norm(w, eps)


def weight_norm_(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization in place, ``W <- N(W)``, with no gradient through the write."""
    reference.check_floating("weight_norm_", w=w)  # an int32 tensor would be overwritten with rounded values
    with torch.no_grad():
        if uses_kernel("weight_norm_", w):
            return torch.ops.fastdiff.weight_norm_(w, eps)
        return reference.weight_norm_(w, eps)


def weight_norm_scale(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The per-output-row factor ``1 / (eps + ||w_o|| / sqrt(fan_in))`` of ``N(W)``, float32 (float64 for
    float64 weights), no gradient: ``N(W) = W * weight_norm_scale(W)`` row by row."""
    if uses_kernel("weight_norm_scale", w):
        return torch.ops.fastdiff.weight_norm_scale(w, eps)
    return reference.row_scale(w.detach(), eps)


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = EPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The effective MP weight ``gain * N(W) / sqrt(fan_in)``, e.g. to cache in eval mode."""
    reference.check_floating("mp_weight", w=w, gain=gain)
    if uses_kernel("mp_weight", w):
        return call(torch.ops.fastdiff.mp_weight.default, w, gain_tensor(gain, w), eps, dtype)
    out = reference.mp_weight(w, gain, eps)
    return out.to(dtype if dtype is not None else w.dtype)


def fan_in(w: torch.Tensor) -> int:
    """The number of inputs of one output row of ``w``: ``prod(w.shape[1:])``."""
    return math.prod(w.shape[1:])


def mp_weight_vjp(g, w, gain, eps: float, need_w: bool = True, need_gain: bool = True):
    """``(dw, dgain)`` from ``g``, the gradient w.r.t. ``W_hat = gain N(w) / sqrt(fan_in)`` (``None`` where
    not needed): through the weight normalization (``weight_norm_backward``) and the scalar factor."""
    ops = torch.ops.fastdiff
    rfan = 1.0 / math.sqrt(w[0].numel())
    dwu, dot = ops.weight_norm_backward(g.to(w.dtype), w, eps)
    dw = dwu * (gain.to(dwu) * rfan) if need_w else None
    dgain = (dot.sum() * rfan).to(gain).reshape(gain.shape) if need_gain else None
    return dw, dgain


def check_gain(op: str, gain: torch.Tensor, w: torch.Tensor) -> None:
    check_float(op, gain=gain)
    check(gain.numel() == 1 and gain.ndim <= 1, op, f"expected a scalar gain (0-d tensor), got shape {tuple(gain.shape)}")
    check(gain.device == w.device or gain.device.type == "cpu", op,
          f"expected gain on {w.device} or the CPU, got {gain.device}")


def _empty_w(w, dtype=None):
    return torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)


@register("weight_norm_scale", "scale_rows", "scale_channels_", "weight_norm_backward", "weight_norm", "weight_norm_",
          "mp_weight")
def _register() -> None:
    lib, ops = "fastdiff::", torch.ops.fastdiff

    @torch.library.register_fake(lib + "weight_norm_scale")
    def _(w, eps):
        check_weight("weight_norm_scale", w)
        return w.new_empty((w.shape[0],), dtype=_acc(w.dtype))

    @torch.library.register_fake(lib + "scale_rows")
    def _(w, coef, dtype=None):
        check_weight("scale_rows", w)
        check_float("scale_rows", coef=coef)
        check(coef.ndim == 1 and coef.shape[0] == w.shape[0], "scale_rows",
              f"expected coef of shape [{w.shape[0]}], got {tuple(coef.shape)}")
        return _empty_w(w, dtype)

    @torch.library.register_fake(lib + "scale_channels_")
    def _(y, coef):
        check_float("scale_channels_", y=y)
        check_channels("scale_channels_", "y", y)
        check(coef.ndim == 1 and coef.shape[0] == y.shape[1], "scale_channels_",
              f"expected coef of shape [{y.shape[1]}], got {tuple(coef.shape)}")
        return y

    @torch.library.register_fake(lib + "weight_norm_backward")
    def _(grad, w, eps):
        check_weight("weight_norm_backward", w)
        check_same("weight_norm_backward", "grad", grad, "w", w)
        return _empty_w(w), w.new_empty((w.shape[0],), dtype=_acc(w.dtype))

    @torch.library.register_fake(lib + "weight_norm")
    def _(w, eps):
        check_weight("weight_norm", w)
        return _empty_w(w)

    @torch.library.register_fake(lib + "weight_norm_")
    def _(w, eps):
        check_weight("weight_norm_", w)
        return w

    @torch.library.register_fake(lib + "mp_weight")
    def _(w, gain, eps, dtype=None):
        check_weight("mp_weight", w)
        check_gain("mp_weight", gain, w)
        return _empty_w(w, dtype)

    # weight_norm (functional)
    def wn_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.eps = inputs[1]

    torch.library.register_autograd(
        lib + "weight_norm",
        lambda ctx, g: (ops.weight_norm_backward(g, ctx.saved_tensors[0], ctx.eps)[0], None),
        setup_context=wn_setup,
    )

    # mp_weight: W_hat = gain * N(w) / sqrt(fan_in)
    def mpw_setup(ctx, inputs, output):
        w, gain, eps, _dtype = inputs
        ctx.save_for_backward(w, gain)
        ctx.eps = eps

    def mpw_backward(ctx, g):
        w, gain = ctx.saved_tensors
        dw, dgain = mp_weight_vjp(g, w, gain, ctx.eps, *ctx.needs_input_grad[:2])
        return dw, dgain, None, None

    torch.library.register_autograd(lib + "mp_weight", mpw_backward, setup_context=mpw_setup)
