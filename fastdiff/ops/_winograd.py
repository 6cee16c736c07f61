"""The CPU convolution kernels: the Winograd MP convolution (fake kernels, autograd, the per-shape choice
Winograd vs ATen, the fused block chain ``mp_conv_fused``) and ``conv1x1`` on fastdiff's own GEMM.

The kernels (csrc/cpu/winograd*.cpp) compute a 3x3, stride-1, padding-1 convolution by Winograd's minimal
filtering F(4x4, 3x3) (Lavin & Gray 2016, Eq. 9 in 2-D nesting form: ``Y = A^T [U . V] A`` with
``U = G g G^T``, ``V = B^T d B``), the 36 per-point products on fastdiff's own GEMM micro-kernel; the
weight gradient by the same algorithm on the transposed problem (``dU = sum over tiles of (A g A^T) . V``,
``dW = G^T dU G``, ``winograd_weight_grad``). ``winograd_conv`` fuses
the EDM2 block's elementwise chain around it (EDM2 Alg. 1 / Fig. 21, the residual branch): ``mp_silu`` of
the input, the MP weight factor per output channel, then ``mp_silu(y * (1 + c))`` or ``mp_sum(x, y, t)``
and ``clip``. Only the CPU has these kernels; elsewhere (CUDA keeps cuDNN) the chain runs unfused. In eval
the forward also runs on F(2x2, 3x3) tiles where ``winograd_tile`` picks them (few tiles, large weights).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from fastdiff.ops import _dispatch, _ext, reference
from fastdiff.ops._dispatch import check, check_cond, check_float, check_same, register, uses_kernel
from fastdiff.ops._dispatch import needs_grad as _needs_grad
from fastdiff.ops._weight import mp_weight_vjp

__all__ = ["winograd_weight", "conv1x1", "mp_conv_fused", "conv_epilogue", "conv_path", "use_conv_path", "use_aten_conv",
           "uses_winograd"]

lib = "fastdiff::"
_ENV = os.environ.get("FASTDIFF_CONV", "").strip().lower()
if _ENV not in ("", "auto", "aten", "winograd"):
    raise ValueError(f"FASTDIFF_CONV: expected 'aten', 'winograd' or 'auto', got {_ENV!r}")
_FORCE = [_ENV if _ENV in ("aten", "winograd") else None]  # a plain list so torch.compile can read it
_LANES = 8  # channel padding of the transformed weight (winograd_kernels.h kLanes)
_TILES_ENV = os.environ.get("FASTDIFF_WINOGRAD_TILES", "").strip().lower()
if _TILES_ENV not in ("", "auto", "4"):
    raise ValueError(f"FASTDIFF_WINOGRAD_TILES: expected 'auto' or '4' (F(4x4) tiles only), got {_TILES_ENV!r}")


def _round_up(c: int) -> int:
    return (c + _LANES - 1) // _LANES * _LANES


def _cl_like(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def winograd_weight_grad_pays(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Winograd weight gradient beats ATen's for this input: it accumulates a transform-domain
    gradient of ``36 cin cout`` floats (4x the weight), which needs enough tiles to amortize (the measured
    crossovers: BENCHMARKS.md, "Winograd selector crossovers")."""
    tiles = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
    return tiles >= 32 and tiles * 8 >= max(w.shape[0], w.shape[1])


def winograd_weight(w: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """The F(tile x tile, 3x3) weight transform ``G g G^T`` of a 3x3 weight (no gradient): F(4x4),
    ``[36, strips, in_p, 32]``, or for ``tile`` 2 / 6 F(2x2) / F(6x6) with 16 / 64 points."""
    op = "winograd_weight" if tile == 4 else "winograd_weight_tile"
    if uses_kernel(op, w) and w.dtype in (torch.float32, torch.float64):
        return torch.ops.fastdiff.winograd_weight(w.detach()) if tile == 4 else \
            torch.ops.fastdiff.winograd_weight_tile(w.detach(), tile)
    return reference.winograd_weight(w.detach(), tile)


def _check_f32_f64(op: str, **tensors) -> None:
    for name, t in tensors.items():
        check_float(op, **{name: t})
        check(t.dtype in (torch.float32, torch.float64), op, f"expected '{name}' in float32 or float64, got {t.dtype}")


def _check_w3x3(op: str, w) -> None:
    check(w.ndim == 4 and w.shape[2] == 3 and w.shape[3] == 3 and w.shape[0] > 0 and w.shape[1] > 0, op,
          f"expected a non-empty 3x3 weight [out, in, 3, 3], got shape {tuple(w.shape)}")


@register("winograd_weight", "winograd_weight_tile", "winograd_conv", "winograd_weight_grad", "conv1x1",
          "mp_conv_winograd")
def _register() -> None:
    reg = torch.library.register_fake

    @reg(lib + "winograd_weight")
    def _(w):
        _check_f32_f64("winograd_weight", w=w)
        _check_w3x3("winograd_weight", w)
        return w.new_empty((36, -(-_round_up(w.shape[0]) // 32), _round_up(w.shape[1]), 32))

    @reg(lib + "winograd_weight_tile")
    def _(w, tile):
        _check_f32_f64("winograd_weight_tile", w=w)
        check(tile in (2, 6), "winograd_weight_tile", f"expected tile 2 or 6 (F(2x2, 3x3) or F(6x6, 3x3)), got {tile}")
        _check_w3x3("winograd_weight_tile", w)
        return w.new_empty(((tile + 2) ** 2, -(-_round_up(w.shape[0]) // 32), _round_up(w.shape[1]), 32))

    @reg(lib + "winograd_conv")
    def _(x, u, scale, silu_in=False, mod=None, res=None, t=0.5, clip=0.0):
        op = "winograd_conv"
        _check_f32_f64(op, x=x, u=u)
        check(x.ndim == 4, op, f"expected x of shape [N, C, H, W], got {tuple(x.shape)}")
        check_same(op, "x", x, "u", u, same_shape=False)
        check(scale.ndim == 1 and scale.shape[0] > 0, op, f"expected scale of shape [out_channels], got {tuple(scale.shape)}")
        cinp, coutp = _round_up(x.shape[1]), _round_up(scale.shape[0])
        check(u.ndim == 4 and u.shape[0] in (16, 36, 64) and tuple(u.shape[1:]) == (-(-coutp // 32), cinp, 32), op,
              f"expected u = winograd_weight(w) of shape {(36, -(-coutp // 32), cinp, 32)} (or winograd_weight_tile's "
              f"16 / 64 points) for {x.shape[1]} input and {scale.shape[0]} output channels, got {tuple(u.shape)}")
        y = _cl_like(x, x.new_empty((x.shape[0], scale.shape[0], x.shape[2], x.shape[3])))
        if mod is not None:
            check_cond(op, y, mod)
        if res is not None:
            check_same(op, "res", res, "the output", y)
        return y

    @reg(lib + "winograd_weight_grad")
    def _(x, g):
        op = "winograd_weight_grad"
        _check_f32_f64(op, x=x, grad=g)
        check_same(op, "x", x, "grad", g, same_shape=False)
        check(x.ndim == 4 and g.ndim == 4 and g.shape[0] == x.shape[0] and g.shape[2:] == x.shape[2:] and g.shape[1] > 0
              and x.shape[1] > 0, op, f"expected x [N, C_in, H, W] and grad [N, C_out, H, W] (C_in, C_out > 0), got "
              f"{tuple(x.shape)} and {tuple(g.shape)}")
        return x.new_empty((g.shape[1], x.shape[1], 3, 3))

    @reg(lib + "conv1x1")
    def _(x, w):
        op = "conv1x1"
        check_float(op, x=x)
        check_same(op, "x", x, "w", w, same_shape=False)
        check(x.ndim == 4, op, f"expected x of shape [N, C, H, W], got {tuple(x.shape)}")
        check((w.ndim == 2 or (w.ndim == 4 and w.shape[2] == 1 and w.shape[3] == 1)) and w.shape[1] == x.shape[1], op,
              f"expected w of shape [out, {x.shape[1]}] or [out, {x.shape[1]}, 1, 1], got {tuple(w.shape)}")
        return _cl_like(x, x.new_empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3])))

    @reg(lib + "mp_conv_winograd")
    def _(x, w, gain, eps):
        op = "mp_conv_winograd"
        _check_f32_f64(op, x=x)
        check_float(op, w=w, gain=gain)
        check(gain.numel() == 1, op, f"expected a scalar gain, got shape {tuple(gain.shape)}")
        check(w.ndim == 4 and w.shape[2] == 3 and w.shape[3] == 3 and x.ndim == 4 and x.shape[1] == w.shape[1], op,
              f"expected a 3x3 weight [out, C, 3, 3] and x [N, C, H, W], got {tuple(w.shape)} and {tuple(x.shape)}")
        return _cl_like(x, x.new_empty((x.shape[0], w.shape[0], x.shape[2], x.shape[3])))

    def backward(ctx, g):
        x, w, gain = ctx.saved_tensors
        ops = torch.ops.fastdiff
        dx = dw = dgain = None
        g = g.to(x.dtype)
        if ctx.needs_input_grad[0]:
            # The input gradient is the convolution of g with the rotated, transposed weight (again 3x3,
            # padding 1), so it runs on the Winograd path too; the MP factor is folded into that weight.
            w_hat = ops.mp_weight(w, gain, ctx.eps, x.dtype)
            u = ops.winograd_weight(w_hat.flip(2, 3).transpose(0, 1))
            ones = torch.ones(w.shape[1], dtype=x.dtype, device=x.device)
            dx = ops.winograd_conv(g, u, ones)
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and not winograd_weight_grad_pays(x, w):
            mask = [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            _, dw, dgain = ops.mp_conv_backward(g, x, w, gain, ctx.eps, mask)
        elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # The gradient w.r.t. the effective weight W_hat, on the Winograd path too (dU = sum over tiles of
            # (A g A^T) . (B^T d B), dW_hat = G^T dU G), then through W_hat = gain N(W) / sqrt(fan_in).
            dw, dgain = mp_weight_vjp(ops.winograd_weight_grad(x, g), w, gain, ctx.eps, *ctx.needs_input_grad[1:3])
        return dx, dw, dgain, None

    torch.library.register_autograd(lib + "mp_conv_winograd", backward, setup_context=_dispatch.save_conv_inputs)



# --- which path a convolution takes ---------------------------------------------------------------


@contextlib.contextmanager
def use_conv_path(path: str = "auto"):
    """Within this block 3x3 MP convolutions take ``path``: ``"aten"`` (ATen's convolution, oneDNN / cuDNN,
    as with ``FASTDIFF_CONV=aten``), ``"winograd"`` (wherever a Winograd kernel exists: CPU, float32 or
    float64, 3x3; for tests and measurements) or ``"auto"`` (the per-shape choice of ``conv_path``)."""
    if path not in ("auto", "aten", "winograd"):
        raise ValueError(f"use_conv_path: expected 'auto', 'aten' or 'winograd', got {path!r}")
    old = _FORCE[0]
    _FORCE[0] = None if path == "auto" else path
    try:
        yield
    finally:
        _FORCE[0] = old


def use_aten_conv(enabled: bool = True):
    """Within this block every 3x3 MP convolution runs on ATen's convolution, as with ``FASTDIFF_CONV=aten``
    (the elementwise ops stay fused)."""
    return use_conv_path("aten" if enabled else "auto")


def conv_path(cin: int, cout: int, height: int, width: int, batch: int = 1, dtype=torch.float32,
              device="cpu", kernel=(3, 3), threads: int | None = None) -> tuple[str, str]:
    """``("winograd" | "aten", reason)`` for an MP convolution of this shape.

    The rule is a small cost model checked against measurements (BENCHMARKS.md, "Own GEMM micro-kernel",
    benchmarks/bench_conv.py). The transform-domain GEMMs do 4x fewer multiplies than a direct convolution,
    on fastdiff's own micro-kernel at near the FMA peak, but pay the input and output transforms (per 8
    input channels, so an input of fewer than 8 channels is mostly padding, and with 8-15 channels they
    need 16 tiles to amortize) and stream a transformed weight of ``36 cin cout`` floats (4x the 3x3
    weight) once per chunk of tiles, which at batch 1 is most of the time but still less than ATen's
    direct convolution takes. ``threads`` is accepted for the table in ``fastdiff info``; the measured
    crossovers did not move between 1 and 2 threads.
    """
    if _FORCE[0] == "aten":
        return "aten", "forced (FASTDIFF_CONV=aten / use_aten_conv)"
    if torch.device(device).type != "cpu" or not _ext.has_kernel("winograd_conv", "cpu"):
        return "aten", "no Winograd kernel on this device (CUDA keeps cuDNN)"
    if tuple(kernel) != (3, 3):
        return "aten", f"{kernel[0]}x{kernel[1]} kernel"
    if _FORCE[0] == "winograd" and dtype in (torch.float32, torch.float64):
        return "winograd", "forced (FASTDIFF_CONV=winograd / use_conv_path)"
    if dtype not in (torch.float32,):
        return "aten", f"{str(dtype).replace('torch.', '')} (Winograd is float32 only in the networks; float64 is slower)"
    tiles = batch * -(-height // 4) * -(-width // 4)
    if min(height, width) < 8:
        return "aten", f"{height}x{width} map < 8x8"
    # The channel and tile thresholds: BENCHMARKS.md, "Winograd selector crossovers".
    if cin < 8:
        return "aten", f"{cin} input channels < 8 (the transforms run on 8 padded channels)"
    if cin < 16 and tiles < 16:
        return "aten", f"{cin} input channels < 16 and {tiles} tiles < 16"
    # Few tiles need no rule of their own: the transformed weight is streamed in contiguous panels.
    tile = _tile(cin, cout, height, width, batch, dtype, _TILES_ENV)
    if tile != 4:
        return "winograd", f"{tiles} tiles of 4x4; F({tile}x{tile}) tiles in eval (winograd_tile)"
    return "winograd", f"{tiles} tiles of 4x4"


def uses_winograd(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``conv_path`` picks Winograd for input ``x`` and weight ``w`` (memoized per shape: the
    networks ask once per convolution per forward)."""
    if w.ndim != 4 or x.ndim != 4:
        return False
    return _picks_winograd(w.shape[1], w.shape[0], x.shape[2], x.shape[3], x.shape[0], x.dtype, x.device.type,
                           w.shape[2], w.shape[3], _FORCE[0])


@functools.lru_cache(maxsize=4096)
def _picks_winograd(cin, cout, h, w, n, dtype, device, kh, kw, force) -> bool:
    return conv_path(cin, cout, h, w, n, dtype, device, (kh, kw))[0] == "winograd"


def conv1x1(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w_hat)`` for a 1x1 effective weight without a gradient: fastdiff's own GEMM micro-kernel
    (torch.ops.fastdiff.conv1x1) on the CPU in float32, where it measured faster than ATen's 1x1 convolution
    (BENCHMARKS.md, "Winograd selector crossovers"), ATen elsewhere."""
    if conv1x1_takes_kernel(x, w_hat):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastdiff.conv1x1(x, w_hat)
    return reference.conv1x1(x, w_hat)


def conv1x1_takes_kernel(x: torch.Tensor, w_hat: torch.Tensor) -> bool:
    """Whether ``conv1x1(x, w_hat)`` runs fastdiff's kernel (else ATen)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w_hat.dtype == torch.float32 and x.ndim == 4
            and x.shape[2] * x.shape[3] % 8 == 0 and min(w_hat.shape[0], w_hat.shape[1]) >= 8 and x.is_contiguous()
            and _FORCE[0] != "aten" and _ext.has_kernel("conv1x1", "cpu") and not _needs_grad(x, w_hat))


def mp_conv_fused(x: torch.Tensor, w: torch.Tensor, gain=1.0, *, silu_in: bool = False, c=None, res=None,
                  t: float = 0.5, clip: float = 0.0, eps: float = reference.EPS, cache=None) -> torch.Tensor:
    """The EDM2 block's chain around a 3x3 MP convolution, fused on the Winograd path::

        y = mp_conv(mp_silu(x) if silu_in else x, w, gain)
        y = mp_silu(y * (1 + c))   if c is given ([N, out])
        y = mp_sum(res, y, t)      if res is given (shaped like y)
        y = clip(y, clip)          if clip > 0

    Without a gradient the whole chain is one ``winograd_conv`` call (``cache``: the ``(u, row_scale)`` pair
    of ``winograd_weight(w, tile)`` and ``weight_norm_scale(w)``: the tile of ``u`` runs; without it, the
    tile ``winograd_tile`` picks; ``MPConvWeights.run`` caches both for a layer); with a
    gradient the convolution is the differentiable ``mp_conv_winograd`` and the rest the fused elementwise
    ops. Shapes the selector gives to ATen (``conv_path``) run the same chain on ``ops.mp_conv``."""
    from fastdiff import ops

    if not (ops.uses_kernel("winograd_conv", x, w) and uses_winograd(x, w)):
        return _chain(ops, x, w, gain, silu_in, c, res, t, clip)
    if not _needs_grad(x, w, gain, c, res):
        with torch._C._AutoDispatchBelowAutograd():
            if cache is None:
                tile = winograd_tile(x.shape[1], w.shape[0], x.shape[2], x.shape[3], x.shape[0], x.dtype)
                cache = (winograd_weight(w.to(x.dtype), tile), torch.ops.fastdiff.weight_norm_scale(w, eps))
            u, row = cache
            return winograd_eval(x, u, winograd_scale(row, gain, w), silu_in, c, res, t, clip)
    y = torch.ops.fastdiff.mp_conv_winograd(ops.mp_silu(x) if silu_in else x, w, _dispatch.gain_tensor(gain, w), eps)
    return conv_epilogue(ops, y, c, res, t, clip)


def winograd_scale(row: torch.Tensor, gain, w: torch.Tensor) -> torch.Tensor:
    """The per-output-channel factor ``gain * row / sqrt(fan_in)`` of the fused output transform, flat."""
    k = 1.0 / math.sqrt(w[0].numel())
    return (row * (gain.to(row) * k if isinstance(gain, torch.Tensor) else float(gain) * k)).reshape(-1)


def winograd_eval(x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, silu_in: bool = False, c=None, res=None,
                  t: float = 0.5, clip: float = 0.0) -> torch.Tensor:
    """The fused chain in one ``winograd_conv`` call, below autograd (the caller has checked that no gradient
    is needed and that the Winograd kernel applies). ``u``: ``winograd_weight(w, tile)`` for the tile
    ``winograd_tile`` picks for this shape (the kernel tiles the output by ``u``'s point count)."""
    with torch._C._AutoDispatchBelowAutograd():
        if c is not None and c.dtype != x.dtype:
            c = c.to(x.dtype)
        if res is not None and res.dtype != x.dtype:
            res = res.to(x.dtype)
        return torch.ops.fastdiff.winograd_conv(x, u, scale, silu_in, c, res, float(t), float(clip))


def winograd_tile(cin: int, cout: int, height: int, width: int, batch: int = 1, dtype=torch.float32) -> int:
    """The output tile side of the eval-mode Winograd convolution: 4 (F(4x4, 3x3), the default); 2
    (F(2x2, 3x3), 16 points instead of 36) where few 4x4 tiles meet many channels (batch 1-2 of an 8x8
    map with 256 or more, batch 1 with 128 or more): there the products read the whole transformed weight
    from memory for a few rows each, and F(2x2)'s is 16 / 36 the size; or 6 (F(6x6, 3x3), 64 points per
    36 outputs against F(4x4)'s 36 per 16, Lavin & Gray 2016) where its tiles cover the map with at least
    10% fewer products than F(4x4)'s (a 64x64 map: 11 x 11 tiles of 64 points against 16 x 16 of 36, 16%
    fewer; 32x32 and 16x16 maps come out even) and the channels are many enough (``cin * cout >= 256 *
    256``) for the products, not its larger transforms, to dominate. Measured crossovers: BENCHMARKS.md,
    "Winograd tile sizes" and "Cold weights, F(6x6) and the layer plan". ``FASTDIFF_WINOGRAD_TILES=4``
    keeps F(4x4) everywhere. The training path is F(4x4) throughout."""
    return _tile(cin, cout, height, width, batch, dtype, _TILES_ENV)


@functools.lru_cache(maxsize=4096)
def _tile(cin, cout, h, w, n, dtype, env) -> int:
    if env == "4" or dtype != torch.float32 or not _ext.has_kernel("winograd_weight_tile", "cpu"):
        return 4
    tiles4 = n * -(-h // 4) * -(-w // 4)
    if (tiles4 <= 8 and min(cin, cout) >= 256) or (tiles4 <= 4 and min(cin, cout) >= 128):
        return 2
    points6 = n * -(-h // 6) * -(-w // 6) * 64
    if cin * cout >= 256 * 256 and 10 * points6 <= 9 * tiles4 * 36:
        return 6
    return 4


def _chain(ops, x, w, gain, silu_in, c, res, t, clip):
    y = ops.mp_conv(ops.mp_silu(x) if silu_in else x, w, gain)
    return conv_epilogue(ops, y, c, res, t, clip)


def conv_epilogue(ops, y, c=None, res=None, t: float = 0.5, clip: float = 0.0):
    """The block chain after a convolution with the op set ``ops`` (fastdiff.ops, or its reference under
    torch.compile): ``mp_silu(y * (1 + c))``, ``mp_sum(res, y, t)``, ``clip``, each where given."""
    if ops is not reference and _dispatch.gpu_route(y):  # GPU: c cast inside the kernel, sum + clip in one pass
        y = ops.mp_silu_modulate(y, c) if c is not None else y
        return ops.mp_sum_clip(res, y, t, clip) if res is not None else (ops.clip(y, clip) if clip else y)
    if c is not None:
        y = ops.mp_silu_modulate(y, c.to(y.dtype))
    if res is not None:
        y = ops.mp_sum(res, y, t=t)
    if clip:
        y = ops.clip(y, clip)
    return y
