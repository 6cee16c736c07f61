"""The MP convolution / linear layer (EDM2 Eq. 47): ``mp_conv``, ``mp_linear``, with the fake kernels,
autograd formula and autocast rule of the ``mp_conv`` kernel; ``MPConvWeights``, one layer's eval-mode weight
caches and the choice of its execution path (Winograd, cached effective weight, ``mp_conv``, compiled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff import ops as _ops  # the package (partly initialized now): conv_epilogue's op set, read per call
from fastdiff._runtime import is_compiling
from fastdiff.ops import _winograd as _wg
from fastdiff.ops import reference
from fastdiff.ops._dispatch import (
    EPS,
    call,
    channels_last,
    check,
    check_float,
    dense_like,
    gain_tensor,
    needs_grad,
    register,
    route_state,
    save_conv_inputs,
    uses_kernel,
)
from fastdiff.ops._weight import check_gain, mp_weight
from fastdiff.ops._winograd import winograd_weight

__all__ = ["mp_conv", "mp_linear", "MPConvWeights"]


def mp_conv(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """MP convolution (4-D weight, 'same' padding) or MP linear (2-D weight), no bias."""
    reference.check_floating("mp_conv", x=x, w=w, gain=gain)
    if uses_kernel("mp_conv", x, w):
        return call(torch.ops.fastdiff.mp_conv.default, x, w, gain_tensor(gain, w), eps)
    return reference.mp_conv(x, w, gain, eps)


def mp_linear(x: torch.Tensor, w: torch.Tensor, gain=1.0, eps: float = EPS) -> torch.Tensor:
    """MP linear layer ``x @ W_hat^T`` (a 2-D weight ``[out, in]``)."""
    if w.ndim != 2:
        raise ValueError(f"fastdiff.mp_linear: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    return mp_conv(x, w, gain, eps)


def check_conv_inputs(op: str, x, w, gain) -> None:
    """The checks of the ``mp_conv`` kernels."""
    check_float(op, x=x, w=w)
    check_gain(op, gain, w)
    check(x.device == w.device, op, f"expected x and w on the same device, got {x.device} and {w.device}")
    check(w.ndim in (2, 4), op, f"expected a 2-D (linear) or 4-D (conv) weight, got shape {tuple(w.shape)}")
    check(w.numel() > 0, op, f"expected a non-empty weight, got shape {tuple(w.shape)}")
    if w.ndim == 4:
        check(x.ndim == 4 and x.shape[1] == w.shape[1], op,
              f"expected x of shape [N, {w.shape[1]}, H, W] for a weight of shape {tuple(w.shape)}, got {tuple(x.shape)}")
        check(w.shape[2] % 2 == 1 and w.shape[3] % 2 == 1, op,
              f"expected an odd kernel size (padding k//2 keeps the size), got {tuple(w.shape)}")
    else:
        check(x.ndim >= 1 and x.shape[-1] == w.shape[1], op,
              f"expected x of shape [..., {w.shape[1]}] for a weight of shape {tuple(w.shape)}, got {tuple(x.shape)}")


_AUTOCAST_LIB = []  # keeps the Library that holds the autocast kernels alive


@register("mp_conv", "mp_conv_backward")
def _register() -> None:
    lib, ops = "fastdiff::", torch.ops.fastdiff

    @torch.library.register_fake(lib + "mp_conv")
    def _(x, w, gain, eps):
        check_conv_inputs("mp_conv", x, w, gain)
        if w.ndim == 2:
            return x.new_empty((*x.shape[:-1], w.shape[0]))
        out = x.new_empty((x.shape[0], w.shape[0], *x.shape[2:]))
        return out.contiguous(memory_format=channels_last(x) or torch.contiguous_format)

    @torch.library.register_fake(lib + "mp_conv_backward")
    def _(grad, x, w, gain, eps, output_mask):
        check_conv_inputs("mp_conv_backward", x, w, gain)
        dx = (dense_like(x) if w.ndim == 4 else torch.empty_like(x, memory_format=torch.contiguous_format))
        return (
            dx if output_mask[0] else None,
            torch.empty(w.shape, dtype=w.dtype, device=w.device) if output_mask[1] else None,
            torch.empty_like(gain) if output_mask[2] else None,
        )

    def conv_backward(ctx, g):
        x, w, gain = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        dx, dw, dgain = ops.mp_conv_backward(g, x, w, gain, ctx.eps, mask)
        return dx, dw, dgain, None

    torch.library.register_autograd(lib + "mp_conv", conv_backward, setup_context=save_conv_inputs)

    # Autocast: the activation is cast to the autocast dtype, the weight keeps its own dtype (a float32 master
    # weight is normalized in float32 and cast inside the op, as EDM2 does), the output is in the autocast
    # dtype, so eager, compiled and the reference (``F.conv2d`` autocasts) agree.
    op = ops.mp_conv.default
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


# --- one MP convolution's weights: the eval-mode caches and the path choice --------------------------------


def _gain_key(gain):
    if isinstance(gain, torch.Tensor):
        return ("t", id(gain), gain._version, gain.device, gain.dtype)
    return ("f", float(gain))


def _plan_key(x: torch.Tensor, w: torch.Tensor, gain) -> tuple:
    """Everything ``MPConvWeights.run``'s choice of path and cached tensors depends on, besides grad mode and
    compilation (checked per call): the input's shape, dtype, device and layout, the weight's version,
    storage, device and dtype, the gain, and the global switches of the selectors."""
    return (x.shape, x.dtype, x.device, x.is_contiguous(), w._version, w.data_ptr(), w.device, w.dtype,
            _gain_key(gain), route_state(), _wg._FORCE[0], _wg._TILES_ENV)


class MPConvWeights:
    """The derived weights of one MP convolution / linear layer and the choice of the path that runs it
    (``nn.MPConv`` holds one): ``run(x, w, gain)`` is ``mp_conv(x, w, gain)`` (EDM2 Eq. 47), optionally with
    the block chain of ``mp_conv_fused`` around it, on the fastest path that fits:

    - 3x3 convolutions that the selector (``conv_path``) gives to Winograd: ``mp_conv_fused``, in eval mode
      without a gradient straight to the fused kernel with the cached weight transform and output scale;
    - else in eval mode (no gradient w.r.t. the weight or gain): the cached effective weight
      ``gain * N(W) / sqrt(fan_in)`` and a plain convolution (``conv1x1`` / ``F.conv2d`` / ``F.linear``);
    - else ``mp_conv``, or under ``torch.compile`` the reference ops, which the compiler sees through.

    Each cache is keyed on the weight's version counter, storage, device and dtype (and the gain, by value
    for a number, by identity and version for a tensor), so an optimizer step or ``load_state_dict`` makes
    it stale. ``clear()`` drops them, ``tensors()`` lists what they hold (what a CUDA graph reads).

    Without grad mode, the last call's route is kept as a plan (``_plan_key`` and the tensors it ran with), so
    the next call with the same key goes straight to the kernel: at batch 1 of small-32 the routing (selector,
    cache keys, checks) cost about 20 us per convolution against 30 us for the smallest kernels.
    """

    __slots__ = ("_hat", "_wino", "_scale", "_plan")

    def __init__(self):
        self._hat = None  # (key, effective weight)
        self._wino = None  # (key, row scale, {tile: Winograd weight transform})
        self._scale = None  # ((row scale, gain key), the output transform's per-channel factor)
        # (key, "winograd", transform, output factor), or (key, "conv1x1" / "weight", effective weight)
        self._plan = None

    def clear(self) -> None:
        self._hat = self._wino = self._scale = self._plan = None

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the caches hold now."""
        out = []
        if self._hat is not None:
            out.append(self._hat[1])
        if self._wino is not None:
            out.append(self._wino[1])
            out.extend(self._wino[2].values())
        if self._scale is not None:
            out.append(self._scale[1])
        return out

    def __deepcopy__(self, memo):
        return MPConvWeights()  # a copy (an EMA copy, a checkpoint) must not drag stale weights along

    def __reduce__(self):
        return MPConvWeights, ()

    def effective_weight(self, w: torch.Tensor, gain=1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The cached ``gain * N(W) / sqrt(fan_in)`` in ``dtype`` (no gradient); recomputed when stale."""
        dtype = dtype or w.dtype
        key = (w._version, w.data_ptr(), w.device, dtype, _gain_key(gain))
        cache = self._hat
        if cache is not None and cache[0] == key:
            return cache[1]
        # Plain (non-inference) tensor even under torch.inference_mode, so it can be reused anywhere.
        with torch.inference_mode(False), torch.no_grad():
            g = gain.detach().clone() if isinstance(gain, torch.Tensor) else gain
            w_hat = mp_weight(w.detach(), g, dtype=dtype)
            if w_hat.ndim == 4 and w_hat.is_cuda:  # cuDNN runs channels-last: convert once, not per call
                w_hat = w_hat.contiguous(memory_format=torch.channels_last)
        self._hat, self._plan = (key, w_hat), None  # a plan never holds what the caches no longer do
        return w_hat

    def winograd_weight(self, w: torch.Tensor, dtype: torch.dtype | None = None, tile: int = 4):
        """The cached ``(winograd_weight(W, tile), weight_norm_scale(W))`` pair of the Winograd path (no
        gradient; each tile's transform made once, on first use). It holds the un-normalized weight's
        transform: the MP factor ``gain * s_o / sqrt(fan_in)`` is applied per output channel in the fused
        output transform, so a gain change needs no new transform."""
        dtype = dtype or w.dtype
        key = (w._version, w.data_ptr(), w.device, dtype)
        cache = self._wino
        if cache is None or cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                # (Only reached where the Winograd kernels exist: the row scale is always the kernel's.)
                cache = self._wino = (key, torch.ops.fastdiff.weight_norm_scale(w.detach(), EPS), {})
                self._plan = None
        u = cache[2].get(tile)
        if u is None:
            with torch.inference_mode(False), torch.no_grad():
                u = cache[2][tile] = winograd_weight(w.detach().to(dtype), tile)
        return u, cache[1]

    def winograd_scale(self, w: torch.Tensor, row: torch.Tensor, gain) -> torch.Tensor:
        """The cached per-output-channel factor ``gain * row / sqrt(fan_in)`` of the fused output transform."""
        gkey = _gain_key(gain)
        sc = self._scale
        if sc is None or sc[0][0] is not row or sc[0][1] != gkey:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, reusable anywhere
                g = gain.detach().clone() if isinstance(gain, torch.Tensor) else gain
                sc = self._scale = ((row, gkey), _wg.winograd_scale(row, g, w))
                self._plan = None
        return sc[1]

    def run(self, x: torch.Tensor, w: torch.Tensor, gain=1.0, training: bool = False, silu_in: bool = False, c=None,
            res=None, t: float = 0.5, clip: float = 0.0) -> torch.Tensor:
        """``mp_conv_fused(x, w, gain, silu_in=..., c=..., res=..., t=..., clip=...)`` (``mp_conv`` with the defaults)
        on the path described above. ``training``: the layer is in training mode (never cached; the forced
        weight normalization is the caller's)."""
        plan = self._plan
        compiling = is_compiling()
        # A plan of the fused Winograd kernel takes any chain; the others are plain layers (no chain around them).
        if (plan is not None and not training and not compiling and not torch.is_grad_enabled()
                and (plan[1] == "winograd" or not (silu_in or c is not None or res is not None or clip))
                and _plan_key(x, w, gain) == plan[0]):
            if plan[1] == "winograd":  # the cached transform and output factor
                return _wg.winograd_eval(x, plan[2], plan[3], silu_in, c, res, t, clip)
            if plan[1] == "conv1x1":  # the 1x1 kernel on the cached effective weight, without conv1x1's checks
                with torch._C._AutoDispatchBelowAutograd():
                    return torch.ops.fastdiff.conv1x1(x, plan[2])
            return _apply_weight(x, plan[2])
        cached = not (training or compiling or (torch.is_grad_enabled() and (
            w.requires_grad or (isinstance(gain, torch.Tensor) and gain.requires_grad))))
        if not compiling and w.ndim == 4 and _wg.uses_winograd(x, w):
            if not cached:
                return _wg.mp_conv_fused(x, w, gain, silu_in=silu_in, c=c, res=res, t=t, clip=clip)
            if uses_kernel("winograd_conv", x) and not needs_grad(x, c, res):
                # No gradient: straight to the kernel with the cached transform and factor, without
                # mp_conv_fused's per-call checks.
                tile = _wg.winograd_tile(x.shape[1], w.shape[0], x.shape[2], x.shape[3], x.shape[0], x.dtype)
                u, row = self.winograd_weight(w, x.dtype, tile)
                scale = self.winograd_scale(w, row, gain)
                if not torch.is_grad_enabled():
                    self._plan = (_plan_key(x, w, gain), "winograd", u, scale)
                return _wg.winograd_eval(x, u, scale, silu_in, c, res, t, clip)
            cache = self.winograd_weight(w, x.dtype)
            return _wg.mp_conv_fused(x, w, gain, silu_in=silu_in, c=c, res=res, t=t, clip=clip, cache=cache)
        o = reference if compiling else _ops
        if silu_in:
            x = o.mp_silu(x)
        if cached:
            w_hat = self.effective_weight(w, gain, x.dtype)
            if not torch.is_grad_enabled():
                kernel = w_hat.ndim == 4 and w_hat.shape[-2:] == (1, 1) and _wg.conv1x1_takes_kernel(x, w_hat)
                self._plan = (_plan_key(x, w, gain), "conv1x1" if kernel else "weight", w_hat)
            y = _apply_weight(x, w_hat)
        elif compiling:
            # The reference MP weight and a plain conv, which the compiler sees through. In training, the value
            # N(W) (what the forced normalization wrote) with the gradient taken there, as in eager mode,
            # whether or not the compiled graph sees the in-place write.
            if training:
                w = reference.normalize(w.detach()) + (w - w.detach())
            y = _apply_weight(x, reference.mp_weight(w, gain).to(x.dtype))
        else:
            y = mp_conv(x, w, gain)
        if c is None and res is None and not clip:
            return y
        return _wg.conv_epilogue(o, y, c, res, t, clip)


def _apply_weight(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    if w_hat.ndim == 2:
        return F.linear(x, w_hat)
    if w_hat.shape[-2:] == (1, 1) and not is_compiling():
        return _wg.conv1x1(x, w_hat)
    return F.conv2d(x, w_hat, padding=(w_hat.shape[-2] // 2, w_hat.shape[-1] // 2))
