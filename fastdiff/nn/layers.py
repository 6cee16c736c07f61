"""Magnitude-preserving layers: ``MPConv`` (conv / linear with forced weight normalization), ``MPFourier``
and the 2x resampling of the EDM2 blocks (EDM2 Eqs. 47, 66, 75), built on ``fastdiff.ops``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff._runtime import is_compiling as _is_compiling

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

    ``W_hat = gain * N(W) / sqrt(fan_in)`` (EDM2 Eq. 47). In training mode every forward first normalizes the
    stored weight in place (forced weight normalization, Eq. 66, no gradient through the write) and then uses
    ``N(W)`` in the graph, so gradients flow through the normalization. In eval mode, when no gradient w.r.t.
    the weight or the gain is needed, the derived weights are computed once and cached
    (``fastdiff.ops.MPConvWeights``: keyed on the weight's and gain's version counters, the dtype and the
    device), so any in-place change of the weight (optimizer step, ``load_state_dict``) invalidates them.
    """

    _normalized_by_parent = False  # set by UNet / Precond, which normalize all their layers at once when compiled

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        kernel = tuple(int(k) for k in kernel)
        if len(kernel) not in (0, 2):
            raise ValueError(f"MPConv: expected kernel=() (linear) or a 2-tuple (conv), got {kernel}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel = kernel
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._weights = ops.MPConvWeights()  # the eval-mode caches and the path choice

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training:
            self._force_normalize()
        return self._weights.run(x, self.weight, gain, self.training)

    def fused(self, x: torch.Tensor, gain=1.0, *, silu_in: bool = False, c=None, res=None, t: float = 0.5,
              clip: float = 0.0) -> torch.Tensor:
        """``ops.mp_conv_fused`` with this layer's weight: ``self(mp_silu(x))`` (``silu_in``), then
        ``mp_silu(y * (1 + c))``, ``mp_sum(res, y, t)`` and ``clip`` where given; one Winograd pass in eval
        mode where the selector (``ops.conv_path``) picks Winograd, the unfused chain otherwise."""
        if self.training:
            self._force_normalize()
        return self._weights.run(x, self.weight, gain, self.training, silu_in, c, res, t, clip)

    def _force_normalize(self) -> None:
        """``W <- N(W)`` (no grad through the write). Compiled, it is done eagerly: by the enclosing UNet /
        Precond for all its layers at once, else here (one graph break per layer)."""
        if not _is_compiling():
            ops.weight_norm_(self.weight)
        elif not self._normalized_by_parent:
            force_normalize_([self.weight])

    # --- the eval-mode weight caches ----------------------------------------------------------------

    def clear_weight_cache(self) -> None:
        self._weights.clear()
        _CLEARS[0] += 1

    def cached_tensors(self) -> list[torch.Tensor]:
        """The tensors the eval-mode caches hold now (what a forward captured into a CUDA graph reads)."""
        return self._weights.tensors()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_weights", None)  # caches are not saved
        return state

    def __setstate__(self, state):
        for old in ("_cache", "_wcache", "_scache"):  # the caches of modules pickled by fastdiff <= 0.x
            state.pop(old, None)
        super().__setstate__(state)
        self._weights = ops.MPConvWeights()


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


def _downsample_box2x_adds(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d(x, 2)`` of an even-sized ``[N, C, H, W]`` map as three adds of its strided quarters, in
    ATen's order (row by row, left to right), then the exact scaling by 1/4: the same bits, and on the CPU
    1.7-5x faster than ATen's pooling kernel (AMD Zen 2, 1 thread: 64 channels on 32x32 187 -> 69 us, 192 on
    64x64 2.25 -> 0.44 ms)."""
    y = x[..., 0::2, 0::2] + x[..., 0::2, 1::2]
    y += x[..., 1::2, 0::2]
    y += x[..., 1::2, 1::2]
    return y.mul_(0.25)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """EDM2 2x resampling with the ``[1, 1]`` filter.

    ``down``: depthwise 2x2 box average with stride 2 (== ``avg_pool2d(x, 2)``). ``up``: depthwise transposed
    conv with the same filter times 4 and stride 2, i.e. every pixel copied to a 2x2 patch (== nearest
    upsampling). Both are computed with the cheap equivalent (on a CPU map without a gradient, strided adds /
    broadcast copies, the same bits as ATen's pooling / interpolation); tests check them against the filter form.
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"resample: expected mode 'keep', 'down' or 'up', got {mode!r}")
    compiling = _is_compiling()
    # The cheap forms' domain: a CPU map without a gradient to take (ATen's kernels elsewhere).
    cpu_eval = (not compiling and x.ndim == 4 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and x.requires_grad))
    if mode == "down":
        if cpu_eval and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
            return _downsample_box2x_adds(x)
        return F.avg_pool2d(x, 2)
    if compiling or (cpu_eval and x.is_contiguous()):
        return _upsample_nearest2x_copy(x)
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
