"""What every op family of ``fastdiff.ops`` shares: the kernel-or-reference choice (``uses_kernel``,
``use_reference``), the call below autograd (``call``), the GPU-route switch, the output layouts and input
checks of the fake kernels, and ``register``, the one way an op family registers its fake kernels, autograd
formulas and autocast rules with the compiled extension.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.autograd.forward_ad as _fw_ad

from fastdiff._runtime import is_compiling
from fastdiff.ops import _ext, reference

EPS = reference.EPS
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_force = [False]  # set by use_reference(); a plain list so torch.compile can read it
_force_gpu = [False]  # set by use_gpu_route()
_KERNELS = _ext.KERNELS
_REGISTERED: set[str] = set()


# --- registration -------------------------------------------------------------------------------------


def defines(op: str) -> bool:
    """Whether the loaded extension defines ``torch.ops.fastdiff.<op>`` (with or without a kernel here)."""
    return (op, "cpu") in _KERNELS


def register(*ops: str):
    """Decorator for an op family's registration function (fake kernels, autograd, autocast of ``ops``): runs
    it at once, and once per process, when the extension is loaded and defines every one of ``ops``. The
    family's wrappers fall back to the reference otherwise, so import order never matters."""

    def run(fn):
        key = f"{fn.__module__}.{fn.__qualname__}"
        if key not in _REGISTERED and _ext.LOADED and all(defines(op) for op in ops):
            _REGISTERED.add(key)
            fn()
        return fn

    return run


def save_conv_inputs(ctx, inputs, output) -> None:
    """The autograd ``setup_context`` of the MP convolutions ``mp_conv`` and ``mp_conv_winograd``, whose
    inputs are ``(x, w, gain, eps)``: the three tensors saved, ``eps`` on ``ctx``."""
    x, w, gain, eps = inputs
    ctx.save_for_backward(x, w, gain)
    ctx.eps = eps


# --- kernel or reference ------------------------------------------------------------------------------


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
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOATS:
            return False
    return _KERNELS.get((op, tensors[0].device.type), False)


def route_state() -> tuple:
    """The global switches ``uses_kernel`` reads (reference forced by the environment or ``force_reference``,
    forward-mode AD): a memo of a routing decision is valid while these are unchanged."""
    return _ext.FORCE_REFERENCE, _force[0], _fw_ad._current_level


_below_autograd = torch._C._AutoDispatchBelowAutograd


def call(op, *args):
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
    if is_compiling():
        return op(*args)
    with _below_autograd():
        return op(*args)


def needs_grad(*tensors) -> bool:
    """Whether grad mode is on and one of ``tensors`` requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def gain_tensor(gain, like: torch.Tensor) -> torch.Tensor:
    """A gain as the 0-d tensor the kernels take."""
    if isinstance(gain, torch.Tensor):
        return gain
    # A Python float keeps its precision for float64 weights (float32 would round it: 1e-8 relative).
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((), float(gain), dtype=dtype, device=like.device)


# --- the GPU route ------------------------------------------------------------------------------------


def gpu_route(x: torch.Tensor) -> bool:
    """Whether the network takes its GPU design for activation ``x`` (channels-last activations, SDPA
    attention, the fused block epilogues): CUDA, eager (under ``torch.compile`` the reference ops are traced
    instead), or anywhere inside ``use_gpu_route()``."""
    return (x.device.type == "cuda" or _force_gpu[0]) and not is_compiling()


@contextlib.contextmanager
def use_gpu_route(enabled: bool = True):
    """Within this block ``gpu_route`` is True on every device (eager): runs the GPU design on the CPU, for
    tests."""
    old = _force_gpu[0]
    _force_gpu[0] = enabled
    try:
        yield
    finally:
        _force_gpu[0] = old


# --- output layouts of the fake kernels ------------------------------------------------------------


def channels_last(x: torch.Tensor):
    """The channels-last memory format ``x`` is dense in (and not plainly contiguous), else None."""
    if x.ndim not in (4, 5) or x.is_contiguous():
        return None
    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return fmt if x.is_contiguous(memory_format=fmt) else None


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the channel-wise kernels lay out their output for input ``x``."""
    return torch.empty_like(x, memory_format=channels_last(x) or torch.contiguous_format)


def dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense (as ATen's ``is_non_overlapping_and_dense``, which Python lacks)."""
    expected = 1
    for stride, size in sorted((x.stride(i), x.size(i)) for i in range(x.ndim) if x.size(i) != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def shared_like(ref: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The output layout of the flat kernels: ``ref``'s dense layout when every input is dense with the same
    strides, else contiguous."""
    ts = (ref, *others)
    if all(dense(t) for t in ts) and all(t.stride() == ref.stride() for t in ts):
        return torch.empty_like(ref, memory_format=torch.preserve_format)
    return torch.empty_like(ref, memory_format=torch.contiguous_format)


# --- input checks of the fake kernels (the kernels' own checks, csrc/common.h) ------------------------


def check(cond, op: str, msg: str) -> None:
    torch._check(cond, lambda: f"fastdiff.{op}: {msg}")


def check_float(op: str, **tensors) -> None:
    """Each named tensor is given and floating point."""
    for name, t in tensors.items():
        check(isinstance(t, torch.Tensor), op, f"expected a tensor for '{name}', got {type(t).__name__}")
        check(t.is_floating_point(), op,
              f"expected '{name}' to be a floating-point tensor (float32, float64, float16 or bfloat16), got {t.dtype}")


def check_same(op: str, na: str, a: torch.Tensor, nb: str, b: torch.Tensor, same_shape: bool = True) -> None:
    """``a`` and ``b`` share device and dtype (and shape)."""
    check(a.device == b.device, op, f"expected '{na}' and '{nb}' on the same device, got {a.device} and {b.device}")
    check(a.dtype == b.dtype, op, f"expected '{na}' and '{nb}' to have the same dtype, got {a.dtype} and {b.dtype}")
    if same_shape:
        check(a.shape == b.shape, op,
              f"expected '{na}' and '{nb}' to have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_weight(op: str, w: torch.Tensor) -> None:
    check_float(op, w=w)
    check(w.ndim >= 1 and w.shape[0] > 0 and w.numel() > 0, op,
          f"expected a non-empty weight [out_channels, ...], got shape {tuple(w.shape)}")


def check_channels(op: str, name: str, x: torch.Tensor) -> None:
    check(x.ndim >= 2, op, f"expected '{name}' with at least 2 dims [N, C, ...], got shape {tuple(x.shape)}")


def check_cond(op: str, y: torch.Tensor, c: torch.Tensor) -> None:
    """mp_silu_modulate's conditioning ``c``: floating point, ``[N, C]`` of ``y``, on ``y``'s device."""
    check_float(op, c=c)
    check(c.device == y.device, op, f"expected y and c on the same device, got {y.device} and {c.device}")
    check(y.ndim >= 2 and c.ndim == 2 and c.shape[0] == y.shape[0] and c.shape[1] == y.shape[1], op,
          f"expected c of shape [N, C] = {list(y.shape[:2])}, got {tuple(c.shape)}")


def check_t(op: str, t: float) -> None:
    check(math.isfinite(t), op, f"expected a finite blend weight t, got {t}")
