"""The F(2x2, 3x3) and F(6x6, 3x3) Winograd tiles (csrc/cpu/winograd_tiles_kernels.inc): the weight transform, the
fused convolution with every epilogue against the direct convolution, the GEMM edges on every ISA, the
thread split, non-finite inputs, the per-tile transforms of ``ops.MPConvWeights`` and the
tile choice of ``winograd_tile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops import _winograd as W
from fastdiff.ops import reference as R

from conftest import max_rel_err as rel, on_threads, rnd
from test_winograd import EPILOGUES, _epilogue_args

pytestmark = pytest.mark.usefixtures("one_thread")
HAS = ops.HAS_EXTENSION and ops._ext.has_kernel("winograd_weight_tile", "cpu")
requires_tiles = pytest.mark.skipif(not HAS, reason="Winograd tile kernels not built")


def direct(x, wt, scale, silu_in=False, c=None, res=None, t=0.5, clip=0.0):
    """The fused chain on ATen's direct convolution in float64 (the oracle)."""
    x, wt, scale = x.double(), wt.double(), scale.double()
    y = F.conv2d(R.mp_silu(x) if silu_in else x, wt, padding=1) * scale.reshape(-1, 1, 1)
    if c is not None:
        y = R.mp_silu_modulate(y, c.double())
    if res is not None:
        y = R.mp_sum(res.double(), y, t)
    if clip:
        y = y.clamp(-clip, clip)
    return y


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("cin,cout", [(1, 1), (5, 13), (33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_transform_matches_reference(tile, cin, cout, dtype):
    w = rnd(cout, cin, 3, 3, dtype=dtype)
    got = torch.ops.fastdiff.winograd_weight_tile(w, tile)
    p, cinp, coutp = (tile + 2) ** 2, -(-cin // 8) * 8, -(-cout // 8) * 8
    assert got.shape == (p, -(-coutp // 32), cinp, 32) and got.dtype == dtype
    rows = got.permute(0, 2, 1, 3).reshape(p, cinp, -1)  # [points, in_p, out (whole panels)]
    assert torch.all(rows[:, cin:] == 0) and torch.all(rows[:, :, cout:] == 0)
    want = R.winograd_weight(w.double(), tile)
    assert want.shape == got.shape
    assert rel(got, want) < (1e-15 if dtype == torch.float64 else 1e-6)
    assert torch.equal(W.winograd_weight(w, tile), got)
    with ops.use_reference():  # without the kernel: the reference, in w's dtype
        assert torch.equal(W.winograd_weight(w, tile), want.to(dtype))


SHAPES = [(1, 3, 5, 1, 1), (2, 5, 7, 5, 7), (1, 9, 16, 8, 8), (3, 17, 11, 13, 6), (1, 8, 40, 14, 15)]


def _args(kind, n, cout, h, w, dtype):
    """winograd_conv's epilogue arguments (silu_in, c, res, t, clip) for test_winograd's EPILOGUES[kind]."""
    kw = _epilogue_args(kind, n, cout, h, w, dtype)
    return (kw.get("silu_in", False), kw.get("c"), kw.get("res"), kw.get("t", 0.5), kw.get("clip", 0.0))


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(EPILOGUES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_conv_float64_matches_direct_conv(tile, shape, kind, layout):
    n, cin, cout, h, w = shape
    x = rnd(n, cin, h, 2 * w, seed=1)[..., ::2] if layout == "strided" else rnd(n, cin, h, w, seed=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt, scale = rnd(cout, cin, 3, 3, seed=2), rnd(cout, seed=5).abs() + 0.5
    args = _args(kind, n, cout, h, w, torch.float64)
    got = torch.ops.fastdiff.winograd_conv(x, torch.ops.fastdiff.winograd_weight_tile(wt, tile), scale, *args)
    assert rel(got, direct(x, wt, scale, *args)) < 1e-12
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("kind", list(EPILOGUES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_float32_error_at_edm2_shape(tile, kind, layout):
    """float32 at a real block shape, against float64: F(2x2) rounds less than F(4x4), F(6x6) (transform
    entries up to 32 and 21/4) about 3x more, still far inside the network budget of 1e-4."""
    n, c, h = 2, 128, 16
    x, wt = rnd(n, c, h, h, dtype=torch.float32, seed=1), rnd(c, c, 3, 3, dtype=torch.float32, seed=2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale = (rnd(c, seed=5).abs() * 0.05).float()
    args = _args(kind, n, c, h, h, torch.float32)
    got = torch.ops.fastdiff.winograd_conv(x, torch.ops.fastdiff.winograd_weight_tile(wt, tile), scale, *args)
    want = direct(x, wt, scale, *args)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < (2e-6 if tile == 2 else 1e-5), err


# Shapes that reach the GEMM micro-kernel's edges (row remainders, 8 / 16 / 24-column remainders, more
# than one K block) with the 16 / 64-point products.
GEMM_SHAPES = [(1, 8, 8, 4, 4), (1, 40, 24, 9, 7), (1, 16, 56, 13, 20), (1, 264, 40, 8, 8), (2, 520, 16, 4, 9)]


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_conv_float32_gemm_edges_every_isa(tile, shape, isa):
    if isa == "avx512" and ops._ext.isa()["elementwise"] != "avx512":
        pytest.skip("this CPU has no AVX-512")
    if isa == "avx2" and ops._ext.isa()["elementwise"] == "baseline":
        pytest.skip("this CPU has no AVX2")
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 3, 3, dtype=torch.float32, seed=2)
    scale, res = (rnd(cout, seed=5).abs() + 0.5).float(), rnd(n, cout, h, w, dtype=torch.float32, seed=4)
    u = torch.ops.fastdiff.winograd_weight_tile(wt, tile)
    with ops._ext.force_isa(isa):
        got = torch.ops.fastdiff.winograd_conv(x, u, scale, False, None, res, 0.4, 0.0)
    want = direct(x, wt, scale, res=res, t=0.4)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < (2e-6 if tile == 2 else 8e-6) * max(1.0, (cin / 64) ** 0.5), err


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("shape", [(1, 64, 64, 8, 8), (1, 40, 72, 16, 16), (3, 16, 96, 8, 7), (2, 24, 24, 30, 31)])
def test_threads_agree(tile, shape):
    """2 threads (the few-tile split by output columns, or chunks per thread) equal 1 thread up to
    summation order."""
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 3, 3, dtype=torch.float32, seed=2)
    u, scale = torch.ops.fastdiff.winograd_weight_tile(wt, tile), torch.ones(cout)
    res, c = rnd(n, cout, h, w, dtype=torch.float32), rnd(n, cout, dtype=torch.float32, seed=3)
    one = torch.ops.fastdiff.winograd_conv(x, u, scale, True, c, res, 0.3, 0.9)
    two = on_threads(2, torch.ops.fastdiff.winograd_conv, x, u, scale, True, c, res, 0.3, 0.9)
    assert rel(two, one) < 1e-6


@requires_tiles
@pytest.mark.parametrize("tile", [2, 6])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_poisons_only_its_tiles(tile, bad):
    x, wt = rnd(1, 8, 8, 8, dtype=torch.float32), rnd(8, 8, 3, 3, dtype=torch.float32)
    x[0, 3, 1, 1] = bad
    y = torch.ops.fastdiff.winograd_conv(x, torch.ops.fastdiff.winograd_weight_tile(wt, tile), torch.ones(8))
    # Every output whose 3x3 neighbourhood holds input pixel (1, 1) is non-finite (as in a direct
    # convolution); beyond that only outputs of the tiles whose (tile + 2)^2 input patch holds it, those
    # covering rows and columns [0, 4) (F(2x2): two tiles each way) or [0, 6) (F(6x6): one tile).
    k = 4 if tile == 2 else 6
    assert not torch.isfinite(y[0, :, :3, :3]).any()
    assert torch.isfinite(y[0, :, k:]).all() and torch.isfinite(y[0, :, :, k:]).all()
    e = torch.ops.fastdiff.winograd_conv(x[:0], torch.ops.fastdiff.winograd_weight_tile(wt, tile), torch.ones(8))
    assert e.shape == (0, 8, 8, 8)


@requires_tiles
def test_bad_input_errors_name_what_was_expected():
    wt = rnd(8, 4, 3, 3, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="expected tile 2 or 6"):
        torch.ops.fastdiff.winograd_weight_tile(wt, 4)
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(RuntimeError, match="float32 or float64"):
            torch.ops.fastdiff.winograd_weight_tile(wt.to(dt), 2)
        with pytest.raises(RuntimeError, match="float32 or float64"):
            torch.ops.fastdiff.winograd_conv(rnd(1, 4, 4, 4, dtype=dt), torch.ops.fastdiff.winograd_weight_tile(
                wt, 2).to(dt), torch.ones(8))
    with pytest.raises(RuntimeError, match="3x3 weight"):
        torch.ops.fastdiff.winograd_weight_tile(rnd(8, 4, 1, 1, dtype=torch.float32), 2)
    u = torch.ops.fastdiff.winograd_weight_tile(wt, 6)
    with pytest.raises(RuntimeError, match="expected u of shape"):  # 25 points: no such tile
        torch.ops.fastdiff.winograd_conv(rnd(1, 4, 4, 4, dtype=torch.float32), u[:25], torch.ones(8))
    with pytest.raises(RuntimeError, match="expected u of shape"):  # wrong channels
        torch.ops.fastdiff.winograd_conv(rnd(1, 12, 4, 4, dtype=torch.float32), u, torch.ones(8))


@requires_tiles
def test_fake_kernel_matches_real_output():
    wt = rnd(11, 9, 3, 3, dtype=torch.float32)
    for tile in (2, 6):
        torch.library.opcheck(torch.ops.fastdiff.winograd_weight_tile.default, (wt, tile),
                              test_utils=("test_schema", "test_faketensor"))
        x = rnd(2, 9, 7, 6, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        u = torch.ops.fastdiff.winograd_weight_tile(wt, tile)
        torch.library.opcheck(torch.ops.fastdiff.winograd_conv.default, (x, u, torch.ones(11)),
                              test_utils=("test_schema", "test_faketensor"))


@requires_tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_cache_keeps_each_tiles_transform(dtype):
    """MPConvWeights makes each tile's transform from the weight once, beside the F(4x4) one, with one row
    scale for all, and makes them again after an in-place change of the weight."""
    wt = rnd(37, 19, 3, 3, dtype=dtype, seed=7)
    cache = ops.MPConvWeights()
    u4, row = cache.winograd_weight(wt)
    assert torch.equal(u4, torch.ops.fastdiff.winograd_weight(wt))
    for tile in (2, 6):
        got, row_t = cache.winograd_weight(wt, tile=tile)
        assert torch.equal(got, torch.ops.fastdiff.winograd_weight_tile(wt, tile)) and row_t is row
        assert cache.winograd_weight(wt, tile=tile)[0] is got  # memoized
    assert cache.winograd_weight(wt)[0] is u4
    assert len(cache.tensors()) == 4  # the row scale and three transforms
    with torch.no_grad():
        wt.mul_(2)  # a new version: recomputed, not the stale transform
    assert torch.equal(cache.winograd_weight(wt, tile=2)[0], torch.ops.fastdiff.winograd_weight_tile(wt, 2))


@requires_tiles
def test_tile_choice():
    assert W.winograd_tile(768, 768, 8, 8, 1) == 2  # 4 tiles of 4x4, a 21 MiB weight: F(2x2)
    assert W.winograd_tile(512, 256, 8, 8, 2) == 2
    assert W.winograd_tile(128, 128, 8, 8, 1) == 2  # batch 1: 4 tiles, the products wait on the weight
    assert W.winograd_tile(128, 128, 8, 8, 2) == 4  # 8 tiles and a 2.4 MiB weight: F(4x4)
    assert W.winograd_tile(64, 64, 8, 8, 1) == 4  # small weight: F(4x4)
    assert W.winograd_tile(768, 768, 8, 8, 8) == 4  # 32 tiles: compute-bound, F(4x4)
    assert W.winograd_tile(768, 768, 16, 16, 1) == 4
    assert W.winograd_tile(768, 768, 8, 8, 1, torch.float64) == 4
    assert W._tile(768, 768, 8, 8, 1, torch.float32, "4") == 4  # FASTDIFF_WINOGRAD_TILES=4
    # F(6x6): 16% fewer products on a 64x64 map (11 x 11 tiles of 64 points against 16 x 16 of 36), at any batch
    assert W.winograd_tile(384, 192, 64, 64, 1) == 6
    assert W.winograd_tile(256, 256, 64, 64, 8) == 6
    assert W.winograd_tile(384, 384, 128, 128, 1) == 6
    assert W.winograd_tile(192, 192, 64, 64, 1) == 4  # few channels: its larger transforms dominate
    assert W.winograd_tile(256, 128, 64, 64, 1) == 4
    assert W.winograd_tile(384, 384, 32, 32, 1) == 4  # 32x32: as many products as F(4x4)
    assert W.winograd_tile(768, 768, 16, 16, 4) == 4
    assert W.winograd_tile(384, 192, 64, 64, 1, torch.float64) == 4
    assert W._tile(384, 192, 64, 64, 1, torch.float32, "4") == 4
    # the selector's reason (fastdiff info's table) names the eval tile
    assert W.conv_path(384, 192, 64, 64, 1)[1].endswith("F(6x6) tiles in eval (winograd_tile)")
    assert W.conv_path(768, 768, 8, 8, 1)[1].endswith("F(2x2) tiles in eval (winograd_tile)")
    assert W.conv_path(128, 128, 32, 32, 1)[1] == "64 tiles of 4x4"


@requires_tiles
@pytest.mark.parametrize("kind", list(EPILOGUES))
@pytest.mark.parametrize("tile,h,tol", [(2, 8, 2e-6), (6, 40, 1e-5)])
def test_eval_path_uses_the_chosen_tile(kind, tile, h, tol, monkeypatch):
    """The layers' eval path (MPConvWeights.run) runs F(2x2) / F(6x6) where winograd_tile picks it (an 8x8
    map at batch 1; a 40x40 map, 7 x 7 tiles of 64 points against 10 x 10 of 36), with that transform made
    and kept by the layer's cache, and agrees with the direct convolution and the F(4x4) result."""
    n, c = 1, 256
    x, wt = rnd(n, c, h, h, dtype=torch.float32, seed=1), rnd(c, c, 3, 3, dtype=torch.float32, seed=2, scale=0.02)
    args = _args(kind, n, c, h, h, torch.float32)
    assert W.winograd_tile(c, c, h, h, n) == tile
    cache = ops.MPConvWeights()
    with torch.no_grad():
        layer = cache.run(x, wt, 1.0, False, *args)
    assert [u.shape[0] for u in cache.tensors() if u.ndim == 4] == [(tile + 2) ** 2]  # made and kept
    ut, row = cache.winograd_weight(wt, tile=tile)
    assert torch.equal(layer, W.winograd_eval(x, ut, W.winograd_scale(row, 1.0, wt), *args))
    scale = torch.ones(c)
    got = W.winograd_eval(x, ut, scale, *args)
    monkeypatch.setattr(W, "_TILES_ENV", "4")
    f4 = W.winograd_eval(x, torch.ops.fastdiff.winograd_weight(wt), scale, *args)
    want = direct(x, wt, scale, *args)
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert ((got.double() - f4.double()).norm() / f4.double().norm()).item() < 2 * tol


@requires_tiles
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_weight_takes_the_streaming_kernels(tile, threads):
    """A transformed weight over 12 MiB (here 512 -> 520 channels: 38 MiB at F(4x4)), streamed by the
    prefetching GEMM table (gemm_prefetch_avx2.cpp) where AVX2 is the level (its 6 tiles on the few-tile
    route: products split by output columns at 2 threads); the result is the same convolution."""
    n, cin, cout, h, w = 1, 512, 520, 9, 7
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 3, 3, dtype=torch.float32, seed=2)
    scale, res = (rnd(cout, seed=5).abs() + 0.5).float(), rnd(n, cout, h, w, dtype=torch.float32, seed=4)
    u = torch.ops.fastdiff.winograd_weight(wt) if tile == 4 else torch.ops.fastdiff.winograd_weight_tile(wt, tile)
    assert u.numel() * 4 > 12 << 20
    got = on_threads(threads, torch.ops.fastdiff.winograd_conv, x, u, scale, True, None, res, 0.4, 0.0)
    want = direct(x, wt, scale, silu_in=True, res=res, t=0.4)
    assert ((got.double() - want).norm() / want.norm()).item() < 2e-6 * (cin / 64) ** 0.5
