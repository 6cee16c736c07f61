"""The CUDA design of issue 23, checked on the CPU: the block epilogue ops (``mp_sum_clip``,
``mp_sum_clip_silu``), the q/k/v norm that feeds ``F.scaled_dot_product_attention`` and the attention's SDPA
route, against the plain-PyTorch reference (forward, backward, odd shapes, channels_last, non-contiguous,
dtypes, empty, NaN/Inf); and the network's GPU route (``fastdiff.ops.gpu_route``: channels-last end to
end, SDPA attention, fused epilogues with the next block's mp_silu) run on the CPU by patching the switch.

Every op runs on each device present (the CPU always, CUDA where available: the same checks then test the
CUDA kernels).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import _attention, _dispatch
from fastdiff.ops import reference as R

from conftest import max_rel_err, tiny_net

requires_ext = pytest.mark.skipif(
    not ops.HAS_EXTENSION or not ops.uses_kernel("mp_sum_clip", torch.zeros(1)),
    reason="compiled extension fastdiff._C with the block epilogue kernels not built",
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def make(shape, dtype=torch.float32, seed=0, layout="contiguous", device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    if layout == "noncontig":  # every other channel of a wider tensor
        wide = list(shape)
        wide[1] *= 2
        return (torch.randn(*wide, generator=g, dtype=torch.float64) * scale).to(device, dtype)[:, ::2]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# --- mp_sum_clip / mp_sum_clip_silu --------------------------------------------------------------------------

SHAPES = [(2, 3, 5, 7), (1, 65, 4, 4), (3, 8), (2, 1, 1, 1), (2, 64, 16, 16)]
LAYOUTS = ["contiguous", "channels_last", "noncontig"]


def ref_sum_clip(a, b, t, limit, silu, dtype):
    """``R.mp_sum_clip`` in float64 with the clip deciding on the sum as stored in ``dtype`` (what the unfused
    ``clip(mp_sum(a, b))`` in ``dtype`` sees, and the kernels do): no gradient where that is beyond the limit."""
    x = R.mp_sum(a, b, t)
    keep = x.detach().to(dtype).double().abs() <= limit
    x = torch.where(keep, x, x.detach().clamp(-limit, limit))
    return (x, R.mp_silu(x)) if silu else x


@requires_ext
class TestSumClip:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape,layout", [(s, lay) for s in SHAPES for lay in LAYOUTS
                                              if lay != "channels_last" or len(s) == 4],
                             ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
    def test_forward_backward(self, shape, layout, dtype, device):
        a, b = make(shape, dtype, 0, layout, device, 3.0), make(shape, dtype, 1, layout, device, 3.0)
        limit, t = 2.5, 0.3
        for silu in (False, True):
            xa, xb = leaf(a), leaf(b)
            ra, rb = leaf(a.double()), leaf(b.double())
            got = ops.mp_sum_clip(xa, xb, t, limit, silu=silu)
            want = ref_sum_clip(ra, rb, t, limit, silu, dtype)
            got, want = (got, want) if silu else ((got,), (want,))
            for gv, wv in zip(got, want):
                assert gv.dtype == dtype and gv.shape == wv.shape
                assert max_rel_err(gv, wv) < TOL[dtype]
            if layout == "channels_last":
                assert got[0].is_contiguous(memory_format=torch.channels_last)
            gs = [make(shape, torch.float64, 7 + i).to(device) for i in range(len(got))]
            torch.autograd.backward(got, [g.to(dtype) for g in gs])
            torch.autograd.backward(want, gs)
            # bf16 / fp16: the gradient is computed from the rounded stored x; allow two roundings.
            assert max_rel_err(xa.grad, ra.grad) < 2 * TOL[dtype]
            assert max_rel_err(xb.grad, rb.grad) < 2 * TOL[dtype]

    @pytest.mark.parametrize("device", DEVICES)
    def test_uses_the_kernel_and_no_clip(self, device):
        a, b = make((2, 5, 3, 3), device=device, scale=100.0), make((2, 5, 3, 3), seed=1, device=device, scale=100.0)
        assert ops.uses_kernel("mp_sum_clip", a, b)
        assert torch.equal(ops.mp_sum_clip(a, b, 0.5, 0.0), torch.ops.fastdiff.mp_sum_clip(a, b, 0.5, 0.0))
        assert max_rel_err(ops.mp_sum_clip(a, b, 0.5, 0.0), R.mp_sum(a.double(), b.double(), 0.5)) < 1e-6
        assert ops.mp_sum_clip(a, b, 0.5, 0.0).abs().max() > 100  # limit <= 0: no clip

    @pytest.mark.parametrize("device", DEVICES)
    def test_empty(self, device):
        a = torch.zeros(0, 4, 3, 3, device=device)
        x, s = ops.mp_sum_clip(a, a, 0.5, 1.0, silu=True)
        assert x.shape == s.shape == a.shape

    @pytest.mark.parametrize("device", DEVICES)
    def test_nan_inf(self, device):
        vals = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -3.0], device=device)
        a = vals.reshape(1, 6)
        b = torch.zeros_like(a)
        x, s = ops.mp_sum_clip(a, b, 0.3, 2.0, silu=True)
        xr, sr = R.mp_sum_clip(a, b, 0.3, 2.0, silu=True)
        torch.testing.assert_close(x, xr, equal_nan=True)
        torch.testing.assert_close(s, sr, equal_nan=True)
        x = ops.mp_sum_clip(a, b, 0.3, 0.0)  # no clip: infinities survive
        torch.testing.assert_close(x, R.mp_sum(a, b, 0.3), equal_nan=True)
        # Gradient: zero where clipped (the infinities, 1e30) and at NaN, as clamp's.
        xa = leaf(a)
        ops.mp_sum_clip(xa, b, 0.3, 2.0).sum().backward()
        ra = leaf(a)
        R.mp_sum_clip(ra, b, 0.3, 2.0).sum().backward()
        torch.testing.assert_close(xa.grad, ra.grad, equal_nan=True)

    def test_gradcheck_float64(self):
        a, b = make((2, 3, 2, 3), torch.float64), make((2, 3, 2, 3), torch.float64, 1)
        fn = lambda a, b: torch.ops.fastdiff.mp_sum_clip_silu(a, b, 0.4, 0.9)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (leaf(a), leaf(b)))
        fn = lambda a, b: torch.ops.fastdiff.mp_sum_clip(a, b, 0.4, 0.9)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (leaf(a), leaf(b)))

    def test_opcheck(self):
        a, b = make((2, 3, 4, 5)), make((2, 3, 4, 5), seed=1)
        torch.library.opcheck(torch.ops.fastdiff.mp_sum_clip, (leaf(a), leaf(b), 0.3, 1.0))
        torch.library.opcheck(torch.ops.fastdiff.mp_sum_clip_silu, (leaf(a), leaf(b), 0.3, 1.0))
        cl = a.contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastdiff.mp_sum_clip_silu, (cl, b.contiguous(memory_format=torch.channels_last), 0.3, 1.0))

    def test_bad_input(self):
        a = torch.zeros(2, 3)
        with pytest.raises(ValueError, match="finite blend weight"):
            ops.mp_sum_clip(a, a, float("nan"), 1.0)
        with pytest.raises(RuntimeError, match="same shape"):
            torch.ops.fastdiff.mp_sum_clip(a, torch.zeros(2, 4), 0.5, 1.0)
        with pytest.raises(RuntimeError, match="clip limit"):
            torch.ops.fastdiff.mp_sum_clip(a, a, 0.5, float("nan"))
        with pytest.raises(RuntimeError, match="floating-point"):
            torch.ops.fastdiff.mp_sum_clip(a.long(), a.long(), 0.5, 1.0)


@requires_ext
class TestModulationCast:
    """mp_silu_modulate with the conditioning in another dtype than y (the network's float32 embedding with bf16
    activations): on CUDA the kernel reads c as it is and forms 1 + c inside; the value is the reference's on
    the float32 factor, rounded once."""

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
    def test_float32_condition(self, layout, dtype, device):
        y = make((2, 24, 5, 3), dtype, 0, layout, device)
        c = make((2, 24), torch.float32, 1, device=device)
        got = ops.mp_silu_modulate(y, c)
        want = R.mp_silu(y.double() * (1 + c.double())[:, :, None, None])
        assert got.dtype == dtype and max_rel_err(got, want) < TOL[dtype] + 2e-7
        if layout == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last)
        c2 = leaf(c[:, ::1])
        yl = leaf(y)
        ops.mp_silu_modulate(yl, c2).sum().backward()
        assert c2.grad.dtype == torch.float32 and torch.isfinite(c2.grad).all() and yl.grad.dtype == dtype


# --- the q/k/v norm and the SDPA route ----------------------------------------------------------------------

QKV_SHAPES = [(2, 1, 64, 3, 5), (1, 3, 7, 4, 4), (2, 2, 64, 1, 1), (1, 1, 1, 2, 3), (1, 2, 32, 8, 8)]  # n, heads, d, h, w
QKV_LAYOUTS = ["contiguous", "channels_last", "noncontig"]


def make_qkv(n, heads, d, h, w, dtype=torch.float32, layout="contiguous", device="cpu", seed=0):
    return make((n, 3 * heads * d, h, w), dtype, seed, layout, device)


def blhe(t):
    """Whether [N, heads, S, D] ``t`` views [N, S, heads, D] contiguous memory."""
    return t.transpose(1, 2).is_contiguous()


@requires_ext
class TestQkvNorm:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", QKV_LAYOUTS)
    @pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_forward_backward(self, shape, layout, dtype, device):
        n, heads, d, h, w = shape
        qkv = make_qkv(*shape, dtype=dtype, layout=layout, device=device)
        x, xr = leaf(qkv), leaf(qkv.double())
        got = torch.ops.fastdiff.attention_qkv_norm(x, heads, R.EPS)
        want = R.attention_qkv_norm(xr, heads)
        for gv, wv in zip(got, want):
            assert gv.shape == (n, heads, h * w, d) and gv.dtype == dtype and blhe(gv)
            assert max_rel_err(gv, wv) < TOL[dtype]
        gs = [make((n, heads, h * w, d), torch.float64, 3 + i).to(device) for i in range(3)]
        torch.autograd.backward(got, [g.to(dtype) for g in gs])
        torch.autograd.backward(want, gs)
        assert x.grad.shape == qkv.shape
        # With one channel per head dx = s g - k x cancels to ~eps / |x|^2 of its terms: a float32 result keeps
        # fewer bits there (about log2(|x| / eps) fewer), so allow more for that degenerate shape.
        assert max_rel_err(x.grad, xr.grad) < (2 if d > 1 else 50) * TOL[dtype]
        if layout == "channels_last":
            assert x.grad.is_contiguous(memory_format=torch.channels_last)

    def test_reference_layout_and_values(self):
        # The reference (the fallback) writes the same memory as the kernel, and its values are EDM2's
        # per-head pixel norm of the official [N, heads, D, 3, HW] view.
        qkv = make_qkv(2, 2, 5, 3, 3, torch.float64)
        q, k, v = R.attention_qkv_norm(qkv, 2)
        assert blhe(q) and blhe(k) and blhe(v)
        x = qkv.reshape(2, 2, 5, 3, 9)
        for j, t in enumerate((q, k, v)):
            xj = x[:, :, :, j].transpose(2, 3)  # [N, heads, S, D]
            want = xj / (R.EPS + xj.norm(dim=3, keepdim=True) / 5**0.5)
            torch.testing.assert_close(t, want, rtol=1e-12, atol=1e-14)

    def test_one_output_used(self):
        qkv = make_qkv(1, 2, 8, 2, 2)
        x, xr = leaf(qkv), leaf(qkv.double())
        torch.ops.fastdiff.attention_qkv_norm(x, 2, R.EPS)[1].sum().backward()
        R.attention_qkv_norm(xr, 2)[1].sum().backward()
        assert max_rel_err(x.grad, xr.grad) < 1e-5

    def test_zero_pixel(self):
        qkv = make_qkv(1, 1, 64, 2, 2)
        qkv[:, :, 0, 0] = 0
        x = leaf(qkv)
        q, k, v = torch.ops.fastdiff.attention_qkv_norm(x, 1, R.EPS)
        assert (q[:, :, 0] == 0).all() and torch.isfinite(q).all()
        (q.sum() + k.sum() + v.sum()).backward()
        assert torch.isfinite(x.grad).all()

    def test_nan_inf_spread_per_pixel(self):
        qkv = make_qkv(1, 1, 4, 2, 2, torch.float64)
        qkv[0, 0, 0, 0] = float("nan")  # q of pixel 0 (channel (c=0, j=0))
        qkv[0, 4, 0, 1] = float("inf")  # k of pixel 1 (channel (c=1, j=1))
        got = torch.ops.fastdiff.attention_qkv_norm(qkv, 1, R.EPS)
        want = R.attention_qkv_norm(qkv, 1)
        for gv, wv in zip(got, want):
            torch.testing.assert_close(gv, wv, equal_nan=True)
        assert torch.isnan(got[0][0, 0, 0]).all() and torch.isfinite(got[0][0, 0, 1:]).all()

    def test_empty(self):
        for shape in ((0, 1, 64, 2, 2), (1, 1, 64, 0, 3)):
            q, k, v = torch.ops.fastdiff.attention_qkv_norm(make_qkv(*shape), 1, R.EPS)
            assert q.shape == (shape[0], 1, shape[3] * shape[4], 64)

    def test_opcheck(self):
        torch.library.opcheck(torch.ops.fastdiff.attention_qkv_norm, (leaf(make_qkv(2, 2, 8, 3, 3)), 2, R.EPS))
        cl = make_qkv(1, 1, 8, 3, 3, layout="channels_last")
        torch.library.opcheck(torch.ops.fastdiff.attention_qkv_norm, (leaf(cl), 1, R.EPS))

    def test_gradcheck_float64(self):
        qkv = make_qkv(1, 2, 3, 2, 2, torch.float64)
        assert torch.autograd.gradcheck(lambda x: torch.ops.fastdiff.attention_qkv_norm(x, 2, R.EPS), (leaf(qkv),))

    def test_bad_input(self):
        with pytest.raises(RuntimeError, match="multiple of 3 \\* num_heads"):
            torch.ops.fastdiff.attention_qkv_norm(torch.zeros(1, 10, 2, 2), 1, R.EPS)
        with pytest.raises(RuntimeError, match="\\[N, 3C, H, W\\]"):
            torch.ops.fastdiff.attention_qkv_norm(torch.zeros(1, 12, 4), 1, R.EPS)
        q = torch.zeros(1, 1, 4, 4)
        with pytest.raises(RuntimeError, match="grad_k"):
            torch.ops.fastdiff.attention_qkv_norm_backward(q, torch.zeros(1, 1, 4, 3), q, torch.zeros(1, 12, 2, 2), 1, R.EPS)


ATT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _cpu_sdpa_supports(dtype) -> bool:
    try:
        q = torch.zeros(1, 1, 2, 4, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


@requires_ext
class TestSdpaRoute:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("layout", QKV_LAYOUTS)
    @pytest.mark.parametrize("shape", [(2, 1, 64, 3, 5), (1, 2, 64, 8, 8), (1, 3, 32, 4, 4)],
                             ids=lambda s: "x".join(map(str, s)))
    def test_vs_reference_and_kernel(self, shape, layout, dtype, device):
        if device == "cpu" and not _cpu_sdpa_supports(dtype):
            pytest.skip(f"this CPU build of torch has no scaled_dot_product_attention for {dtype}")
        n, heads, d, h, w = shape
        qkv = make_qkv(*shape, dtype=dtype, layout=layout, device=device)
        x, xr = leaf(qkv), leaf(qkv.double())
        y = ops.cosine_attention(x, heads, impl="sdpa")
        y_ref = R.cosine_attention(xr, heads)
        assert y.shape == y_ref.shape and y.dtype == dtype
        assert max_rel_err(y, y_ref) < ATT_TOL[dtype]
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert y.is_contiguous()
        g = make(y.shape, torch.float64, 5).to(device)
        y.backward(g.to(dtype))
        y_ref.backward(g)
        assert max_rel_err(x.grad, xr.grad) < 2 * ATT_TOL[dtype]
        if d == 64 and ops.uses_kernel("cosine_attention", qkv):  # and against our tiled kernel
            xk = leaf(qkv)
            yk = ops.cosine_attention(xk, heads, impl="kernel")
            assert max_rel_err(y, yk) < 2 * ATT_TOL[dtype]
            yk.backward(g.to(dtype))
            assert max_rel_err(x.grad, xk.grad) < 4 * ATT_TOL[dtype]

    def test_reference_sdpa_form(self):
        qkv = make_qkv(2, 2, 16, 3, 3, torch.float64)
        torch.testing.assert_close(R.cosine_attention_sdpa(qkv, 2), R.cosine_attention(qkv, 2), rtol=1e-10, atol=1e-12)

    def test_auto_route(self, monkeypatch):
        qkv = make_qkv(1, 1, 64, 2, 2)
        assert ops.attention_impl(qkv, 1) == "kernel"  # CPU: our tiled kernel
        assert ops.attention_impl(make_qkv(1, 1, 32, 2, 2), 1) == "reference"
        with ops.use_gpu_route():
            assert ops.gpu_route(qkv)
            assert ops.attention_impl(qkv, 1) == "sdpa"
            assert ops.attention_impl(qkv.double(), 1) == "kernel"  # float64 keeps the tiled kernel
        assert not ops.gpu_route(qkv)
        with pytest.raises(ValueError, match="impl"):
            ops.cosine_attention(qkv, 1, impl="flash")
        with pytest.raises(ValueError, match="64 channels per head"):
            ops.cosine_attention(make_qkv(1, 1, 32, 2, 2), 1, impl="kernel")


# --- the network's GPU route, run on the CPU ---------------------------------------------------------------


def _spy_layouts(net, seen):
    def hook(mod, inp, out):
        x = out[0] if isinstance(out, tuple) else out
        if x.ndim == 4:
            seen.append((type(mod).__name__, x.is_contiguous(memory_format=torch.channels_last)))
    return [m.register_forward_hook(hook) for m in net.modules() if type(m).__name__ in ("Block", "MPConv")]


@requires_ext
class TestNetworkGpuRoute:
    def _inputs(self, net, n=2):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(n, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
        return x, torch.rand(n, generator=g) + 0.1, torch.eye(net.label_dim)[:n] if net.label_dim else None

    def test_eval_matches_cpu_route_channels_last_throughout(self, monkeypatch):
        net = tiny_net().eval()
        x, noise, labels = self._inputs(net)
        with torch.no_grad():
            want = net(x, noise, labels)
            monkeypatch.setattr(_dispatch, "_force_gpu", [True])
            calls = []
            real = ops.mp_sum_clip
            monkeypatch.setattr(ops, "mp_sum_clip", lambda *a, **k: calls.append(k.get("silu", False)) or real(*a, **k))
            seen = []
            hooks = _spy_layouts(net, seen)
            got = net(x, noise, labels)
            for h in hooks:
                h.remove()
        assert got.is_contiguous() and got.shape == want.shape
        assert max_rel_err(got, want) < 1e-4
        assert seen and all(cl for _, cl in seen), [s for s in seen if not s[1]]  # no NCHW activation anywhere
        assert True in calls  # a fused epilogue handed the next block its mp_silu

    def test_training_gradients_match(self, monkeypatch):
        net = tiny_net().train()
        x, noise, labels = self._inputs(net)
        params = [p for n, p in net.named_parameters() if not n.startswith("logvar")]  # logvar: unused here
        loss = net(x, noise, labels).square().sum()
        want = torch.autograd.grad(loss, params)
        monkeypatch.setattr(_dispatch, "_force_gpu", [True])
        loss2 = net(x, noise, labels).square().sum()
        got = torch.autograd.grad(loss2, params)
        assert abs(loss2.item() - loss.item()) <= 1e-4 * abs(loss.item())
        for gv, wv in zip(got, want):
            assert max_rel_err(gv, wv) < 1e-3

    def test_cpu_route_takes_none_of_it(self, monkeypatch):
        net = tiny_net().eval()
        x, noise, labels = self._inputs(net)
        for name in ("mp_sum_clip", "attention_qkv_norm"):
            monkeypatch.setattr(ops, name, lambda *a, **k: pytest.fail("GPU route taken on the CPU"))
        monkeypatch.setattr(_attention, "attention_qkv_norm", lambda *a, **k: pytest.fail("GPU route taken on the CPU"))
        with torch.no_grad():
            assert net(x, noise, labels).is_contiguous()


def _layout_cases():
    w3 = make((6, 6, 3, 3), seed=9)
    w1 = make((6, 6, 1, 1), seed=8)
    g = torch.tensor(1.3)
    return {
        "mp_silu": (lambda x, y, c: ops.mp_silu(x), lambda x, y, c: R.mp_silu(x)),
        "mp_sum": (lambda x, y, c: ops.mp_sum(x, y, 0.3), lambda x, y, c: R.mp_sum(x, y, 0.3)),
        "mp_cat": (lambda x, y, c: ops.mp_cat(x, y, t=0.4), lambda x, y, c: R.mp_cat(x, y, t=0.4)),
        "pixel_norm": (lambda x, y, c: ops.pixel_norm(x), lambda x, y, c: R.pixel_norm(x)),
        "mp_silu_modulate": (lambda x, y, c: ops.mp_silu_modulate(x, c), lambda x, y, c: R.mp_silu_modulate(x, c)),
        "clip": (lambda x, y, c: ops.clip(4 * x, 2.0), lambda x, y, c: R.clip(4 * x, 2.0)),
        "mp_sum_clip": (lambda x, y, c: ops.mp_sum_clip(x, y, 0.3, 1.0), lambda x, y, c: R.mp_sum_clip(x, y, 0.3, 1.0)),
        "mp_sum_clip_silu": (lambda x, y, c: ops.mp_sum_clip(x, y, 0.3, 1.0, silu=True)[1],
                             lambda x, y, c: R.mp_sum_clip(x, y, 0.3, 1.0, silu=True)[1]),
        "mp_conv 3x3": (lambda x, y, c: ops.mp_conv(x, w3, g), lambda x, y, c: R.mp_conv(x, w3.double(), g)),
        "mp_conv 1x1": (lambda x, y, c: ops.mp_conv(x, w1, g), lambda x, y, c: R.mp_conv(x, w1.double(), g)),
        "cosine_attention sdpa": (lambda x, y, c: ops.cosine_attention(torch.cat([x, y, x], 1), 1, impl="sdpa"),
                                  lambda x, y, c: R.cosine_attention(torch.cat([x, y, x], 1), 1)),
    }


@requires_ext
@pytest.mark.parametrize("name", list(_layout_cases()))
def test_channels_last_in_channels_last_out(name):
    """Every op of the GPU route on channels-last input: the reference's values, and channels-last output (no
    layout copy for the next op to undo)."""
    fn, ref = _layout_cases()[name]
    x, y = (make((2, 6, 5, 7), seed=s, layout="channels_last") for s in (0, 1))
    c = make((2, 6), seed=2)
    got = fn(x, y, c)
    want = ref(x.double(), y.double(), c.double())
    assert max_rel_err(got, want) < 1e-5
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
