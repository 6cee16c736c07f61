"""Autograd formulas and fake (meta) kernels for the compiled ops.

Gradients of the fused ops are fused kernels too (``*_backward`` ops); the few that are a single
multiply are plain tensor expressions. Fake kernels describe each output's shape, dtype and layout so
``torch.compile`` can trace through the ops without running them.
"""

from __future__ import annotations

import math

import torch

from fastdiff.ops import _ext, reference
from fastdiff.ops.reference import acc_dtype as _acc

lib = "fastdiff::"


def _channels_last(x: torch.Tensor):
    """The channels-last memory format ``x`` is dense in (and not plainly contiguous), else None."""
    if x.ndim not in (4, 5) or x.is_contiguous():
        return None
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return fmt if x.is_contiguous(memory_format=fmt) else None


def _dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the channel-wise kernels lay out their output for input ``x``."""
    return torch.empty_like(x, memory_format=_channels_last(x) or torch.contiguous_format)


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense (as ATen's ``is_non_overlapping_and_dense``, which Python lacks)."""
    expected = 1
    for stride, size in sorted((x.stride(i), x.size(i)) for i in range(x.ndim) if x.size(i) != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_like(x: torch.Tensor) -> torch.Tensor:
    """Output layout of the flat elementwise kernels: keep a dense layout, else contiguous."""
    if _dense(x):
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _flat_like2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _dense(a) and _dense(b) and a.stride() == b.stride():
        return torch.empty_like(a, memory_format=torch.preserve_format)
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def mp_weight_vjp(g, w, gain, eps: float, need_w: bool = True, need_gain: bool = True):
    """``(dw, dgain)`` from ``g``, the gradient w.r.t. ``W_hat = gain N(w) / sqrt(fan_in)`` (``None`` where
    not needed): through the weight normalization (``weight_norm_backward``) and the scalar factor."""
    ops = torch.ops.fastdiff
    rfan = 1.0 / math.sqrt(w[0].numel())
    dwu, dot = ops.weight_norm_backward(g.to(w.dtype), w, eps)
    dw = dwu * (gain.to(dwu) * rfan) if need_w else None
    dgain = (dot.sum() * rfan).to(gain).reshape(gain.shape) if need_gain else None
    return dw, dgain


def _register_fakes() -> None:
    reg = torch.library.register_fake

    reg(lib + "weight_norm_scale")(lambda w, eps: w.new_empty((w.shape[0],), dtype=_acc(w.dtype)))
    reg(lib + "scale_rows")(
        lambda w, coef, dtype=None: torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
    )
    reg(lib + "scale_channels_")(lambda y, coef: y)
    reg(lib + "weight_norm_backward")(
        lambda grad, w, eps: (torch.empty(w.shape, dtype=w.dtype, device=w.device), w.new_empty((w.shape[0],), dtype=_acc(w.dtype)))
    )
    reg(lib + "weight_norm")(lambda w, eps: torch.empty(w.shape, dtype=w.dtype, device=w.device))
    reg(lib + "weight_norm_")(lambda w, eps: w)
    reg(lib + "mp_silu")(lambda x: _flat_like(x))
    reg(lib + "mp_silu_backward")(lambda grad, x: _flat_like2(grad, x))
    reg(lib + "mp_sum")(lambda a, b, t: _flat_like2(a, b))
    reg(lib + "clip")(lambda x, limit: _flat_like(x))
    reg(lib + "clip_backward")(lambda grad, x, limit: _flat_like2(grad, x))
    reg(lib + "pixel_norm")(lambda x, eps: _dense_like(x))
    reg(lib + "pixel_norm_backward")(lambda grad, x, eps: _dense_like(x))
    reg(lib + "mp_silu_modulate")(lambda y, c: _dense_like(y))
    reg(lib + "mp_silu_modulate_backward")(lambda grad, y, c: (_dense_like(y), c.new_empty(c.shape)))

    reg(lib + "mp_weight")(
        lambda w, gain, eps, dtype=None: torch.empty(w.shape, dtype=dtype or w.dtype, device=w.device)
    )

    @reg(lib + "mp_conv")
    def _(x, w, gain, eps):
        if w.ndim == 2:
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        out = x.new_empty((x.shape[0], w.shape[0], *x.shape[2:]))
        return out.contiguous(memory_format=_channels_last(x) or torch.contiguous_format)

    @reg(lib + "mp_conv_backward")
    def _(grad, x, w, gain, eps, output_mask):
        dx = (_dense_like(x) if w.ndim == 4 else torch.empty_like(x, memory_format=torch.contiguous_format))
        return (
            dx if output_mask[0] else None,
            torch.empty(w.shape, dtype=w.dtype, device=w.device) if output_mask[1] else None,
            torch.empty_like(gain) if output_mask[2] else None,
        )

    @reg(lib + "mp_cat")
    def _(a, b, t):
        shape = list(a.shape)
        shape[1] = a.shape[1] + b.shape[1]
        fmt = _channels_last(a)
        if fmt is None or _channels_last(b) != fmt:
            return a.new_empty(shape)
        return a.new_empty(shape).contiguous(memory_format=fmt)


def _register_autograd() -> None:
    ops = torch.ops.fastdiff

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

    # mp_conv
    def conv_setup(ctx, inputs, output):
        x, w, gain, eps = inputs
        ctx.save_for_backward(x, w, gain)
        ctx.eps = eps

    def conv_backward(ctx, g):
        x, w, gain = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, dgain = ops.mp_conv_backward(g, x, w, gain, ctx.eps, mask)
        return dx, dw, dgain, None

    torch.library.register_autograd(lib + "mp_conv", conv_backward, setup_context=conv_setup)


_AUTOCAST_LIB = []  # keeps the Library that holds the autocast kernels alive


def _register_autocast() -> None:
    """``mp_conv`` under ``torch.autocast``: the activation is cast to the autocast dtype, the weight keeps its
    own dtype (a float32 master weight is normalized in float32 and cast inside the op, as EDM2 does), the
    output is in the autocast dtype. Without this rule eager mode got a reduced-precision output only by
    accident (the conv inside the composite autocast itself) while the fake kernel and compiled graphs said
    float32; now eager, compiled and the reference (``F.conv2d`` autocasts) agree."""
    op = torch.ops.fastdiff.mp_conv.default
    library = torch.library.Library("fastdiff", "IMPL")
    _AUTOCAST_LIB.append(library)
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def rule(x, w, gain, eps, key=key, device_type=device_type):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                if x.is_floating_point() and x.dtype != torch.float64 and x.device.type == device_type:
                    x = x.to(torch.get_autocast_dtype(device_type))
                return op(x, w, gain, eps)

        # Both the C++ dispatcher and the Python dispatcher (used while tracing) get the rule.
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(rule)
        library.impl("mp_conv", lambda _keyset, *args, rule=rule: rule(*args), key_name, with_keyset=True)


if _ext.LOADED:
    _register_fakes()
    _register_autograd()
    _register_autocast()
from fastdiff.ops import _attention  # noqa: E402,F401  (cosine attention: autograd + fake kernels)
from fastdiff.ops import _block  # noqa: E402,F401  (block epilogue + attention's SDPA route: autograd + fake kernels)
