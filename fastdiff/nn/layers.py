"""Magnitude-preserving layers: ``MPConv`` (conv / linear with forced weight normalization), ``MPFourier``
and the 2x resampling of the EDM2 blocks (EDM2 Eqs. 47, 66, 75), built on ``fastdiff.ops``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff._runtime import is_compiling as _is_compiling
from fastdiff.ops import _winograd as _wg

__all__ = ["MPConv", "MPFourier", "resample", "clear_weight_caches", "force_normalize_", "weight_cache_clears"]

_CLEARS = [0]  # how many weight caches were cleared so far (see weight_cache_clears)


def weight_cache_clears() -> int:
    """How many times an ``MPConv`` weight cache was cleared in this process: captured CUDA graphs hold the
    cached weights they read (``MPConv.cached_tensors``) and drop themselves when this number moves, so that
    ``clear_weight_caches`` frees the memory."""
    return _CLEARS[0]


def _ops():
    """The op set to call: the fused ops in eager mode; under ``torch.compile`` the plain-PyTorch reference
    ops, which the compiler traces and fuses itself (the fused custom ops would be opaque to it)."""
    return ops.reference if _is_compiling() else ops


@torch.compiler.disable
def force_normalize_(weights) -> None:
    """Forced weight normalization ``W <- N(W)`` of each weight, in place, always run eagerly.

    Under ``torch.compile`` an in-place write to a parameter inside the compiled graph is not reliably
    written back (and the gradient would be taken at the un-normalized weight), so compiled training
    normalizes here, outside the graph, before the compiled forward reads the weights.
    """
    with torch.no_grad():
        for w in weights:
            ops.weight_norm_(w)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel=(kh, kw)``) or linear layer (``kernel=()``), no bias.

    ``W_hat = gain * N(W) / sqrt(fan_in)``. In training mode every forward first normalizes the stored
    weight in place (forced weight normalization, no gradient through the write) and then uses ``N(W)``
    in the graph, so gradients flow through the normalization. In eval mode, when no gradient w.r.t. the
    weight or the gain is needed, the effective weight is computed once and cached (keyed on the
    weight's and gain's version counters, the dtype and the device), then plain ``F.conv2d`` /
    ``F.linear`` run on it; any in-place change of the weight (optimizer step, ``load_state_dict``)
    invalidates the cache.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        kernel = tuple(int(k) for k in kernel)
        if len(kernel) not in (0, 2):
            raise ValueError(f"MPConv: expected kernel=() (linear) or a 2-tuple (conv), got {kernel}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel = kernel
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._cache = None  # (key, effective weight)
        self._wcache = None  # (key, (Winograd weight transform, row scale)) for the Winograd path
        self._scache = None  # ((row scale, gain key), the output transform's per-channel factor)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}"

    # --- the eval-mode weight cache -----------------------------------------------------------------

    def clear_weight_cache(self) -> None:
        self._cache = None
        self._wcache = None
        self._scache = None
        _CLEARS[0] += 1

    def cached_tensors(self) -> list[torch.Tensor]:
        """The tensors the eval-mode caches hold now (what a forward captured into a CUDA graph reads)."""
        out = []
        if self._cache is not None:
            out.append(self._cache[1])
        if self._wcache is not None:
            out.extend(self._wcache[1])
        sc = getattr(self, "_scache", None)
        if sc is not None:
            out.append(sc[1])
        return out

    def _gain_key(self, gain):
        if isinstance(gain, torch.Tensor):
            return ("t", id(gain), gain._version, gain.device, gain.dtype)
        return ("f", float(gain))

    def effective_weight(self, gain=1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The cached ``gain * N(W) / sqrt(fan_in)`` in ``dtype`` (no gradient); recomputed when stale."""
        w = self.weight
        dtype = dtype or w.dtype
        key = (w._version, w.data_ptr(), w.device, dtype, self._gain_key(gain))
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        # Plain (non-inference) tensor even under torch.inference_mode, so it can be reused anywhere.
        with torch.inference_mode(False), torch.no_grad():
            g = gain.detach().clone() if isinstance(gain, torch.Tensor) else gain
            w_hat = ops.mp_weight(w.detach(), g, dtype=dtype)
            if w_hat.ndim == 4 and w_hat.is_cuda:  # cuDNN runs channels-last: convert once, not per call
                w_hat = w_hat.contiguous(memory_format=torch.channels_last)
        self._cache = (key, w_hat)
        return w_hat

    def winograd_weight(self, dtype: torch.dtype | None = None):
        """The cached ``(winograd_weight(W), weight_norm_scale(W))`` pair of the Winograd path (no gradient),
        keyed on the weight's version counter like ``effective_weight``. It holds the un-normalized weight's
        transform: the MP factor ``gain * s_o / sqrt(fan_in)`` is applied per output channel in the fused
        output transform, so a gain change needs no new transform."""
        w = self.weight
        dtype = dtype or w.dtype
        key = (w._version, w.data_ptr(), w.device, dtype)
        cache = self._wcache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.inference_mode(False), torch.no_grad():
            wd = w.detach()
            pair = (ops.winograd_weight(wd.to(dtype)), torch.ops.fastdiff.weight_norm_scale(wd, ops.EPS))
        self._wcache = (key, pair)
        return pair

    def fused(self, x: torch.Tensor, gain=1.0, *, silu_in: bool = False, c=None, res=None, t: float = 0.5,
              clip: float = 0.0) -> torch.Tensor:
        """``ops.mp_conv_fused`` with this layer's weight: ``self(mp_silu(x))`` (``silu_in``), then
        ``mp_silu(y * (1 + c))``, ``mp_sum(res, y, t)`` and ``clip`` where given; one Winograd pass in eval
        mode where the selector (``ops.conv_path``) picks Winograd, the unfused chain otherwise."""
        if _is_compiling() or len(self.kernel) != 2 or not ops.uses_winograd(x, self.weight):
            o = _ops()
            return ops.conv_epilogue(o, self(o.mp_silu(x) if silu_in else x, gain), c, res, t, clip)
        if self.training:
            ops.weight_norm_(self.weight)
        if not self._use_cache(gain):
            return ops.mp_conv_fused(x, self.weight, gain, silu_in=silu_in, c=c, res=res, t=t, clip=clip)
        if ops.uses_kernel("winograd_conv", x) and not _wg._needs_grad(x, c, res):
            # Eval mode, no gradient: straight to the kernel with the cached transform and factor, without
            # mp_conv_fused's per-call checks.
            u, row = self.winograd_weight(x.dtype)
            key = (row, self._gain_key(gain))
            sc = getattr(self, "_scache", None)  # (absent on modules unpickled from before it existed)
            if sc is None or sc[0][0] is not row or sc[0][1] != key[1]:
                with torch.inference_mode(False), torch.no_grad():  # a plain tensor, reusable anywhere
                    g = gain.detach().clone() if isinstance(gain, torch.Tensor) else gain
                    sc = self._scache = (key, _wg.winograd_scale(row, g, self.weight))
            return _wg.winograd_eval(x, u, sc[1], silu_in, c, res, t, clip)
        cache = self.winograd_weight(x.dtype)
        return ops.mp_conv_fused(x, self.weight, gain, silu_in=silu_in, c=c, res=res, t=t, clip=clip, cache=cache)

    _normalized_by_parent = False  # set by UNet / Precond, which normalize all their layers at once

    def _use_cache(self, gain) -> bool:
        if self.training or _is_compiling():
            return False
        if torch.is_grad_enabled():
            if self.weight.requires_grad or (isinstance(gain, torch.Tensor) and gain.requires_grad):
                return False
        return True

    # --- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if len(self.kernel) == 2 and not _is_compiling() and ops.uses_winograd(x, self.weight):
            return self.fused(x, gain)
        if self.training:
            # Forced weight normalization (no grad through the write). Compiled, it is done eagerly: by the
            # enclosing UNet / Precond for all its layers at once, else here (one graph break per layer).
            if not _is_compiling():
                ops.weight_norm_(self.weight)
            elif not self._normalized_by_parent:
                force_normalize_([self.weight])
        elif self._use_cache(gain):
            return self._apply_weight(x, self.effective_weight(gain, x.dtype))
        if _is_compiling():
            # Under torch.compile: the reference MP weight and a plain conv, which the compiler sees through.
            w = self.weight
            if self.training:
                # The value N(W) (what the forced normalization wrote) with the gradient taken there, as in
                # eager mode, whether or not the compiled graph sees the in-place write.
                w = ops.reference.normalize(w.detach()) + (w - w.detach())
            return self._apply_weight(x, ops.reference.mp_weight(w, gain).to(x.dtype))
        return ops.mp_conv(x, self.weight, gain)

    @staticmethod
    def _apply_weight(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        if w_hat.ndim == 2:
            return F.linear(x, w_hat)
        if w_hat.shape[-2:] == (1, 1) and not _is_compiling():
            return ops.conv1x1(x, w_hat)
        return F.conv2d(x, w_hat, padding=(w_hat.shape[-2] // 2, w_hat.shape[-1] // 2))

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_cache"] = None
        state["_wcache"] = None
        state["_scache"] = None
        return state

    def __deepcopy__(self, memo):
        # Copy everything but the cache (an EMA copy or a checkpoint must not drag stale weights along).
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        import copy

        for k, v in self.__dict__.items():
            new.__dict__[k] = None if k in ("_cache", "_wcache", "_scache") else copy.deepcopy(v, memo)
        return new


def clear_weight_caches(module: torch.nn.Module) -> None:
    """Drop every cached effective weight under ``module`` (frees the memory they hold)."""
    for m in module.modules():
        if isinstance(m, MPConv):
            m.clear_weight_cache()


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features ``sqrt(2) cos(outer(c, f) + phi)`` with fixed random buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.num_channels = int(num_channels)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def extra_repr(self) -> str:
        return f"{self.num_channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.outer(x.to(torch.float32).reshape(-1), self.freqs.to(torch.float32))
        y = torch.cos(y + self.phases.to(torch.float32)) * math.sqrt(2)
        return y.to(x.dtype)


def _upsample_nearest2x_copy(x: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling of ``[N, C, H, W]`` as broadcast copies (the values of ``F.interpolate(mode="nearest")``):
    on the CPU without a gradient faster than ATen's kernel (BENCHMARKS.md); under ``torch.compile`` it works around an inductor
    CPU bug (torch 2.13) that reorders a reader before the accumulating scatter of nearest-upsampling's backward, so
    the gradient is a plain sum. See tests/test_nn.py ``test_torch_compile_inductor_training_matches_eager``."""
    n, c, h, w = x.shape
    x = x.unsqueeze(4).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
    return x.unsqueeze(3).expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """EDM2 2x resampling with the ``[1, 1]`` filter.

    ``down``: depthwise 2x2 box average with stride 2 (== ``avg_pool2d(x, 2)``). ``up``: depthwise transposed
    conv with the same filter times 4 and stride 2, i.e. every pixel copied to a 2x2 patch (== nearest
    upsampling). Both are computed with the cheap equivalent; tests check them against the filter form.
    """
    if mode == "keep":
        return x
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        if _is_compiling():
            return _upsample_nearest2x_copy(x)
        no_grad = not (torch.is_grad_enabled() and x.requires_grad)
        if x.ndim == 4 and x.device.type == "cpu" and x.is_contiguous() and no_grad:
            return _upsample_nearest2x_copy(x)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    raise ValueError(f"resample: expected mode 'keep', 'down' or 'up', got {mode!r}")
