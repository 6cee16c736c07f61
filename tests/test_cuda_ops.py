"""CUDA kernels of the MP ops vs the plain-PyTorch reference (fastdiff.ops.reference).

Forward and backward (through the registered autograd) on odd channel counts, 1x1 / 5x5 / larger
spatial sizes, contiguous, channels_last, non-contiguous and misaligned (storage offset 1) inputs, in
each dtype; float64 gradcheck on small shapes. The reference runs in float64 on the same (rounded)
inputs, so the tolerance is about one unit in the last place of the tested dtype.

Skipped where no GPU is present. FASTDIFF_TEST_DEVICE=cpu runs the same checks against the CPU kernels
(useful to validate the tests themselves on a machine without a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import reference

DEVICE = os.environ.get("FASTDIFF_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    not ops.HAS_EXTENSION or (DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="needs a CUDA GPU and the compiled extension",
)
FD = torch.ops.fastdiff if ops.HAS_EXTENSION else None
EPS = reference.EPS

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance per dtype (~1-2 ulp of the stored result; float64 is limited by the float32
# constants the kernels share with the CPU ones: the 0.596f divisor and the float mp_sum/mp_cat weights).
TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CHANNELS = (1, 3, 7, 63, 65)
SPATIAL = (1, 5)
LAYOUTS = ("contiguous", "channels_last", "noncontig", "misaligned")

ACT_SHAPES = [(2, c, h, h) for c in CHANNELS for h in SPATIAL] + [(3, 65), (2, 64, 16, 16), (1, 24, 9, 7)]
BIG_SHAPES = [(2, 64, 64, 64), (3, 40, 33, 33)]  # vector paths, many blocks, split reductions
W_SHAPES = [(1, 1), (3, 7), (65, 63), (7, 3, 3, 3), (63, 65, 1, 1), (64, 128, 3, 3), (5, 3, 5, 5), (1, 1000)]


def _cases(shapes, layouts=LAYOUTS):
    out = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) != 4:
                continue
            out.append(pytest.param(shape, layout, id=f"{'x'.join(map(str, shape))}-{layout}"))
    return out


def make(shape, dtype, layout="contiguous", scale=1.0, seed=0):
    """A random tensor on DEVICE with the given memory layout (values rounded to dtype first)."""
    gen = torch.Generator().manual_seed(seed + 1000 * len(shape) + sum(shape))
    base = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if layout == "noncontig":  # every other channel of a wider tensor
        wide = list(shape)
        wide[1] *= 2
        big = torch.zeros(wide, dtype=dtype, device=DEVICE)
        big[:, ::2] = base.to(DEVICE)
        t = big[:, ::2]
        return t
    if layout == "misaligned":  # storage offset of one element: no 16-byte alignment
        flat = torch.zeros(base.numel() + 1, dtype=dtype, device=DEVICE)
        flat[1:] = base.flatten().to(DEVICE)
        return flat[1:].view(shape)
    t = base.to(DEVICE)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def close(got, want, dtype, scale=None, tol=None):
    """got ~ want with relative tolerance TOL[dtype] and an absolute one of tol * scale (default: max |want|)."""
    tol = TOL[dtype] if tol is None else tol
    want = want.detach().double()
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want, rtol=tol, atol=tol * max(float(scale), 1e-30) + 1e-300,
                               equal_nan=True)


def leaf64(t):
    return t.detach().double().requires_grad_()


def is_channels_last(t):
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def norm_scale(x, dims):
    """1 / (eps + ||x|| / sqrt(n)) over dims, float64, keepdim (the size of the backward's terms)."""
    x = x.detach().double()
    n = math.prod(x.shape[d] for d in dims)
    return 1.0 / (EPS + torch.linalg.vector_norm(x, dim=dims, keepdim=True) / math.sqrt(n))


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# Flat elementwise ops.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(ACT_SHAPES + BIG_SHAPES[:1]))
def test_mp_silu(shape, layout, dtype):
    x = make(shape, dtype, layout, scale=3.0).requires_grad_()
    assert ops.uses_kernel("mp_silu", x)
    y = ops.mp_silu(x)
    x64 = leaf64(x)
    want = reference.mp_silu(x64)
    close(y, want, dtype)
    if x.is_contiguous() or is_channels_last(x):  # dense layouts are kept
        assert y.stride() == x.stride()
    g = make(shape, dtype, seed=1)
    y.backward(g)
    want.backward(g.double())
    close(x.grad, x64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(ACT_SHAPES + BIG_SHAPES[:1]))
@pytest.mark.parametrize("t", [0.3, 0.5])
def test_mp_sum(shape, layout, dtype, t):
    a = make(shape, dtype, layout).requires_grad_()
    b = make(shape, dtype, "contiguous" if layout != "contiguous" else "noncontig", seed=2).requires_grad_()
    assert ops.uses_kernel("mp_sum", a, b)
    y = ops.mp_sum(a, b, t)
    a64, b64 = leaf64(a), leaf64(b)
    want = reference.mp_sum(a64, b64, t)
    close(y, want, dtype)
    g = make(shape, dtype, seed=3)
    y.backward(g)
    want.backward(g.double())
    close(a.grad, a64.grad, dtype)
    close(b.grad, b64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(ACT_SHAPES + BIG_SHAPES[:1]))
def test_clip(shape, layout, dtype):
    limit = 256.0 if dtype != torch.float16 else 2.0
    x = make(shape, dtype, layout, scale=400.0 if dtype != torch.float16 else 3.0)
    with torch.no_grad():  # keep values away from the clip boundary (the gradient jumps there)
        x.masked_fill_((x.abs() - limit).abs() < 0.01 * limit, 0.5)
    x.requires_grad_()
    y = ops.clip(x, limit)
    x64 = leaf64(x)
    want = reference.clip(x64, limit)
    close(y, want, dtype, tol=0.0 if dtype != torch.float64 else 1e-12)  # exact: clamping only
    g = make(shape, dtype, seed=4)
    y.backward(g)
    want.backward(g.double())
    close(x.grad, x64.grad, dtype, tol=0.0)


def test_clip_nan_passes_through():
    x = torch.tensor([float("nan"), -1e9, 1e9, 3.0, float("inf"), -float("inf")], device=DEVICE)
    y = FD.clip(x, 256.0)
    torch.testing.assert_close(y, x.clamp(-256, 256), equal_nan=True, rtol=0, atol=0)
    dx = FD.clip_backward(torch.ones_like(x), x, 256.0)
    assert dx.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_sizes_around_vector_width(dtype):
    # Tails after the 16-byte packs, and sizes smaller than one pack.
    for n in (0, 1, 2, 7, 8, 9, 15, 16, 17, 1023, 4097):
        x = make((n,), dtype, scale=3.0) if n else torch.empty(0, dtype=dtype, device=DEVICE)
        close(FD.mp_silu(x), reference.mp_silu(x.double()), dtype)
        close(FD.mp_silu_backward(x, x), x.double() * torch.func.grad(lambda v: reference.mp_silu(v).sum())(x.double())
              if n else x.double(), dtype)
        close(FD.mp_sum(x, x.flip(0), 0.3), reference.mp_sum(x.double(), x.flip(0).double(), 0.3), dtype)


# ----------------------------------------------------------------------------------------------------
# Channel-wise ops.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(ACT_SHAPES + BIG_SHAPES))
def test_pixel_norm(shape, layout, dtype):
    x = make(shape, dtype, layout, scale=2.0).requires_grad_()
    assert ops.uses_kernel("pixel_norm", x)
    y = ops.pixel_norm(x)
    x64 = leaf64(x)
    want = reference.pixel_norm(x64)
    close(y, want, dtype)
    if is_channels_last(x) and not x.is_contiguous():
        assert is_channels_last(y)
    g = make(shape, dtype, seed=5)
    y.backward(g)
    want.backward(g.double())
    # dx = s g - k x: the two terms (each about |g| s) cancel, so the absolute tolerance is their size.
    scale = (g.double().abs() * norm_scale(x, [1])).max().item()
    close(x.grad, x64.grad, dtype, scale=2 * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c_dtype", ["same", torch.float32])
@pytest.mark.parametrize("shape,layout", _cases(ACT_SHAPES + BIG_SHAPES))
def test_mp_silu_modulate(shape, layout, dtype, c_dtype):
    c_dtype = dtype if c_dtype == "same" else c_dtype
    y = make(shape, dtype, layout, scale=2.0).requires_grad_()
    c = make(shape[:2], c_dtype, seed=6).requires_grad_()
    assert ops.uses_kernel("mp_silu_modulate", y, c)
    out = ops.mp_silu_modulate(y, c)
    y64, c64 = leaf64(y), leaf64(c)
    want = reference.mp_silu_modulate(y64, c64)
    close(out, want, dtype)
    if is_channels_last(y) and not y.is_contiguous():
        assert is_channels_last(out)
    g = make(shape, dtype, seed=7)
    out.backward(g)
    want.backward(g.double())
    close(y.grad, y64.grad, dtype)
    assert c.grad.dtype == c.dtype and c.grad.shape == c.shape
    spatial = list(range(2, len(shape)))
    terms = g.double().abs() * y.detach().double().abs() * 2.0
    scale = (terms.sum(spatial) if spatial else terms).max().item()
    close(c.grad, c64.grad, c_dtype if TOL[c_dtype] > TOL[dtype] else dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases([(2, 3, 4, 4), (2, 65, 5, 5), (1, 8, 1, 1), (4, 63), (2, 64, 16, 16)]))
def test_mp_cat(shape, layout, dtype):
    n, ca = shape[0], shape[1]
    shape_b = (n, 2 * ca + 1, *shape[2:])
    for layout_b in (layout, "contiguous"):
        if layout_b == "channels_last" and len(shape) != 4:
            continue
        a = make(shape, dtype, layout).requires_grad_()
        b = make(shape_b, dtype, layout_b, seed=8).requires_grad_()
        for t in (0.5, 0.3):
            a.grad = b.grad = None
            y = ops.mp_cat(a, b, t=t)
            a64, b64 = leaf64(a), leaf64(b)
            want = reference.mp_cat(a64, b64, t=t)
            close(y, want, dtype)
            if is_channels_last(a) and is_channels_last(b) and not a.is_contiguous():
                assert is_channels_last(y)
            g = make(tuple(want.shape), dtype, seed=9)
            y.backward(g)
            want.backward(g.double())
            close(a.grad, a64.grad, dtype)
            close(b.grad, b64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases([(2, 3, 4, 4), (2, 65, 5, 5), (2, 64, 16, 16), (7, 63)]))
def test_scale_channels_inplace(shape, layout, dtype):
    y = make(shape, dtype, layout)
    before = y.clone()
    coef = make((shape[1],), torch.float64 if dtype == torch.float64 else torch.float32, seed=10)
    ptr, strides = y.data_ptr(), y.stride()
    out = FD.scale_channels_(y, coef)
    assert out.data_ptr() == ptr and y.stride() == strides
    view = [1, -1] + [1] * (len(shape) - 2)
    close(y, (before.double() * coef.double().view(view)).to(dtype), dtype)


# ----------------------------------------------------------------------------------------------------
# Weight normalization and the MP conv / linear built on it.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(W_SHAPES))
def test_weight_norm(shape, layout, dtype):
    if layout == "noncontig" and len(shape) < 2:
        pytest.skip("needs 2 dims")
    w = make(shape, dtype, layout).requires_grad_()
    s = FD.weight_norm_scale(w, EPS)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(s, reference.row_scale(w.detach().double()), dtype)
    y = ops.weight_norm(w)
    w64 = leaf64(w)
    want = reference.weight_norm(w64)
    close(y, want, dtype)
    g = make(shape, dtype, seed=11)
    y.backward(g)
    want.backward(g.double())
    dims = list(range(1, len(shape)))
    scale = (g.double().abs() * norm_scale(w, dims)).max().item()
    close(w.grad, w64.grad, dtype, scale=2 * scale)
    # The per-row dot product <G, N(w)> returned by the backward op.
    dw, dot = FD.weight_norm_backward(g, w.detach(), EPS)
    close(dw, w64.grad, dtype, scale=2 * scale)
    dot_want = (g.double() * reference.weight_norm(w.detach().double())).reshape(shape[0], -1).sum(1)
    dot_scale = (g.double().abs() * reference.weight_norm(w.detach().double()).abs()).reshape(shape[0], -1).sum(1)
    close(dot, dot_want, dtype, scale=dot_scale.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", _cases(W_SHAPES))
def test_weight_norm_inplace(shape, layout, dtype):
    w = make(shape, dtype, layout)
    want = reference.weight_norm(w.double())
    ptr, strides = w.data_ptr(), w.stride()
    out = ops.weight_norm_(w)
    assert out.data_ptr() == ptr and w.data_ptr() == ptr and w.stride() == strides
    close(w, want, dtype)


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("target", [None, torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scale_rows(w_dtype, target):
    for shape, layout in [((7, 3, 3, 3), "contiguous"), ((65, 63), "noncontig"), ((64, 128, 3, 3), "misaligned")]:
        w = make(shape, w_dtype, layout)
        coef = make((shape[0],), torch.float32, seed=12)
        out = FD.scale_rows(w, coef, target)
        want_dtype = target or w_dtype
        assert out.dtype == want_dtype and out.shape == w.shape and out.is_contiguous()
        view = [-1] + [1] * (len(shape) - 1)
        want = (w.double() * coef.double().view(view)).to(w_dtype)  # rounded to w's dtype, then cast
        coarse = max(TOL[w_dtype], TOL[want_dtype])
        close(out, want, w_dtype, tol=coarse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", ["same", torch.float32])
@pytest.mark.parametrize("x_shape,w_shape", [((2, 7, 5, 5), (9, 7, 3, 3)), ((2, 3, 6, 6), (65, 3, 1, 1)),
                                              ((4, 63), (65, 63)), ((3, 2, 65), (7, 65)), ((1, 64, 8, 8), (3, 64, 3, 3))])
def test_mp_conv(x_shape, w_shape, dtype, w_dtype, no_tf32):
    w_dtype = dtype if w_dtype == "same" else w_dtype
    tol = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    x = make(x_shape, dtype).requires_grad_()
    w = make(w_shape, w_dtype, seed=13).requires_grad_()
    gain = torch.tensor(1.7, device=DEVICE, requires_grad=True)
    assert ops.uses_kernel("mp_conv", x, w)
    y = ops.mp_conv(x, w, gain)
    assert y.dtype == dtype
    x64, w64, gain64 = leaf64(x), leaf64(w), leaf64(gain)
    want = reference.mp_conv(x64, w64, gain64)
    close(y, want, dtype, tol=tol)
    g = make(tuple(want.shape), dtype, seed=14)
    y.backward(g)
    want.backward(g.double())
    close(x.grad, x64.grad, dtype, tol=tol)
    # Size of the terms that the weight-norm backward subtracts: gain * s_o / sqrt(fan_in) * |dL/dW_hat|.
    w_hat = reference.mp_weight(w.detach().double(), 1.7).requires_grad_()
    raw = x64.detach() @ w_hat.t() if w.ndim == 2 else torch.nn.functional.conv2d(x64.detach(), w_hat, padding=w.shape[-1] // 2)
    (g_hat,) = torch.autograd.grad((raw * g.double()).sum(), w_hat)
    dims = list(range(1, w.ndim))
    fan_in = math.prod(w.shape[1:])
    term = (g_hat.abs() * norm_scale(w, dims)).max().item() * 1.7 / math.sqrt(fan_in)
    close(w.grad, w64.grad, dtype, tol=tol, scale=2 * term)
    close(gain.grad, gain64.grad, dtype, tol=tol, scale=(g_hat * w_hat.detach()).abs().sum().item() / 1.7)
    # The effective weight alone, in a requested dtype.
    w_hat = ops.mp_weight(w.detach(), 1.7, dtype=dtype)
    assert w_hat.dtype == dtype
    close(w_hat, reference.mp_weight(w.detach().double(), 1.7), dtype, tol=max(tol, TOL[w_dtype]))


# ----------------------------------------------------------------------------------------------------
# float64 gradcheck on small shapes (kernel forward vs kernel backward).


def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_gradcheck(layout):
    d = torch.float64
    x = make((2, 5, 3, 3), d, layout).requires_grad_()
    b = make((2, 5, 3, 3), d, "contiguous", seed=20).requires_grad_()
    b2 = make((2, 3, 3, 3), d, layout, seed=21).requires_grad_()
    c = make((2, 5), d, seed=22).requires_grad_()
    _gc(ops.mp_silu, x)
    _gc(lambda u, v: ops.mp_sum(u, v, 0.3), x, b)
    _gc(lambda u, v: ops.mp_cat(u, v, t=0.3), x, b2)
    _gc(ops.pixel_norm, x)
    _gc(ops.mp_silu_modulate, x, c)
    xc = make((2, 5, 3, 3), d, layout, scale=3.0)
    with torch.no_grad():
        xc.masked_fill_((xc.abs() - 1.0).abs() < 0.05, 0.5)
    _gc(lambda u: ops.clip(u, 1.0), xc.requires_grad_())
    w = make((4, 5, 3, 3), d, "contiguous" if layout == "channels_last" else layout, seed=23).requires_grad_()
    gain = torch.tensor(1.3, dtype=d, device=DEVICE, requires_grad=True)
    _gc(ops.weight_norm, w)
    _gc(lambda u, gn: ops.mp_weight(u, gn), w, gain)
    _gc(lambda u, v, gn: ops.mp_conv(u, v, gn), x, w, gain)
    wl = make((3, 5), d, seed=24).requires_grad_()
    _gc(lambda u, v, gn: ops.mp_linear(u, v, gn), make((2, 5), d, seed=25).requires_grad_(), wl, gain)


# ----------------------------------------------------------------------------------------------------
# Determinism, empty tensors, input checks.


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic(layout):
    x = make((3, 65, 33, 33), torch.float32, layout)
    g = make((3, 65, 33, 33), torch.float32, layout, seed=30)
    c = make((3, 65), torch.float32, seed=31)
    w = make((130, 65, 3, 3), torch.float32, seed=32)
    gw = make((130, 65, 3, 3), torch.float32, seed=33)
    for fn in (lambda: FD.pixel_norm(x, EPS), lambda: FD.pixel_norm_backward(g, x, EPS),
               lambda: FD.mp_silu_modulate_backward(g, x, c), lambda: FD.weight_norm_backward(gw, w, EPS),
               lambda: FD.weight_norm_scale(w, EPS)):
        first, second = fn(), fn()
        first = first if isinstance(first, (tuple, list)) else (first,)
        second = second if isinstance(second, (tuple, list)) else (second,)
        for p, q in zip(first, second):
            assert torch.equal(p, q)


def test_empty_inputs():
    x = torch.empty(0, 3, 4, 4, device=DEVICE)
    assert FD.mp_silu(x).shape == x.shape
    assert FD.pixel_norm(x, EPS).shape == x.shape
    assert FD.mp_cat(x, torch.empty(0, 2, 4, 4, device=DEVICE), 0.5).shape == (0, 5, 4, 4)
    y = torch.empty(2, 3, 0, 4, device=DEVICE)
    c = torch.randn(2, 3, device=DEVICE)
    out = FD.mp_silu_modulate(y, c)
    dy, dc = FD.mp_silu_modulate_backward(torch.empty_like(y), y, c)
    assert out.shape == y.shape and dy.shape == y.shape
    assert torch.equal(dc, torch.zeros_like(c))
    ycl = torch.empty(2, 3, 0, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    _, dc = FD.mp_silu_modulate_backward(torch.empty_like(ycl), ycl, c)
    assert torch.equal(dc, torch.zeros_like(c))


@pytest.mark.skipif(DEVICE != "cuda", reason="device-mismatch checks need a CUDA tensor")
def test_input_checks():
    a = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        FD.mp_sum(a, a.cpu(), 0.3)
    with pytest.raises(RuntimeError, match="same device"):
        FD.pixel_norm_backward(a.cpu(), a, EPS)
    with pytest.raises(RuntimeError, match="same device"):
        FD.mp_silu_modulate(a, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="same device"):
        FD.scale_rows(torch.randn(3, 4, device="cuda"), torch.randn(3), None)
    with pytest.raises(RuntimeError, match=r"expected c of shape \[N, C\]"):
        FD.mp_silu_modulate(a, torch.randn(2, 4, device="cuda"))
    with pytest.raises(RuntimeError, match="same dtype"):
        FD.mp_silu_backward(a, a.half())
    with pytest.raises(RuntimeError, match="floating-point"):
        FD.mp_silu(torch.ones(3, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="non-empty weight"):
        FD.weight_norm_scale(torch.empty(0, 3, device="cuda"), EPS)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x = torch.randn(2, 7, 5, 5, device="cuda:1")
    close(ops.pixel_norm(x), reference.pixel_norm(x.double()), torch.float32)
    close(ops.mp_silu(x), reference.mp_silu(x.double()), torch.float32)
