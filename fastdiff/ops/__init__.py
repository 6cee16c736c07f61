"""fastdiff's fused ops: the one Python module that touches ``torch.ops.fastdiff``.

Each public function runs the compiled kernel when one fits the input (extension built, kernel for the
tensor's device, a float16/bfloat16/float32/float64 dtype) and the plain-PyTorch reference of
``fastdiff.ops.reference`` otherwise, so everything above works the same either way. Kernels are real
torch custom ops with autograd and fake kernels, so autograd, ``torch.compile`` and export see them.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.autograd.forward_ad as _fw_ad

from fastdiff._runtime import is_compiling as _is_compiling
from fastdiff.ops import _ext, reference
from fastdiff.ops import _register  # noqa: F401  (autograd + fake kernels)
from fastdiff.ops import _block
from fastdiff.ops._ext import LOADED as HAS_EXTENSION
from fastdiff.ops._ext import KERNELS as _KERNELS
from fastdiff.ops._ext import kernels

EPS = reference.EPS
CLIP_LIMIT = reference.CLIP_LIMIT
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_force = [False]  # set by use_reference(); a plain list so torch.compile can read it

__all__ = [
    "HAS_EXTENSION", "kernels", "use_reference", "uses_kernel", "weight_norm", "weight_norm_", "mp_weight",
    "mp_conv", "mp_linear", "mp_silu", "mp_sum", "mp_cat", "pixel_norm", "mp_silu_modulate", "clip", "normalize",
    "cosine_attention", "attention_impl", "attention_qkv_norm", "mp_sum_clip", "solver_step", "mp_conv_fused", "conv_epilogue", "conv1x1", "winograd_weight", "conv_path", "use_aten_conv", "use_conv_path",
    "reference",
]


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Within this block, run the plain-PyTorch reference ops instead of the kernels."""
    old = _force[0]
    _force[0] = enabled
    try:
        yield
    finally:
        _force[0] = old


def uses_kernel(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` on these tensors would run the compiled kernel (else the reference). Forward-mode AD
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) runs the reference: the kernels have no forward-mode
    formulas, and a custom op without one would silently give a zero tangent."""
    if _ext.FORCE_REFERENCE or _force[0] or _fw_ad._current_level >= 0:
        return False
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            return False
    return _KERNELS.get((op, tensors[0].device.type), False)


_below_autograd = torch._C._AutoDispatchBelowAutograd


def _call(op, *args):
    """``op(*args)`` for a ``torch.ops.fastdiff`` overload, skipping its Python autograd wrapper when no
    gradient can be needed (grad mode off, or no tensor argument requires grad).

    The wrapper ``torch.library.register_autograd`` installs runs in Python on every call, even under
    ``torch.no_grad()``, only to find that no graph is needed and redispatch below autograd; doing that
    here directly is the same dispatch without the Python round trip.
    Under ``torch.compile`` the op is called as is, so the compiler sees the plain custom-op call.
    """
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return op(*args)
    if _is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


def _gain_tensor(gain, like: torch.Tensor) -> torch.Tensor:
    if isinstance(gain, torch.Tensor):
        return gain
    # A Python float keeps its precision for float64 weights (float32 would round it: 1e-8 relative).
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((), float(gain), dtype=dtype, device=like.device)


# --- forced weight normalization and MP conv / linear -------------------------------------------


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """``N(x)`` over ``dim`` (the reference; the fused forms are ``weight_norm`` and ``pixel_norm``)."""
    return reference.normalize(x, dim=dim, eps=eps)


def weight_norm(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization, functional: ``N(W)`` per output row (differentiable)."""
    if uses_kernel("weight_norm", w):
        return _call(torch.ops.fastdiff.weight_norm.default, w, eps)
    return reference.weight_norm(w, eps)


def weight_norm_(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Forced weight normalization in place, ``W <- N(W)``, with no gradient through the write."""
    reference.check_floating("weight_norm_", w=w)  # an int32 tensor would be overwritten with rounded values
    with torch.no_grad():
        if uses_kernel("weight_norm_", w):
            return torch.ops.fastdiff.weight_norm_(w, eps)
        return reference.weight_norm_(w, eps)


def mp_weight(w: torch.Tensor, gain=1.0, eps: float = EPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The effective MP weight ``gain * N(W) / sqrt(fan_in)``, e.g. to cache in eval mode."""
    reference.check_floating("mp_weight", w=w, gain=gain)
    if uses_kernel("mp_weight", w):
        return _call(torch.ops.fastdiff.mp_weight.default, w, _gain_tensor(gain, w), eps, dtype)
    out = reference.mp_weight(w, gain, eps)
    return out.to(dtype if dtype is not None else w.dtype)


def mp_conv(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """MP convolution (4-D weight, 'same' padding) or MP linear (2-D weight), no bias."""
    reference.check_floating("mp_conv", x=x, w=w, gain=gain)
    if uses_kernel("mp_conv", x, w):
        return _call(torch.ops.fastdiff.mp_conv.default, x, w, _gain_tensor(gain, w), eps)
    return reference.mp_conv(x, w, gain, eps)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"fastdiff.mp_linear: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    return mp_conv(x, w, gain, eps)


# --- the MP elementwise chain ----------------------------------------------------------------------


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x) / 0.596``."""
    if uses_kernel("mp_silu", x):
        return _call(torch.ops.fastdiff.mp_silu.default, x)
    return reference.mp_silu(x)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """``((1-t) a + t b) / sqrt((1-t)^2 + t^2)``; ``t`` must be finite."""
    reference.mp_sum_weights(t)  # checks t
    if uses_kernel("mp_sum", a, b) and a.shape == b.shape and a.dtype == b.dtype:
        return _call(torch.ops.fastdiff.mp_sum.default, a, b, float(t))
    return reference.mp_sum(a, b, t)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along ``dim``; ``t`` must be finite."""
    reference.mp_cat_weights(1, 1, t)  # checks t
    if dim in (1, 1 - a.ndim) and a.ndim >= 2 and uses_kernel("mp_cat", a, b):
        return _call(torch.ops.fastdiff.mp_cat.default, a, b, float(t))
    return reference.mp_cat(a, b, dim=dim, t=t)


def pixel_norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``N(x)`` over the channel dim (1), per pixel."""
    if uses_kernel("pixel_norm", x):
        return _call(torch.ops.fastdiff.pixel_norm.default, x, eps)
    return reference.pixel_norm(x, eps)


def mp_silu_modulate(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The block's chain ``mp_silu(y * (1 + c))``, ``c`` of shape ``[N, C]`` broadcast over space."""
    if uses_kernel("mp_silu_modulate", y, c):
        return _call(torch.ops.fastdiff.mp_silu_modulate.default, y, c)
    return reference.mp_silu_modulate(y, c)


def clip(x: torch.Tensor, limit: float = CLIP_LIMIT) -> torch.Tensor:
    """Clamp to ``[-limit, limit]``."""
    if uses_kernel("clip", x):
        return _call(torch.ops.fastdiff.clip.default, x, float(limit))
    return reference.clip(x, limit)


# --- cosine self-attention ---------------------------------------------------------------------------


ATTENTION_IMPLS = ("auto", "kernel", "sdpa", "reference")


def attention_impl(qkv: torch.Tensor, num_heads: int, impl: str | None = None) -> str:
    """The route ``cosine_attention`` takes for ``qkv``: ``impl`` checked, or for ``None`` / ``"auto"``:
    ``"sdpa"`` on the GPU route (``_block.gpu_route``: CUDA, eager) in float16 / bfloat16 / float32 (our
    q/k/v norm kernel, then ``F.scaled_dot_product_attention``: flash / memory-efficient, tensor cores),
    ``"kernel"`` (our tiled kernel: CPU, float64, 64 channels per head) where it fits, else ``"reference"``."""
    if impl not in (None, *ATTENTION_IMPLS):
        raise ValueError(f"fastdiff.cosine_attention: expected impl in {ATTENTION_IMPLS} (or None), got {impl!r}")
    head_dim = qkv.shape[1] // (3 * num_heads)
    if impl == "kernel" and not (head_dim == 64 and uses_kernel("cosine_attention", qkv)):
        raise ValueError(
            f"fastdiff.cosine_attention: impl='kernel' needs the compiled kernel for {qkv.device.type} / {qkv.dtype} "
            f"and 64 channels per head, got {head_dim}"
        )
    if impl not in (None, "auto"):
        return impl
    if _fw_ad._current_level >= 0:  # forward-mode AD: the reference (no forward formulas on the custom ops)
        return "reference"
    if _block.gpu_route(qkv) and qkv.dtype != torch.float64 and qkv.numel() > 0 and head_dim <= 256:
        return "sdpa"
    if head_dim == 64 and uses_kernel("cosine_attention", qkv):
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
        return _call(torch.ops.fastdiff.cosine_attention.default, qkv, num_heads)[0]
    if route == "sdpa":
        n, c3, h, w = qkv.shape
        q, k, v = attention_qkv_norm(qkv, num_heads)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = o.transpose(1, 2).reshape(n, h, w, c3 // 3).permute(0, 3, 1, 2)
        return y if _register._channels_last(qkv) is not None else y.contiguous()
    return reference.cosine_attention(qkv, num_heads)


def attention_qkv_norm(qkv: torch.Tensor, num_heads: int, eps: float = EPS):
    """q, k, v for ``F.scaled_dot_product_attention`` from raw qkv ``[N, 3C, H, W]``: each pixel-normed over its
    head's channels, ``[N, heads, H*W, C/heads]`` views of ``[N, H*W, heads, C/heads]`` memory
    (``reference.attention_qkv_norm``); one fused kernel where compiled, channels-first or channels-last."""
    if uses_kernel("attention_qkv_norm", qkv) and qkv.ndim == 4:
        return _call(torch.ops.fastdiff.attention_qkv_norm.default, qkv, num_heads, float(eps))
    return reference.attention_qkv_norm(qkv, num_heads, eps)


def mp_sum_clip(a: torch.Tensor, b: torch.Tensor, t: float = 0.5, limit: float = 0.0, silu: bool = False):
    """The block epilogue ``clip(mp_sum(a, b, t), limit)`` in one pass (no clip for ``limit <= 0``); with
    ``silu=True`` the pair ``(x, mp_silu(x))``: the residual and the next block's activation, one read of
    ``a`` and ``b``. ``t`` must be finite."""
    reference.mp_sum_weights(t)  # checks t
    if uses_kernel("mp_sum_clip", a, b) and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device:
        if silu:
            return tuple(_call(torch.ops.fastdiff.mp_sum_clip_silu.default, a, b, float(t), float(limit)))
        return _call(torch.ops.fastdiff.mp_sum_clip.default, a, b, float(t), float(limit))
    return reference.mp_sum_clip(a, b, t, limit, silu)


def fan_in(w: torch.Tensor) -> int:
    return math.prod(w.shape[1:])


from fastdiff.ops._solver import solver_step, solver_step_reference  # noqa: E402,F401  (batched solver step)
from fastdiff.ops._winograd import conv1x1, conv_epilogue, conv_path, mp_conv_fused, use_aten_conv, use_conv_path, uses_winograd  # noqa: E402,F401


def winograd_weight(w: torch.Tensor) -> torch.Tensor:
    """The F(4x4, 3x3) weight transform ``G g G^T`` of a 3x3 weight, ``[36, in_p, out_p]`` (no gradient)."""
    if uses_kernel("winograd_weight", w) and w.dtype in (torch.float32, torch.float64):
        return torch.ops.fastdiff.winograd_weight(w.detach())
    return reference.winograd_weight(w.detach())
