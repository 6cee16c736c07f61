"""The fused MP ops vs their plain-PyTorch references: forward, backward, gradcheck, layouts, dtypes,
bad input, and the torch.library contract (opcheck, fake kernels, torch.compile)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import ops
from fastdiff.ops import _ext
from fastdiff.ops import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerance relative to the output's magnitude, per dtype (fp16/bf16 store ~11/8 mantissa bits). float32
# results of reductions (a conv's weight gradient sums a few hundred products) are summed in an order
# that depends on the CPU's kernels (oneDNN picks AVX2 or AVX-512 code, blocks differ between AMD and
# Intel): they differ from float64 by up to ~1e-5 relative on one host and a little more on another, so
# the float32 bound leaves room for any host's rounding (4e-5) while a wrong formula still fails by
# orders of magnitude.
TOL = {torch.float64: 1e-10, torch.float32: 4e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CHANNELS = [1, 3, 7, 63, 65]
SPATIAL = [(1, 1), (5, 5)]
LAYOUTS = ["contiguous", "channels_last", "strided"]

requires_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="compiled extension fastdiff._C not built")


def make(shape, dtype=torch.float32, layout="contiguous", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a non-contiguous view: every other element of the last dim
        big = torch.randn(*shape[:-1], shape[-1] * 2, generator=g, dtype=torch.float64) * scale
        return big[..., ::2].to(dtype)
    x = (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype)
    if layout == "channels_last" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "", same_dtype_ref=None):
    """``got`` (computed in ``dtype``) must be within TOL of the float64 ``want``, or, where the problem is
    ill-conditioned, no worse than 4x the error of the plain reference run in the same dtype."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    allowed = TOL[dtype] * scale
    if same_dtype_ref is not None:
        allowed = max(allowed, 4 * max_err(same_dtype_ref, want))
    err = max_err(got, want)
    assert err <= allowed, f"{what}: max abs error {err:.3g} > {allowed:.3g} ({dtype})"


def check_against_reference(fused, ref, inputs, dtype, what):
    """Forward and every input gradient of ``fused`` vs ``ref`` (float64 and same-dtype runs)."""
    out, g = grads(fused, inputs)
    out64, g64 = grads(ref, [t.double() for t in inputs])
    outlp, glp = grads(ref, inputs) if dtype != torch.float64 else (out64, g64)
    assert out.dtype == outlp.dtype, f"{what}: output dtype {out.dtype}, expected {outlp.dtype}"
    assert_close(out, out64, dtype, f"{what} forward", outlp)
    for i, (a, b, c) in enumerate(zip(g, g64, glp)):
        if b is None:
            assert a is None
            continue
        assert a.dtype == c.dtype, f"{what}: grad {i} dtype {a.dtype}, expected {c.dtype}"
        assert_close(a.reshape(b.shape), b, dtype, f"{what} grad {i}", c.reshape(b.shape))


def ref64(fn, *tensors, **kw):
    """The reference evaluated in float64 on the same (already rounded) inputs."""
    return fn(*[t.double() for t in tensors], **kw)


def grads(fn, inputs, grad_out_seed=7):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = make(out.shape, out.dtype, seed=grad_out_seed)
    (out * g).sum().backward() if out.dtype == torch.float64 else out.backward(g)
    return out, [t.grad for t in inputs]


def test_extension_is_loaded_and_kernels_cover_every_op():
    if os.environ.get("FASTDIFF_REFERENCE"):
        pytest.skip("FASTDIFF_REFERENCE is set: testing the reference path on purpose")
    assert ops.HAS_EXTENSION, "fastdiff._C is not built; run `pip install --no-build-isolation -e .`"
    table = ops.kernels()
    for op in ["weight_norm", "weight_norm_", "mp_silu", "mp_sum", "mp_cat", "pixel_norm", "mp_silu_modulate", "clip"]:
        assert "cpu" in table[op], f"{op} has no CPU kernel"
    for op in ["mp_conv", "mp_weight"]:
        assert ops.uses_kernel(op, torch.zeros(1))


# --- the references themselves, against the formulas of the EDM2 paper ------------------------------


def test_reference_matches_spec_formulas():
    x = make((2, 5, 3, 3), torch.float64)
    assert torch.allclose(R.mp_silu(x), x * torch.sigmoid(x) / 0.596)
    a, b, t = x, make((2, 5, 3, 3), torch.float64, seed=1), 0.3
    assert torch.allclose(R.mp_sum(a, b, t), ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2))
    y = R.pixel_norm(x * 10)
    rms = y.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    w = make((4, 3, 3, 3), torch.float64)
    wn = R.weight_norm(w * 5)
    assert torch.allclose(wn.flatten(1).pow(2).mean(1).sqrt(), torch.ones(4, dtype=torch.float64), atol=1e-4)
    # mp_cat keeps unit-variance inputs at unit variance overall.
    big_a, big_b = make((1, 3, 64, 64), torch.float64), make((1, 5, 64, 64), torch.float64, seed=2)
    assert abs(R.mp_cat(big_a, big_b, t=0.3).var().item() - 1) < 0.05
    # MP conv: per-row scale gain / sqrt(fan_in) on the normalized weight.
    xi, wi = make((1, 3, 4, 4), torch.float64), make((2, 3, 3, 3), torch.float64)
    want = F.conv2d(xi, R.normalize(wi) * (1.5 / math.sqrt(27)), padding=1)
    assert torch.allclose(R.mp_conv(xi, wi, 1.5), want)


# --- forward and backward parity ------------------------------------------------------------------


ELEMENTWISE = {
    "mp_silu": (ops.mp_silu, R.mp_silu, 1),
    "clip": (lambda x: ops.clip(x, 1.5), lambda x: R.clip(x, 1.5), 1),
    "mp_sum": (lambda a, b: ops.mp_sum(a, b, 0.3), lambda a, b: R.mp_sum(a, b, 0.3), 2),
    "pixel_norm": (ops.pixel_norm, R.pixel_norm, 1),
}


@requires_ext
@pytest.mark.parametrize("name", list(ELEMENTWISE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_elementwise_forward_backward(name, dtype, channels, spatial, layout):
    fused, ref, arity = ELEMENTWISE[name]
    inputs = [make((2, channels, *spatial), dtype, layout, seed=i) for i in range(arity)]
    assert ops.uses_kernel(name, *inputs)
    check_against_reference(fused, ref, inputs, dtype, name)


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mp_silu_modulate(dtype, channels, spatial, layout):
    y = make((3, channels, *spatial), dtype, layout)
    c = make((3, channels), torch.float32, seed=3)
    check_against_reference(ops.mp_silu_modulate, R.mp_silu_modulate, [y, c], dtype, "mp_silu_modulate")


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ca,cb", [(1, 1), (3, 7), (63, 65)])
@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mp_cat(dtype, ca, cb, spatial, layout):
    a = make((2, ca, *spatial), dtype, layout)
    b = make((2, cb, *spatial), dtype, layout, seed=1)
    check_against_reference(
        lambda a, b: ops.mp_cat(a, b, t=0.3), lambda a, b: R.mp_cat(a, b, t=0.3), [a, b], dtype, "mp_cat"
    )


def test_mp_cat_other_dims_fall_back_to_reference():
    a, b = make((2, 3, 4)), make((2, 3, 5), seed=1)
    assert torch.allclose(ops.mp_cat(a, b, dim=-1, t=0.4), R.mp_cat(a, b, dim=-1, t=0.4))


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (65, 63, 3, 3), (3, 1, 1, 1), (5, 2, 5, 5)])
def test_weight_norm(dtype, shape):
    w = make(shape, dtype, scale=3.0)
    check_against_reference(ops.weight_norm, R.weight_norm, [w], dtype, "weight_norm")
    w2 = w.clone()
    assert ops.weight_norm_(w2) is w2
    assert_close(w2, R.weight_norm(w.double()), dtype, "in place", R.weight_norm_(w.clone()))


@requires_ext
def test_weight_norm_in_place_on_non_contiguous_weight_and_no_grad():
    base = make((6, 8, 3, 3), scale=4.0)
    w = base.transpose(0, 1)  # [8, 6, 3, 3] view, not contiguous
    want = R.weight_norm(w.clone())
    p = torch.nn.Parameter(base.clone())
    ops.weight_norm_(p.data.transpose(0, 1))
    assert torch.allclose(p.data.transpose(0, 1), want, atol=1e-6)
    assert p.grad is None
    ops.weight_norm_(w)
    assert torch.allclose(w, want, atol=1e-6)


CONV_CASES = [
    # (x shape, w shape)
    ((2, 3, 5, 5), (7, 3, 3, 3)),
    ((1, 65, 1, 1), (63, 65, 1, 1)),
    ((3, 7, 6, 5), (1, 7, 3, 3)),
    ((2, 1, 5, 5), (65, 1, 1, 1)),
    ((3, 24, 4, 6), (40, 24, 1, 1)),  # 1x1 on fastdiff's GEMM (float32, >= 8 channels, H W a multiple of 8)
    ((4, 63), (7, 63)),
    ((2, 3, 5), (65, 5)),  # linear on a 3-D input
]


@requires_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs,ws", CONV_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("gain", [1.0, 0.0, "param"])
def test_mp_conv(dtype, xs, ws, layout, gain):
    x = make(xs, dtype, layout)
    w = make(ws, torch.float32, seed=1, scale=2.0)
    g = torch.tensor(0.7) if gain == "param" else torch.tensor(gain)
    check_against_reference(
        lambda x, w, g: ops.mp_conv(x, w, g), lambda x, w, g: R.mp_conv(x, w, g), [x, w, g], dtype, "mp_conv"
    )


@requires_ext
def test_mp_conv_python_float_gain_and_both_scaling_paths():
    # Batch 1 on a small map scales the output; a large batch scales the weight: same answer.
    w = make((16, 8, 3, 3), seed=1)
    for n in (1, 64):
        x = make((n, 8, 4, 4))
        assert_close(ops.mp_conv(x, w, 1.3), R.mp_conv(x.double(), w.double(), 1.3), torch.float32, f"batch {n}")


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mp_weight(dtype):
    w = make((9, 4, 3, 3), seed=1, scale=2.0)
    g = torch.tensor(1.7)
    out, (gw, gg) = grads(lambda w, g: ops.mp_weight(w, g, dtype=dtype), [w, g])
    out_ref, (gw_ref, gg_ref) = grads(lambda w, g: R.mp_weight(w, g), [w.double(), g.double()])
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, "forward")
    assert_close(gw, gw_ref, dtype, "grad w")
    assert_close(gg, gg_ref, dtype, "grad gain")


# --- gradcheck in float64 -------------------------------------------------------------------------


def _d(shape, seed=0, layout="contiguous"):
    return make(shape, torch.float64, layout, seed).requires_grad_(True)


GRADCHECK = {
    "mp_silu": lambda: (ops.mp_silu, (_d((2, 3, 3, 3)),)),
    "clip": lambda: (lambda x: ops.clip(x, 0.8), (_d((2, 3, 3, 3)),)),
    "mp_sum": lambda: (lambda a, b: ops.mp_sum(a, b, 0.3), (_d((2, 3, 3)), _d((2, 3, 3), 1))),
    "mp_cat": lambda: (lambda a, b: ops.mp_cat(a, b, t=0.3), (_d((2, 3, 2, 2)), _d((2, 2, 2, 2), 1))),
    "pixel_norm": lambda: (ops.pixel_norm, (_d((2, 5, 3, 3)),)),
    "pixel_norm_cl": lambda: (ops.pixel_norm, (_d((2, 5, 3, 3), layout="channels_last"),)),
    "mp_silu_modulate": lambda: (ops.mp_silu_modulate, (_d((2, 3, 3, 3)), _d((2, 3), 1))),
    "mp_silu_modulate_cl": lambda: (ops.mp_silu_modulate, (_d((2, 3, 3, 3), layout="channels_last"), _d((2, 3), 1))),
    "weight_norm": lambda: (ops.weight_norm, (_d((4, 3, 3, 3)),)),
    "mp_weight": lambda: (lambda w, g: ops.mp_weight(w, g), (_d((4, 3, 3, 3)), _d(()))),
    "mp_conv": lambda: (lambda x, w, g: ops.mp_conv(x, w, g), (_d((2, 3, 4, 4)), _d((4, 3, 3, 3), 1), _d((), 2))),
    "mp_conv_big_batch": lambda: (lambda x, w, g: ops.mp_conv(x, w, g), (_d((9, 2, 2, 2)), _d((2, 2, 1, 1), 1), _d((), 2))),
    "mp_linear": lambda: (lambda x, w, g: ops.mp_conv(x, w, g), (_d((3, 5)), _d((4, 5), 1), _d((), 2))),
}


@requires_ext
@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(name):
    fn, inputs = GRADCHECK[name]()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# --- the torch.library contract: schema, fake kernels, autograd registration, torch.compile -------


OPCHECK = {
    "mp_silu": lambda: (make((2, 3, 4, 4)),),
    "mp_sum": lambda: (make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1), 0.3),
    "mp_cat": lambda: (make((2, 3, 4, 4), layout="channels_last"), make((2, 2, 4, 4), layout="channels_last"), 0.5),
    "pixel_norm": lambda: (make((2, 3, 4, 4), layout="channels_last"), 1e-4),
    "mp_silu_modulate": lambda: (make((2, 3, 4, 4)), make((2, 3), seed=1)),
    "clip": lambda: (make((2, 3, 4, 4)) * 3, 1.0),
    "weight_norm": lambda: (make((4, 3, 3, 3)), 1e-4),
    "mp_weight": lambda: (make((4, 3, 3, 3)), torch.tensor(1.5), 1e-4, None),
    "mp_conv": lambda: (make((2, 3, 5, 5)), make((4, 3, 3, 3), seed=1), torch.tensor(1.5), 1e-4),
}


@requires_ext
@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name):
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in OPCHECK[name]())
    torch.library.opcheck(getattr(torch.ops.fastdiff, name).default, args)


@requires_ext
def test_calls_without_grad_skip_the_python_autograd_wrapper():
    """Under no_grad (or with no input requiring grad) the ops go below autograd directly: no Python frame
    of torch.library's autograd wrapper runs, and the outputs are the same as through it."""
    x, c = make((2, 64, 4, 4)).requires_grad_(True), make((2, 64), seed=1)
    qkv = make((2, 192, 4, 4), seed=2)

    def chain(x):
        y = ops.mp_silu_modulate(ops.mp_silu(x), c)
        y = ops.mp_sum(ops.pixel_norm(x), y, 0.3) + ops.cosine_attention(qkv, 1)
        return ops.clip(ops.mp_cat(y, x, t=0.5), 2.0)

    wrapper = os.path.join("torch", "_library", "autograd.py")
    entered = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(wrapper):
            entered.append(frame.f_code.co_name)

    with_grad = chain(x)
    assert with_grad.grad_fn is not None
    for ctx, inp in ((torch.no_grad(), x), (torch.enable_grad(), x.detach())):
        sys.setprofile(profiler)
        try:
            with ctx:
                out = chain(inp)
        finally:
            sys.setprofile(None)
        assert entered == [] and out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, with_grad.detach())


@requires_ext
def test_torch_compile_traces_through_the_ops():
    def block(x, w, g, c):
        y = ops.mp_conv(ops.mp_silu(x), w, g)
        y = ops.mp_silu_modulate(y, c)
        return ops.clip(ops.mp_sum(ops.pixel_norm(x), y, 0.3))

    x, w, g, c = make((2, 4, 6, 6)), make((4, 4, 3, 3), seed=1), torch.tensor(1.2), make((2, 4), seed=2)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, w, g, c), block(x, w, g, c), atol=1e-6)


@requires_ext
def test_autocast_mp_conv_eager_compiled_and_reference_agree():
    """Under torch.autocast the MP conv computes in the autocast dtype (activation cast, float32 weight
    normalized in float32), in eager mode, compiled, and in the reference; float64 is left alone."""
    x, w = make((2, 8, 5, 5)), make((6, 8, 3, 3), seed=1).requires_grad_(True)
    fn = lambda x, w: ops.mp_silu(ops.mp_conv(x, w, 1.5))  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, comp = fn(x, w), compiled(x, w)
        ref = R.mp_silu(R.mp_conv(x, w, 1.5))
        assert ops.mp_conv(x.double(), w.double()).dtype == torch.float64
    assert eager.dtype == comp.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(eager, comp)
    exact = R.mp_silu(R.mp_conv(x.bfloat16().double(), w.double(), 1.5))
    assert (eager.double() - exact).abs().max() < 2e-2 * exact.abs().max()
    (gw,) = torch.autograd.grad(eager.float().sum(), w)
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


@requires_ext
def test_forward_mode_ad_is_right_not_silently_zero():
    """The kernels have no forward-mode formulas; under forward AD the ops run the reference, so
    torch.func.jvp and torch.autograd.forward_ad give the true tangent (they used to give zero)."""
    import torch.autograd.forward_ad as fwAD

    x, b, c = make((2, 5, 4, 4)), make((2, 5, 4, 4), seed=1), make((2, 5), seed=2)
    w, qkv = make((3, 5, 3, 3), seed=3), make((1, 192, 3, 3), seed=4)
    cases = {
        "mp_silu": (lambda m, x: m.mp_silu(x), (x,)),
        "mp_sum": (lambda m, x, b: m.mp_sum(x, b, 0.3), (x, b)),
        "mp_cat": (lambda m, x, b: m.mp_cat(x, b, t=0.4), (x, b)),
        "pixel_norm": (lambda m, x: m.pixel_norm(x), (x,)),
        "mp_silu_modulate": (lambda m, x, c: m.mp_silu_modulate(x, c), (x, c)),
        "clip": (lambda m, x: m.clip(300 * x), (x,)),
        "mp_conv": (lambda m, x, w: m.mp_conv(x, w, 1.5), (x, w)),
        "weight_norm": (lambda m, w: m.weight_norm(w), (w,)),
        "cosine_attention": (lambda m, q: m.cosine_attention(q, 1), (qkv,)),
    }
    for name, (fn, args) in cases.items():
        tangents = tuple(torch.randn_like(a) for a in args)
        _, got = torch.func.jvp(lambda *a: fn(ops, *a), args, tangents)
        _, want = torch.func.jvp(lambda *a: fn(R, *a), args, tangents)
        assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-5), name
    with fwAD.dual_level():
        out = ops.mp_silu(fwAD.make_dual(x, torch.ones_like(x)))
        assert fwAD.unpack_dual(out).tangent is not None
    assert ops.uses_kernel("mp_silu", x)  # and outside forward AD the kernel again


# --- reference fallback, bad input ----------------------------------------------------------------


def test_use_reference_context_switches_to_reference():
    x = make((2, 3, 4, 4))
    with ops.use_reference():
        assert not ops.uses_kernel("mp_silu", x)
        assert torch.equal(ops.mp_silu(x), R.mp_silu(x))
    assert ops.uses_kernel("mp_silu", x) == ops.HAS_EXTENSION


def test_float64_and_integer_inputs_choose_the_right_path():
    assert not ops.uses_kernel("mp_silu", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError):
        ops.mp_silu(torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize("env", ["reference", "missing"])
def test_import_without_extension_falls_back_with_one_warning(env):
    code = (
        "import sys, warnings\n"
        + ("sys.modules['fastdiff._C'] = None\n" if env == "missing" else "")
        + "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, fastdiff\n"
        "    from fastdiff import ops\n"
        "    x = torch.randn(2, 3, 4, 4)\n"
        "    y = ops.mp_conv(ops.mp_silu(x), torch.randn(5, 3, 3, 3))\n"
        "msgs = [str(r.message) for r in rec if 'fastdiff' in str(r.message)]\n"
        "print(len(msgs), ops.HAS_EXTENSION, tuple(y.shape))\n"
    )
    env_vars = dict(os.environ, FASTDIFF_REFERENCE="1" if env == "reference" else "0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_vars, check=True)
    n_warn, loaded, shape = out.stdout.split(maxsplit=2)
    assert shape.strip() == "(2, 5, 4, 4)"
    if env == "missing":
        assert (n_warn, loaded) == ("1", "False"), out.stdout + out.stderr
    else:
        assert n_warn == "0"


@requires_ext
def test_bad_input_gives_clear_errors():
    fd = torch.ops.fastdiff
    x = make((2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="same shape"):
        fd.mp_sum(x, make((2, 3, 4, 5)), 0.5)
    with pytest.raises(RuntimeError, match="same dtype"):
        fd.mp_sum(x, x.double(), 0.5)
    with pytest.raises(RuntimeError, match="floating-point"):
        fd.mp_silu(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        fd.pixel_norm(torch.randn(5), 1e-4)
    with pytest.raises(RuntimeError, match=r"c of shape \[N, C\]"):
        fd.mp_silu_modulate(x, torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="match in every dim but 1"):
        fd.mp_cat(x, make((2, 3, 5, 4)), 0.5)
    with pytest.raises(RuntimeError, match="non-empty weight"):
        ops.weight_norm(torch.zeros(0, 3))
    with pytest.raises(RuntimeError, match="expected x of shape"):
        ops.mp_conv(x, make((5, 4, 3, 3)))
    with pytest.raises(RuntimeError, match="2-D .* or 4-D"):
        ops.mp_conv(x, make((5, 3, 3)))
    with pytest.raises(RuntimeError, match="scalar gain"):
        ops.mp_conv(x, make((5, 3, 3, 3)), torch.ones(2))
    with pytest.raises(RuntimeError, match="odd kernel"):
        ops.mp_conv(x, make((5, 3, 2, 2)))
    with pytest.raises(ValueError, match="2-D weight"):
        ops.mp_linear(x, make((5, 3, 3, 3)))
    with pytest.raises(RuntimeError, match="non-negative limit"):
        ops.clip(x, -1.0)


@requires_ext
def test_empty_activations_give_empty_outputs():
    e = torch.zeros(0, 3, 4, 4)
    for fn in (ops.mp_silu, ops.pixel_norm, ops.clip, lambda t: ops.mp_sum(t, t)):
        assert fn(e).shape == e.shape
    assert ops.mp_silu_modulate(e, torch.zeros(0, 3)).shape == e.shape
    assert ops.mp_conv(e, make((5, 3, 3, 3))).shape == (0, 5, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@requires_ext
def test_mixed_devices_are_rejected():
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.fastdiff.mp_sum(torch.randn(4), torch.randn(4, device="cuda"), 0.5)


def test_info_command_self_check_passes(capsys):
    from fastdiff.cli import main

    assert main(["info"]) == 0
    assert fastdiff.__version__
    if ops.HAS_EXTENSION:  # the instruction set of each CPU kernel family, e.g. "elementwise: avx512"
        out = capsys.readouterr().out
        assert f"elementwise: {_ext.isa()['elementwise']}, solver: " in out and "_isa" not in out


# --- instruction sets: every level this CPU has runs the same formulas ---------------------------------


def _host_levels():
    """The ISA levels this host can run (the active one at import and every lower one)."""
    if not ops.HAS_EXTENSION:
        return []
    top = _ext.isa()["elementwise"]
    return list(_ext.ISA_LEVELS[_ext.ISA_LEVELS.index(top):])


def _tricky(n, dtype, seed):
    """n values with every tail length's worth of randoms plus +-inf, NaN, +-0 and large magnitudes."""
    x = make((n,), torch.float64, seed=seed, scale=3.0)
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 90.0, -90.0, 104.0, -104.0, 1e30, -1e30],
                           dtype=torch.float64)
    k = min(n, special.numel())
    x[:k] = special[:k]
    return x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].to(dtype)


def assert_same_nonfinite(got, want, dtype, what):
    """NaN where the reference has NaN, the same infinities, finite values within the dtype's tolerance."""
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().flatten().tolist()} vs {want.isnan().nonzero().flatten().tolist()}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]) and not got[~inf].isinf().any(), f"{what}: infinities differ"
    fin = want.isfinite()
    scale = max(want[fin].abs().max().item(), 1.0) if fin.any() else 1.0
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= TOL[dtype] * scale * 2, f"{what}: max abs error {err:.3g} ({dtype})"


@requires_ext
@pytest.mark.parametrize("level", _host_levels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_isa_level_matches_reference_at_every_tail_length_and_at_inf_nan(level, dtype):
    with _ext.force_isa(level) as active:
        assert active["elementwise"] == level and active["solver"] == level
        for n in list(range(1, 35)) + [257]:
            x, b = _tricky(n, dtype, 1), _tricky(n, dtype, 2)
            g = make((n,), dtype, seed=3)
            assert_same_nonfinite(ops.mp_silu(x), R.mp_silu(x.double()), dtype, f"mp_silu n={n}")
            assert_same_nonfinite(torch.ops.fastdiff.mp_silu_backward(g, x),
                                  torch.func.vjp(R.mp_silu, x.double())[1](g.double())[0], dtype, f"mp_silu' n={n}")
            assert_same_nonfinite(ops.mp_sum(x, b, 0.3), R.mp_sum(x.double(), b.double(), 0.3), dtype, f"mp_sum n={n}")
            assert_same_nonfinite(ops.clip(x, 2.5), R.clip(x.double(), 2.5), dtype, f"clip n={n}")
            # Channel-wise ops on [2, n, 3] (channels-first rows of 3) and its channels-last transpose.
            y = _tricky(2 * n * 3, dtype, 4).reshape(2, n, 3)
            c = make((2, n), torch.float32, seed=5)
            for yy in (y, y.transpose(1, 2).contiguous().transpose(1, 2)):
                assert_same_nonfinite(ops.mp_silu_modulate(yy, c), R.mp_silu_modulate(yy.double(), c.double()),
                                      dtype, f"mp_silu_modulate n={n}")
                # float32 accumulation on both sides: a squared norm past float32's range is inf in both.
                assert_same_nonfinite(ops.pixel_norm(yy), R.pixel_norm(yy.float()), dtype, f"pixel_norm n={n}")
            # Finite inputs through every backward and the weight-norm rows.
            yf, gf = make((2, n, 5), dtype, seed=6), make((2, n, 5), dtype, seed=7)
            check_against_reference(ops.mp_silu_modulate, R.mp_silu_modulate, [yf, c], dtype, f"modulate n={n}")
            check_against_reference(ops.pixel_norm, R.pixel_norm, [yf], dtype, f"pixel_norm n={n}")
            check_against_reference(lambda t: ops.clip(t, 0.7), lambda t: R.clip(t, 0.7), [yf], dtype, f"clip n={n}")
            w = make((3, n, 3), dtype, seed=8)
            assert_close(ops.weight_norm(w), ref64(R.weight_norm, w), dtype, f"weight_norm n={n}",
                         R.weight_norm(w))
            x1, d1, d0 = make((2, n, 3), dtype, seed=9), make((2, n, 3), dtype, seed=10), make((2, n, 3), dtype, seed=11)
            s = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.25]), torch.tensor([1.7, 2.0])
            got = ops.solver_step(x1, d1, d0, s[2], s[0], s[1], d_prev=d0, x_base=x1)
            want = ops.solver_step_reference(x1.double(), d1.double(), d0.double(), s[2].double(), s[0].double(),
                                             s[1].double(), d_prev=d0.double(), x_base=x1.double())
            for a, r in zip(got, want):
                assert_close(a, r, dtype, f"solver_step n={n}")
    assert _ext.isa()["elementwise"] == _host_levels()[0]


@requires_ext
def test_nonfinite_values_are_the_limits():
    inv = 1 / 0.596
    x = torch.tensor([-math.inf, math.inf, math.nan, -200.0, 200.0])
    for fn in (ops.mp_silu, R.mp_silu):
        y = fn(x)
        assert y[0].item() == 0 and y[1].item() == math.inf and math.isnan(y[2].item()), fn
        assert abs(y[3].item()) < 1e-30 and abs(y[4].item() - 200 * inv) < 1e-3
    xr = x.clone().requires_grad_(True)
    R.mp_silu(xr).backward(torch.ones_like(x))
    for grad in (xr.grad, torch.ops.fastdiff.mp_silu_backward(torch.ones_like(x), x)):
        assert grad[0].item() == 0 and abs(grad[1].item() - inv) < 1e-6 and math.isnan(grad[2].item())
    a, b = torch.tensor([math.inf, -math.inf, math.inf]), torch.tensor([1.0, 1.0, -math.inf])
    for fn in (ops.mp_sum, R.mp_sum):
        y = fn(a, b, 0.3)
        assert y[0].item() == math.inf and y[1].item() == -math.inf and math.isnan(y[2].item())
    y, c = torch.tensor([[-math.inf, math.inf, math.inf]]).reshape(1, 3, 1), torch.tensor([[0.5, 0.5, -1.0]])
    for fn in (ops.mp_silu_modulate, R.mp_silu_modulate):
        out = fn(y, c).flatten()
        assert out[0].item() == 0 and out[1].item() == math.inf and math.isnan(out[2].item())  # inf * 0 = NaN
    p = torch.tensor([[1.0, math.inf, 2.0], [1.0, 2.0, 2.0]]).reshape(2, 3, 1)
    for fn in (ops.pixel_norm, R.pixel_norm):
        out = fn(p.transpose(0, 1).contiguous().transpose(0, 1)).flatten().tolist()
        assert out[0] == 0 and math.isnan(out[1]) and out[2] == 0, fn


def test_integer_inputs_to_mp_conv_linear_weight_raise():
    xi, wi = torch.ones(1, 3, 4, 4, dtype=torch.int32), torch.ones(5, 3, 3, 3, dtype=torch.int32)
    for ctx in (ops.use_reference(False), ops.use_reference(True)):
        with ctx:
            with pytest.raises(RuntimeError, match="'w' to be a floating-point tensor"):
                ops.mp_weight(wi)
            with pytest.raises(RuntimeError, match="'w' to be a floating-point tensor"):
                ops.mp_conv(torch.ones(1, 3, 4, 4), wi)
            with pytest.raises(RuntimeError, match="'x' to be a floating-point tensor"):
                ops.mp_conv(xi, wi.float())
            with pytest.raises(RuntimeError, match="'x' to be a floating-point tensor"):
                ops.mp_linear(torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3))
            with pytest.raises(RuntimeError, match="floating-point"):
                ops.mp_linear(torch.ones(2, 3), torch.ones(4, 3, dtype=torch.int32))


def test_mp_sum_and_mp_cat_reject_a_nonfinite_t():
    a = torch.randn(2, 3, 4, 4)
    for t in (math.nan, math.inf, -math.inf):
        for fn in (ops.mp_sum, R.mp_sum, lambda a, b, t: ops.mp_cat(a, b, t=t), lambda a, b, t: R.mp_cat(a, b, t=t)):
            with pytest.raises(ValueError, match="finite blend weight t"):
                fn(a, a, t)
        if ops.HAS_EXTENSION:
            with pytest.raises(RuntimeError, match="finite blend weight t"):
                torch.ops.fastdiff.mp_sum(a, a, t)


def test_reference_and_kernels_accept_empty_inputs():
    a = torch.randn(2, 0, 3, 3, requires_grad=True)
    b = torch.randn(2, 4, 3, 3, requires_grad=True)
    for fn in (ops.mp_cat, R.mp_cat):
        y = fn(a, b)  # mp_cat with an empty half: the other half keeps unit magnitude
        assert y.shape == (2, 4, 3, 3)
        assert torch.allclose(y, b * math.sqrt(4 / 4) * 0.5 / math.sqrt(0.5))
        y.sum().backward()
        assert a.grad.shape == a.shape and torch.isfinite(b.grad).all()
        a.grad = b.grad = None
    for shape in [(0, 192, 4, 4), (2, 192, 0, 4)]:
        qkv = torch.randn(shape, requires_grad=True)
        for fn in (ops.cosine_attention, R.cosine_attention):
            y = fn(qkv, 1)
            assert y.shape == (shape[0], 64, *shape[2:])
            y.sum().backward()
            assert qkv.grad.shape == qkv.shape
            qkv.grad = None
    e = torch.zeros(0, 3, 4, 4)
    for fn in (R.mp_silu, R.pixel_norm, R.clip, lambda t: R.mp_sum(t, t), lambda t: R.mp_silu_modulate(t, torch.zeros(0, 3))):
        assert fn(e).shape == e.shape


@pytest.mark.parametrize("level", ["baseline", "bogus"])
def test_fastdiff_isa_environment_variable(level):
    code = "from fastdiff.ops import _ext; print(_ext.isa())"
    env = dict(os.environ, FASTDIFF_ISA=level)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if level == "bogus":
        assert out.returncode != 0 and "FASTDIFF_ISA must be one of avx512, avx2, baseline" in out.stderr
    elif ops.HAS_EXTENSION:
        assert out.returncode == 0, out.stderr
        assert "'elementwise': 'baseline'" in out.stdout and "'attention': 'baseline'" in out.stdout


@requires_ext
@pytest.mark.parametrize("level", _host_levels())
def test_mp_silu_float32_is_within_a_few_ulp_everywhere(level):
    """The vectorized exp behind mp_silu: on a dense grid from the subnormal range of e^x to overflow of e^-x,
    the whole silu(x) / 0.596 stays within 4 ulp of the float64 value where e^x is normal (measured: 2.4)."""
    x = torch.linspace(-110.0, 100.0, 400_001)
    xd = x.double()
    want = xd * torch.sigmoid(xd) / 0.596
    with _ext.force_isa(level):
        got = ops.mp_silu(x).double()
        dgot = torch.ops.fastdiff.mp_silu_backward(torch.ones_like(x), x).double()
    normal = x > -87.0  # where sigmoid(x) = e^x / (1 + e^x) is a float32 normal
    ulp = (got - want).abs()[normal] / (want.abs()[normal] * 2.0**-23)
    assert ulp.max().item() <= 4.0, f"max error {ulp.max().item():.2f} ulp at {level}"
    # Below, e^x is subnormal (fewer bits), but the result is not flushed to 0 by an overflowing e^-x.
    tiny = ~normal & (want.abs() > 1e-40)
    assert (got[tiny] != 0).all() and (got - want).abs()[~normal].max().item() <= 2e-42
    s = torch.sigmoid(xd)
    dwant = s * (1 + xd * (1 - s)) / 0.596
    assert (dgot - dwant).abs().max().item() <= 4e-6  # the gradient's s (1 + x (1 - s)) cancels a little


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_norm_scale(dtype):
    """The public row factor of N(W): kernel and reference agree, and scaling each row by it is weight_norm."""
    w = torch.randn(6, 4, 3, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = ops.weight_norm_scale(w)
    with ops.use_reference():
        want = ops.weight_norm_scale(w)
    assert got.dtype == want.dtype == R.acc_dtype(dtype) and got.shape == (6,)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(w * got.to(dtype).reshape(-1, 1, 1, 1), R.weight_norm(w))
