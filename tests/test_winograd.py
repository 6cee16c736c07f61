"""The Winograd MP convolution (fastdiff.ops.mp_conv_fused, torch.ops.fastdiff.winograd_*): kernels vs the
plain-PyTorch references, gradients, the per-shape choice, and whole networks vs the plain EDM2 network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.ops import reference as R

from conftest import max_rel_err as rel, on_threads, rnd

pytestmark = pytest.mark.usefixtures("one_thread")
HAS = ops.HAS_EXTENSION and ops._ext.has_kernel("winograd_conv", "cpu")
requires_wg = pytest.mark.skipif(not HAS, reason="Winograd kernels not built")


def chain64(x, w, gain=1.0, silu_in=False, c=None, res=None, t=0.5, clip=0.0):
    """The unfused chain in float64 on ATen's convolution (the oracle)."""
    d = lambda v: None if v is None else v.double()  # noqa: E731
    return R.mp_conv_fused(x.double(), w.double(), gain, silu_in=silu_in, c=d(c), res=d(res), t=t, clip=clip)


@requires_wg
@pytest.mark.parametrize("cin,cout", [(1, 1), (5, 13), (16, 9), (33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_transform_matches_reference(cin, cout, dtype):
    w = rnd(cout, cin, 3, 3, dtype=dtype)
    got = torch.ops.fastdiff.winograd_weight(w)
    want = R.winograd_weight(w)
    coutp = -(-cout // 8) * 8
    assert got.shape == (36, -(-coutp // 32), -(-cin // 8) * 8, 32) and got.dtype == dtype
    assert rel(got, want) < (1e-15 if dtype == torch.float64 else 1e-6)
    assert torch.all(got.permute(0, 2, 1, 3).reshape(36, got.shape[2], -1)[:, :, cout:] == 0)  # padded panels
    rows = R.winograd_weight_rows(got, cout)
    assert rows.shape == (36, got.shape[2], coutp) and torch.all(rows[:, cin:] == 0)
    g = torch.tensor(R.WINOGRAD_G, dtype=torch.float64)
    u = torch.einsum("ia,ocab,jb->ijco", g, w.double(), g).reshape(36, cin, cout)
    assert rel(rows[:, :cin, :cout], u) < (1e-15 if dtype == torch.float64 else 1e-6)


SHAPES = [(1, 3, 5, 1, 1), (2, 5, 7, 5, 7), (1, 9, 16, 8, 8), (3, 17, 11, 13, 6)]  # n, cin, cout, h, w
EPILOGUES = {
    "plain": dict(),
    "silu_mod": dict(silu_in=True, c=True),
    "sum_clip": dict(res=True, t=0.3, clip=1.5),
    "all": dict(silu_in=True, c=True, res=True, t=0.7, clip=0.8),
}


def _epilogue_args(kind, n, cout, h, w, dtype):
    kw = dict(EPILOGUES[kind])
    if kw.get("c"):
        kw["c"] = rnd(n, cout, dtype=dtype, seed=3)
    if kw.get("res"):
        kw["res"] = rnd(n, cout, h, w, dtype=dtype, seed=4)
    return kw


@requires_wg
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(EPILOGUES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_winograd_conv_float64_matches_direct_conv(shape, kind, layout):
    n, cin, cout, h, w = shape
    x = rnd(n, cin, h, 2 * w, seed=1)[..., ::2] if layout == "strided" else rnd(n, cin, h, w, seed=1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    wt = rnd(cout, cin, 3, 3, seed=2)
    scale = rnd(cout, seed=5).abs() + 0.5
    kw = _epilogue_args(kind, n, cout, h, w, torch.float64)
    u = torch.ops.fastdiff.winograd_weight(wt)
    args = (kw.get("silu_in", False), kw.get("c"), kw.get("res"), kw.get("t", 0.5), kw.get("clip", 0.0))
    got = torch.ops.fastdiff.winograd_conv(x, u, scale, *args)
    # The reference Winograd (plain PyTorch) and the direct convolution both agree with the kernel.
    assert rel(got, R.winograd_conv(x, u, scale, *args)) < 1e-12
    y = F.conv2d(R.mp_silu(x) if args[0] else x, wt, padding=1) * scale.reshape(-1, 1, 1)
    if args[1] is not None:
        y = R.mp_silu_modulate(y, args[1])
    if args[2] is not None:
        y = R.mp_sum(args[2], y, args[3])
    if args[4]:
        y = y.clamp(-args[4], args[4])
    assert rel(got, y) < 1e-12
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@requires_wg
@pytest.mark.parametrize("kind", list(EPILOGUES))
def test_winograd_conv_float32_error_at_edm2_shape(kind):
    """float32 at a real block shape: within a few 1e-6 of float64 (Winograd rounds ~10x more than a direct
    convolution, still far inside the network budget of 1e-4)."""
    n, c, h = 2, 128, 16
    x, wt = rnd(n, c, h, h, dtype=torch.float32, seed=1), rnd(c, c, 3, 3, dtype=torch.float32, seed=2)
    kw = _epilogue_args(kind, n, c, h, h, torch.float32)
    with ops.use_conv_path("winograd"):
        got = ops.mp_conv_fused(x, wt, 1.3, **kw)
    want = chain64(x, wt, 1.3, **kw)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, err


def _skip_without(isa: str) -> None:
    if isa == "avx512" and ops._ext.isa()["elementwise"] != "avx512":
        pytest.skip("this CPU has no AVX-512")
    if isa == "avx2" and ops._ext.isa()["elementwise"] == "baseline":
        pytest.skip("this CPU has no AVX2")


# float32 shapes that reach every edge of the per-point GEMM micro-kernel (csrc/cpu/gemm.inc):
# tile counts that are not a multiple of the register block rows (1, 5, 13, 27 tiles), padded output
# channels 8, 16 and 24 past a multiple of 32 (the 1-vector and 8-float column remainders), and input
# channels past one K block (256 rows for AVX-512, 512 for AVX2) so later blocks accumulate.
GEMM_SHAPES = [(1, 8, 8, 4, 4), (1, 40, 24, 9, 7), (1, 16, 56, 13, 20), (3, 33, 48, 12, 12),
               (1, 264, 40, 8, 8), (2, 520, 16, 4, 9), (1, 64, 64, 17, 11)]  # n, cin, cout, h, w


@requires_wg
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_winograd_conv_float32_gemm_edges_every_isa(shape, isa):
    _skip_without(isa)
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 3, 3, dtype=torch.float32, seed=2)
    scale = (rnd(cout, seed=5).abs() + 0.5).float()
    res = rnd(n, cout, h, w, dtype=torch.float32, seed=4)
    u = torch.ops.fastdiff.winograd_weight(wt)
    with ops._ext.force_isa(isa) as levels:
        assert levels["winograd_gemm"] == {"baseline": "blas"}.get(isa, isa)
        got = torch.ops.fastdiff.winograd_conv(x, u, scale, False, None, res, 0.4, 0.0)
    want = R.mp_sum(res.double(), F.conv2d(x.double(), wt.double(), padding=1) * scale.double().reshape(-1, 1, 1), 0.4)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 2e-6 * max(1.0, (cin / 64) ** 0.5), err


@requires_wg
@pytest.mark.parametrize("shape", SHAPES + [(3, 33, 48, 12, 12)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_weight_grad_float64_matches_aten(shape, layout):
    n, cin, cout, h, w = shape
    x = rnd(n, cin, h, 2 * w, seed=1)[..., ::2] if layout == "strided" else rnd(n, cin, h, w, seed=1)
    g = rnd(n, cout, h, w, seed=2)
    if layout == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    got = torch.ops.fastdiff.winograd_weight_grad(x, g)
    want = torch.nn.grad.conv2d_weight(x, (cout, cin, 3, 3), g, padding=1)
    assert got.shape == want.shape and rel(got, want) < 1e-12
    assert rel(R.winograd_weight_grad(x, g), want) < 1e-12


@requires_wg
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("shape", GEMM_SHAPES + [(32, 32, 32, 16, 16)])
def test_weight_grad_float32_every_isa(shape, isa):
    _skip_without(isa)
    n, cin, cout, h, w = shape
    x, g = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(n, cout, h, w, dtype=torch.float32, seed=2)
    with ops._ext.force_isa(isa):
        got = torch.ops.fastdiff.winograd_weight_grad(x, g)
    want = torch.nn.grad.conv2d_weight(x.double(), (cout, cin, 3, 3), g.double(), padding=1)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, err  # sums over up to 512 tiles in float32: a few 1e-6


@requires_wg
@pytest.mark.parametrize("shape", [(32, 32, 32, 16, 16), (3, 33, 48, 12, 12)])
def test_weight_grad_does_not_depend_on_the_thread_count(shape):
    """Training must give the same numbers at any thread count (a run resumed with other threads, two
    runs of one seed): the weight gradient sums in an order fixed by the shape alone."""
    n, cin, cout, h, w = shape
    x, g = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(n, cout, h, w, dtype=torch.float32, seed=2)
    one = torch.ops.fastdiff.winograd_weight_grad(x, g)
    two = on_threads(2, torch.ops.fastdiff.winograd_weight_grad, x, g)
    assert torch.equal(one, two)


@requires_wg
def test_weight_grad_edge_cases():
    x, g = rnd(2, 8, 8, 8, dtype=torch.float32), rnd(2, 5, 8, 8, dtype=torch.float32)
    x[1, 2, 3, 3] = float("inf")
    dw = torch.ops.fastdiff.winograd_weight_grad(x, g)
    assert not torch.isfinite(dw[:, 2]).any() and torch.isfinite(dw[:, [0, 1, 3]]).all()
    e = torch.ops.fastdiff.winograd_weight_grad(x[:0], g[:0])
    assert e.shape == (5, 8, 3, 3) and torch.all(e == 0)
    with pytest.raises(RuntimeError, match=r"expected x \[N, C_in, H, W\] and grad \[N, C_out, H, W\]"):
        torch.ops.fastdiff.winograd_weight_grad(x, g[:, :, :4])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastdiff.winograd_weight_grad(x.half(), g.half())
    torch.library.opcheck(torch.ops.fastdiff.winograd_weight_grad.default, (x, g),
                          test_utils=("test_schema", "test_faketensor"))


@requires_wg
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
@pytest.mark.parametrize("shape", [(1, 8, 8, 4, 4), (2, 40, 24, 9, 8), (3, 33, 13, 4, 6), (1, 264, 40, 8, 8),
                                   (8, 64, 192, 8, 8), (1, 128, 384, 16, 16), (2, 5, 7, 3, 3),
                                   # maps of >= 256 pixels go through the copied [in][64] column panels: a last
                                   # panel of 40 columns, and two column blocks (2 threads) at batch 1
                                   (2, 24, 40, 20, 18), (1, 16, 24, 24, 24)])
def test_conv1x1_matches_conv2d_every_isa(shape, isa):
    _skip_without(isa)
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 1, 1, dtype=torch.float32, seed=2)
    want = F.conv2d(x.double(), wt.double())
    with ops._ext.force_isa(isa):
        for xin, wv in ((x, wt), (x, wt.reshape(cout, cin)), (x.contiguous(memory_format=torch.channels_last), wt),
                        (rnd(n, cin, h, 2 * w, dtype=torch.float32, seed=1)[..., ::2], wt)):
            got = torch.ops.fastdiff.conv1x1(xin, wv)
            ref = want if xin.stride(-1) == 1 or xin.is_contiguous(memory_format=torch.channels_last) else \
                F.conv2d(xin.double(), wt.double())
            assert got.shape == ref.shape and ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
        assert ops.conv1x1(x, wt).shape == want.shape  # the MPConv entry (own kernel or ATen by shape)
    assert rel(R.conv1x1(x.double(), wt.reshape(cout, cin).double()), want) < 1e-15


@requires_wg
@pytest.mark.parametrize("shape", [
    (1, 96, 200, 8, 8), (1, 64, 100, 4, 4), (1, 40, 96, 2, 4),  # one map of <= 64 pixels: output-channel blocks
    (1, 64, 64, 8, 8), (2, 64, 128, 8, 8), (1, 64, 128, 16, 16),  # fewer channels, samples, the column panels
])
def test_conv1x1_same_bits_at_any_thread_count(shape):
    """1 and 2 threads give the same bits on every route of the 1x1 product (one 8x8 map split by output
    channels, by samples, by column blocks), and the value of the double-precision convolution."""
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 1, 1, dtype=torch.float32, seed=2)
    one, two = (on_threads(t, torch.ops.fastdiff.conv1x1, x, wt) for t in (1, 2))
    assert torch.equal(one, two)
    want = F.conv2d(x.double(), wt.double())
    assert ((two.double() - want).norm() / want.norm()).item() < 1e-6


@requires_wg
def test_conv1x1_edge_cases():
    x, wt = rnd(2, 16, 4, 4, dtype=torch.float32), rnd(8, 16, 1, 1, dtype=torch.float32)
    x[1, 3, 2, 2] = float("nan")
    y = torch.ops.fastdiff.conv1x1(x, wt)
    assert torch.isnan(y[1, :, 2, 2]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, :2]).all()
    assert torch.ops.fastdiff.conv1x1(x[:0], wt).shape == (0, 8, 4, 4)
    with pytest.raises(RuntimeError, match=r"expected w of shape \[out, 16\]"):
        torch.ops.fastdiff.conv1x1(x, wt[:, :8])
    torch.library.opcheck(torch.ops.fastdiff.conv1x1.default, (x, wt), test_utils=("test_schema", "test_faketensor"))
    xg = x.clone().requires_grad_()
    assert ops.conv1x1(xg, wt).requires_grad  # with a gradient: ATen's differentiable convolution


@requires_wg
@pytest.mark.parametrize("shape", [
    (1, 64, 64, 8, 8), (1, 40, 72, 16, 16), (3, 16, 96, 8, 7), (2, 24, 24, 8, 8),  # under 4M multiply-adds: 1 thread
    (1, 64, 64, 32, 32), (1, 128, 80, 16, 12),  # <= 64 tiles, weight under 4 MiB: tiles split over the threads
    (1, 352, 384, 8, 8), (1, 256, 264, 12, 9),  # <= 64 tiles, weight of 4 MiB or more: output columns split
    (1, 256, 264, 52, 48),  # 156 tiles, weight over 8 MiB: chunks of at least 128 tiles
])
def test_winograd_conv_same_bits_at_any_thread_count(shape):
    """1 and 2 threads give the same bits on every route of the forward (one thread below 4M multiply-adds, the
    tile chunks, the few-tile output-column split, the large-weight chunks): each output sums its products in
    an order fixed by the shape alone."""
    n, cin, cout, h, w = shape
    x, wt = rnd(n, cin, h, w, dtype=torch.float32, seed=1), rnd(cout, cin, 3, 3, dtype=torch.float32, seed=2)
    u, scale, res = torch.ops.fastdiff.winograd_weight(wt), torch.ones(cout), rnd(n, cout, h, w, dtype=torch.float32)
    c = rnd(n, cout, dtype=torch.float32, seed=3)
    one, two = (on_threads(t, torch.ops.fastdiff.winograd_conv, x, u, scale, True, c, res, 0.3, 0.9) for t in (1, 2))
    assert torch.equal(one, two)
    if cin * h * w <= 64 * 16 * 16:  # and the value, against the direct convolution, where that is quick
        # (un-normalized weights: outputs up to ~30 before the clip, F(4x4)'s float32 rounding on them ~1e-4)
        want = R.mp_silu_modulate(F.conv2d(R.mp_silu(x.double()), wt.double(), padding=1), c.double())
        assert rel(one, R.mp_sum(res.double(), want, 0.3).clamp(-0.9, 0.9)) < 1e-3


@requires_wg
def test_nan_propagates_and_empty_batch():
    x, wt = rnd(1, 8, 8, 8, dtype=torch.float32), rnd(8, 8, 3, 3, dtype=torch.float32)
    x[0, 3, 1, 1] = float("nan")
    with ops.use_conv_path("winograd"):
        y = ops.mp_conv_fused(x, wt, silu_in=True)
    # A non-finite input poisons the 4x4 output tiles whose 6x6 input patch holds it (a superset of the
    # direct convolution's 3x3 neighbourhood); here only the top-left tile's.
    assert torch.isnan(y[0, :, :4, :4]).all()
    assert not torch.isnan(y[0, :, 4:]).any() and not torch.isnan(y[0, :, :, 4:]).any()
    u = torch.ops.fastdiff.winograd_weight(wt)
    e = torch.ops.fastdiff.winograd_conv(x[:0], u, torch.ones(8))
    assert e.shape == (0, 8, 8, 8)


@requires_wg
def test_bad_input_errors_name_what_was_expected():
    wt = rnd(8, 4, 3, 3, dtype=torch.float32)
    u = torch.ops.fastdiff.winograd_weight(wt)
    with pytest.raises(RuntimeError, match="expected u of shape"):
        torch.ops.fastdiff.winograd_conv(rnd(1, 12, 4, 4, dtype=torch.float32), u, torch.ones(8))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastdiff.winograd_conv(rnd(1, 4, 4, 4, dtype=torch.float16), u.half(), torch.ones(8))
    with pytest.raises(RuntimeError, match="3x3 weight"):
        torch.ops.fastdiff.winograd_weight(rnd(8, 4, 1, 1, dtype=torch.float32))
    with pytest.raises(RuntimeError, match="expected c of shape"):
        torch.ops.fastdiff.winograd_conv(rnd(1, 4, 4, 4, dtype=torch.float32), u, torch.ones(8), False,
                                         torch.ones(2, 8))


@requires_wg
def test_gradcheck_float64():
    x, wt = rnd(1, 6, 5, 6, seed=1).requires_grad_(), rnd(5, 6, 3, 3, seed=2).requires_grad_()
    gain = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    c, res = rnd(1, 5, seed=3).requires_grad_(), rnd(1, 5, 5, 6, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, g: torch.ops.fastdiff.mp_conv_winograd(x, w, g, 1e-4), (x, wt, gain))
    with ops.use_conv_path("winograd"):
        assert torch.autograd.gradcheck(
            lambda x, w, g, c, r: ops.mp_conv_fused(x, w, g, silu_in=True, c=c, res=r, t=0.3, clip=2.0),
            (x, wt, gain, c, res))


@requires_wg
def test_gradcheck_float64_winograd_weight_gradient():
    """With 32 or more tiles the weight gradient of mp_conv_winograd is the Winograd one (else ATen's)."""
    from fastdiff.ops._winograd import winograd_weight_grad_pays

    x = rnd(2, 3, 16, 13, seed=1)
    wt, gain = rnd(4, 3, 3, 3, seed=2).requires_grad_(), torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert winograd_weight_grad_pays(x, wt) and not winograd_weight_grad_pays(x[:1, :, :8], wt)
    assert torch.autograd.gradcheck(lambda w, g: torch.ops.fastdiff.mp_conv_winograd(x, w, g, 1e-4), (wt, gain))


@requires_wg
def test_float32_gradients_at_real_shape():
    n, c, h = 2, 64, 16
    x = rnd(n, c, h, h, dtype=torch.float32, seed=1)
    wt = rnd(c, c, 3, 3, dtype=torch.float32, seed=2)
    cc = rnd(n, c, dtype=torch.float32, seed=3)
    outs = {}
    for path in ("winograd", "aten"):
        xs, ws, cs = (t.clone().requires_grad_() for t in (x, wt, cc))
        with ops.use_conv_path(path):
            y = ops.mp_conv_fused(xs, ws, 1.0, silu_in=True, c=cs)
        y.square().sum().backward()
        outs[path] = (y, xs.grad, ws.grad, cs.grad)
    for a, b in zip(outs["winograd"], outs["aten"]):
        assert ((a - b).norm() / b.norm()).item() < 2e-5


@requires_wg
def test_fake_kernels_match_real_outputs():
    x = rnd(2, 9, 7, 6, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    wt = rnd(11, 9, 3, 3, dtype=torch.float32)
    u = torch.ops.fastdiff.winograd_weight(wt)
    for args in [(x, u, torch.ones(11)), (x, u, torch.ones(11), True, torch.ones(2, 11), torch.ones(2, 11, 7, 6))]:
        torch.library.opcheck(torch.ops.fastdiff.winograd_conv.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastdiff.mp_conv_winograd.default, (x, wt, torch.tensor(1.0), 1e-4))
    torch.library.opcheck(torch.ops.fastdiff.winograd_weight.default, (wt,), test_utils=("test_schema", "test_faketensor"))


def test_selector_falls_back_where_winograd_loses():
    assert ops.conv_path(128, 128, 32, 32, 8)[0] == ("winograd" if HAS else "aten")
    assert ops.conv_path(128, 128, 32, 32, 8, kernel=(1, 1))[0] == "aten"
    wg = "winograd" if HAS else "aten"
    assert ops.conv_path(4, 64, 32, 32, 8)[0] == "aten"           # the input conv: too few channels
    assert ops.conv_path(64, 3, 32, 32, 1)[0] == wg               # the output conv: many input channels
    assert ops.conv_path(8, 8, 8, 8, 1)[0] == "aten" and ops.conv_path(8, 8, 16, 16, 1)[0] == wg
    assert ops.conv_path(128, 128, 4, 4, 1)[0] == "aten"          # tiny map
    assert ops.conv_path(768, 768, 8, 8, 1)[0] == wg              # 4 tiles, an 81 MiB transformed weight: pays
    assert ops.conv_path(256, 256, 8, 8, 1)[0] == wg
    assert ops.conv_path(256, 256, 16, 16, 1)[0] == wg
    assert ops.conv_path(768, 768, 8, 8, 2)[0] == wg
    assert ops.conv_path(128, 128, 32, 32, 8, dtype=torch.bfloat16)[0] == "aten"
    assert ops.conv_path(128, 128, 32, 32, 8, device="meta")[0] == "aten"
    with ops.use_aten_conv():
        assert ops.conv_path(128, 128, 32, 32, 8) == ("aten", "forced (FASTDIFF_CONV=aten / use_aten_conv)")
    with pytest.raises(ValueError, match="expected 'auto'"):
        with ops.use_conv_path("fast"):
            pass


def test_env_var_forces_aten():
    code = "from fastdiff import ops; print(ops.conv_path(256, 256, 32, 32, 8)[0])"
    env = dict(os.environ, FASTDIFF_CONV="aten")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "aten"
    env["FASTDIFF_CONV"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTDIFF_CONV" in bad.stderr


# --- networks --------------------------------------------------------------------------------------------


def _nets(preset, training=False):
    from fastdiff.bench import suites

    opt = suites.Options()
    net = suites.build_net(preset, opt)
    net.train(training)
    if not training:
        net.requires_grad_(False)
    pnet = suites._plain(net, opt, training=training)
    return net, pnet, suites._inputs(net, 2, opt)


@requires_wg
@pytest.mark.parametrize("sigma", [0.002, 1.0, 80.0])
def test_network_eval_matches_plain_edm2(sigma):
    net, pnet, (x, _, labels) = _nets("tiny-16")
    s = torch.full((2,), sigma)
    with torch.no_grad(), ops.use_conv_path("winograd"):
        got = net(x * sigma, s, labels)
        got2 = net(x * sigma, s, labels)  # from the cached weight transforms
    want = pnet(x * sigma, s, labels)
    assert rel(got, want) < 1e-4
    assert torch.equal(got, got2)


@requires_wg
def test_network_training_matches_plain_edm2():
    net, pnet, (x, sigma, labels) = _nets("tiny-16", training=True)
    with ops.use_conv_path("winograd"):
        got = net(x, sigma, labels)
    got.square().mean().backward()
    want = pnet(x, sigma, labels)
    want.square().mean().backward()
    assert rel(got, want) < 1e-4
    pg = dict(zip(pnet.p.keys(), pnet.p.values()))
    worst = 0.0
    for name, p in net.named_parameters():
        q = pg[name]
        if q.grad is not None and q.grad.abs().max() > 0:
            worst = max(worst, ((p.grad - q.grad).norm() / q.grad.norm()).item())
    assert worst < 1e-3, worst


@requires_wg
def test_weight_cache_follows_the_weight():
    net, _, (x, sigma, labels) = _nets("tiny-16")
    with torch.no_grad(), ops.use_conv_path("winograd"):
        a = net(x, sigma, labels)
        conv = net.unet.enc["16x16_block0"].conv_res0
        conv.weight.mul_(-1)  # in place: the version counter moves, the cached transform must follow
        b = net(x, sigma, labels)
        with ops.use_aten_conv():
            c = net(x, sigma, labels)
    assert not torch.allclose(a, b) and rel(b, c) < 1e-4


@requires_wg
def test_eval_fast_path_follows_the_gain_and_inference_mode():
    """MPConv.fused in eval mode caches the output factor gain * row / sqrt(fan_in): an in-place change of
    a tensor gain must reach it, and a factor first made under inference_mode must serve outside it."""
    from fastdiff.nn.layers import MPConv

    m = MPConv(16, 24, kernel=(3, 3)).eval()
    x, gain = rnd(2, 16, 8, 8, dtype=torch.float32, seed=1), torch.nn.Parameter(torch.tensor(0.7), requires_grad=False)
    with torch.inference_mode():
        a = m.fused(x, gain, silu_in=True)
    with torch.no_grad():
        b = m.fused(x, gain, silu_in=True)
        gain.mul_(2.0)
        c = m.fused(x, gain, silu_in=True)
        d = m.fused(x, 1.4, silu_in=True)
    want = R.mp_conv(R.mp_silu(x.double()), m.weight.double(), 1.4)
    assert torch.equal(a, b) and rel(c, want) < 1e-5 and rel(c, d) < 1e-6 and rel(c, 2 * b) < 1e-6
    assert not b.is_inference()


@requires_wg
def test_sampler_trajectory_matches_plain_edm2():
    from fastdiff.bench import suites

    net, pnet, (x, _, labels) = _nets("tiny-16")
    gnet = suites.build_net("tiny-16", suites.Options(), seed=1).eval().requires_grad_(False)
    gplain = suites._plain(gnet, suites.Options())
    with torch.no_grad():
        with ops.use_conv_path("winograd"):
            got = suites.plain_heun_loop(net, gnet, x, labels)
        want = suites.plain_heun_loop(pnet, gplain, x, labels)
    assert rel(got, want) < 1e-3


def test_info_lists_the_path_of_every_conv_shape(capsys):
    from fastdiff.cli import main
    from fastdiff.cli.info import conv_paths

    rows = conv_paths("small-32", batch=8)
    by_name = {r[0]: r for r in rows}
    assert by_name["enc.32x32_conv"][4] == "aten"  # 4 input channels
    assert by_name["out_conv"][4] == ("winograd" if HAS else "aten")  # 64 in, 3 out
    assert by_name["enc.32x32_block0.conv_res0"][1:4] == (64, 64, 32)
    assert by_name["enc.32x32_block0.conv_res0"][4] == ("winograd" if HAS else "aten")
    assert main(["info", "--preset", "small-32", "--batch", "8"]) == 0
    assert "3x3 convolutions of small-32" in capsys.readouterr().out
