"""The fused EDM2 cosine attention vs an explicit float64 reference: forward (y and lse), backward through
autograd, gradcheck, layouts, dtypes, bad input and the torch.library contract (opcheck)."""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import reference as R

from conftest import max_rel_err as rel_err

requires_ext = pytest.mark.skipif(
    not ops.HAS_EXTENSION or not ops.uses_kernel("cosine_attention", torch.zeros(1)),
    reason="compiled extension fastdiff._C with a CPU cosine_attention kernel not built",
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Max error relative to the reference's largest magnitude (y's entries are O(1)); half types round the
# output (and the gradient) to 8 / 11 mantissa bits.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
# (batch, heads, H, W): HW in {1, 7, 64, 256, 1024}; big maps at batch 1 and few heads.
SHAPES = [(2, 1, 1, 1), (2, 3, 1, 7), (2, 2, 8, 8), (3, 12, 2, 3), (1, 3, 16, 16), (1, 1, 32, 32)]


def make_qkv(n, heads, h, w, dtype=torch.float32, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    c3 = 3 * 64 * heads
    if layout == "channel_slice":  # a slice of a bigger channel dim: non-contiguous
        big = torch.randn(n, c3 + 5, h, w, generator=g, dtype=torch.float64).to(dtype)
        return big[:, 2 : 2 + c3]
    if layout == "transposed":  # H and W swapped by a view
        return torch.randn(n, c3, w, h, generator=g, dtype=torch.float64).to(dtype).transpose(2, 3)
    if layout == "channels_last":
        return torch.randn(n, c3, h, w, generator=g, dtype=torch.float64).to(dtype).contiguous(
            memory_format=torch.channels_last
        )
    return torch.randn(n, c3, h, w, generator=g, dtype=torch.float64).to(dtype)


def explicit_reference(qkv: torch.Tensor, heads: int):
    """y and lse in float64, written out step by step (independent of fastdiff.ops.reference)."""
    x = qkv.double()
    n, c3, h, w = x.shape
    x = x.reshape(n, heads, 64, 3, h * w)
    norm = torch.sqrt((x * x).sum(dim=2, keepdim=True))
    x = x / (1e-4 + norm / math.sqrt(64))
    q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]  # [n, heads, 64, HW]
    scores = torch.einsum("nhci,nhcj->nhij", q, k) / math.sqrt(64)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    y = torch.einsum("nhij,nhcj->nhci", p, v)
    return y.reshape(n, c3 // 3, h, w), lse


@requires_ext
class TestForward:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_parity(self, shape, dtype):
        n, heads, h, w = shape
        qkv = make_qkv(n, heads, h, w, dtype)
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, heads)
        y_ref, lse_ref = explicit_reference(qkv, heads)
        assert y.dtype == dtype and y.shape == (n, 64 * heads, h, w)
        assert lse.dtype == torch.float32 and lse.shape == (n, heads, h * w)
        assert rel_err(y, y_ref) < TOL[dtype]
        assert (lse.double() - lse_ref).abs().max().item() < 1e-5 * max(1.0, lse_ref.abs().max().item())
        # The public entry point takes the kernel and agrees with fastdiff's own reference.
        assert ops.uses_kernel("cosine_attention", qkv)
        assert rel_err(ops.cosine_attention(qkv, heads), R.cosine_attention(qkv.double(), heads)) < TOL[dtype]

    @pytest.mark.parametrize("layout", ["channel_slice", "transposed", "channels_last"])
    def test_non_contiguous(self, layout):
        qkv = make_qkv(2, 2, 3, 5, layout=layout)
        assert not qkv.is_contiguous()
        y, _ = torch.ops.fastdiff.cosine_attention(qkv, 2)
        assert rel_err(y, explicit_reference(qkv, 2)[0]) < TOL[torch.float32]

    def test_float64(self):
        qkv = make_qkv(1, 2, 3, 3, torch.float64)
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, 2)
        y_ref, lse_ref = explicit_reference(qkv, 2)
        assert lse.dtype == torch.float64
        assert rel_err(y, y_ref) < 1e-12 and (lse - lse_ref).abs().max().item() < 1e-12

    def test_extreme_inputs(self):
        # zero pixels (norm 0), huge and tiny magnitudes: cosine attention is scale-invariant per pixel.
        qkv = make_qkv(1, 1, 4, 4)
        qkv[:, :, 0, 0] = 0
        qkv[:, :, 1] *= 1e4
        qkv[:, :, 2] *= 1e-3
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, 1)
        y_ref, lse_ref = explicit_reference(qkv, 1)
        assert torch.isfinite(y).all() and torch.isfinite(lse).all()
        assert rel_err(y, y_ref) < 1e-4

    def test_deterministic(self):
        qkv = make_qkv(1, 3, 9, 11)
        a = torch.ops.fastdiff.cosine_attention(qkv, 3)[0]
        b = torch.ops.fastdiff.cosine_attention(qkv, 3)[0]
        assert torch.equal(a, b)


def grads(fn, qkv, heads, seed=1):
    x = qkv.detach().clone().requires_grad_(True)
    y = fn(x, heads)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    return gx


def fused(x, heads):
    return torch.ops.fastdiff.cosine_attention(x, heads)[0]


@requires_ext
class TestBackward:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
    def test_parity(self, shape, dtype):
        n, heads, h, w = shape
        qkv = make_qkv(n, heads, h, w, dtype)
        got = grads(fused, qkv, heads)
        want = grads(lambda x, hd: explicit_reference(x, hd)[0], qkv.double(), heads)
        assert got.dtype == dtype and got.shape == qkv.shape
        # bf16 / fp16: the incoming gradient and y are rounded too, so allow a little more than forward.
        assert rel_err(got, want) < 2 * TOL[dtype]

    def test_parity_1024(self):
        qkv = make_qkv(1, 1, 32, 32)
        got = grads(fused, qkv, 1)
        want = grads(lambda x, hd: explicit_reference(x, hd)[0], qkv.double(), 1)
        assert rel_err(got, want) < 5 * TOL[torch.float32]

    @pytest.mark.parametrize("layout", ["channel_slice", "transposed"])
    def test_non_contiguous(self, layout):
        qkv = make_qkv(2, 2, 3, 5, layout=layout)
        got = grads(fused, qkv, 2)
        want = grads(lambda x, hd: explicit_reference(x, hd)[0], qkv.double(), 2)
        assert rel_err(got, want) < 2 * TOL[torch.float32]

    def test_through_public_entry_point(self):
        qkv = make_qkv(2, 3, 4, 4)
        got = grads(ops.cosine_attention, qkv, 3)
        want = grads(R.cosine_attention, qkv.double(), 3)
        assert rel_err(got, want) < 2 * TOL[torch.float32]

    def test_gradcheck_float64(self):
        qkv = make_qkv(1, 2, 1, 5, torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: fused(x, 2), (qkv,), eps=1e-6, atol=1e-6, rtol=1e-4)

    def test_zero_pixel_gradient_is_finite(self):
        # At x = 0 the norm is not differentiable; like torch.linalg.vector_norm (fastdiff's reference)
        # the kernel takes the norm's gradient there as 0, so dN(x)/dx = 1/eps.
        qkv = make_qkv(1, 1, 2, 2)
        qkv[:, :, 0, 0] = 0
        gx = grads(fused, qkv, 1)
        assert torch.isfinite(gx).all()
        want = grads(R.cosine_attention, qkv.double(), 1)
        assert rel_err(gx, want) < 2 * TOL[torch.float32]

    def test_deterministic(self):
        qkv = make_qkv(1, 2, 12, 13)
        assert torch.equal(grads(fused, qkv, 2), grads(fused, qkv, 2))

    def test_same_bits_for_any_thread_count(self):
        # 3 heads: with 1 thread the backward runs one task per head (both passes fused), with 2 threads
        # separate key-tile and query-tile tasks; the accumulation order, hence every bit, is the same.
        qkv = make_qkv(1, 3, 13, 17)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = grads(fused, qkv, 3)
            torch.set_num_threads(2)
            two = grads(fused, qkv, 3)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(one, two)


@requires_ext
class TestContract:
    def test_opcheck(self):
        qkv = make_qkv(1, 2, 3, 3).requires_grad_(True)
        torch.library.opcheck(torch.ops.fastdiff.cosine_attention.default, (qkv, 2))

    def test_opcheck_backward_op(self):
        qkv = make_qkv(1, 1, 2, 3)
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, 1)
        g = torch.randn_like(y)
        torch.library.opcheck(torch.ops.fastdiff.cosine_attention_backward.default, (g, qkv, y, lse, 1))

    def test_fake_shapes(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            qkv = torch.empty(2, 3 * 64 * 3, 4, 5, dtype=torch.bfloat16)
            y, lse = torch.ops.fastdiff.cosine_attention(qkv, 3)
            assert y.shape == (2, 192, 4, 5) and y.dtype == torch.bfloat16
            assert lse.shape == (2, 3, 20) and lse.dtype == torch.float32

    def test_other_head_dim_falls_back(self):
        qkv = make_qkv(1, 1, 2, 2)[:, : 3 * 32]  # 32 channels per head
        y = ops.cosine_attention(qkv, 1)
        assert y.shape == (1, 32, 2, 2)


@requires_ext
class TestBadInput:
    def test_channels_not_matching_heads(self):
        with pytest.raises(RuntimeError, match="64 channels per head"):
            torch.ops.fastdiff.cosine_attention(torch.randn(1, 3 * 64 * 2, 2, 2), 3)
        with pytest.raises(RuntimeError, match="64 channels per head"):
            torch.ops.fastdiff.cosine_attention(torch.randn(1, 100, 2, 2), 1)

    def test_wrong_rank(self):
        with pytest.raises(RuntimeError, match=r"\[N, 3C, H, W\]"):
            torch.ops.fastdiff.cosine_attention(torch.randn(192, 4), 1)
        with pytest.raises(ValueError, match=r"\[N, 3C, H, W\]"):
            ops.cosine_attention(torch.randn(1, 192, 4), 1)

    def test_integer_dtype(self):
        with pytest.raises(RuntimeError, match="floating-point"):
            torch.ops.fastdiff.cosine_attention(torch.ones(1, 192, 2, 2, dtype=torch.int32), 1)

    def test_bad_heads(self):
        with pytest.raises(RuntimeError, match="num_heads"):
            torch.ops.fastdiff.cosine_attention(torch.randn(1, 192, 2, 2), 0)
        with pytest.raises(ValueError, match="divisible"):
            ops.cosine_attention(torch.randn(1, 192, 2, 2), 5)

    def test_backward_mismatched_lse(self):
        qkv = make_qkv(1, 1, 2, 2)
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, 1)
        with pytest.raises(RuntimeError, match="lse"):
            torch.ops.fastdiff.cosine_attention_backward(y, qkv, y, lse[:, :, :3], 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _needs_kernel(self):
        if not ops.HAS_EXTENSION or not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fastdiff::cosine_attention", "CUDA"
        ):
            pytest.skip("fastdiff._C built without the CUDA cosine attention kernel")

    @pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
    @pytest.mark.parametrize(
        "shape",
        [(2, 1, 1, 1), (2, 3, 1, 7), (2, 2, 8, 8), (3, 12, 2, 3), (2, 3, 16, 16), (1, 2, 32, 32), (1, 1, 64, 64)],
        ids=lambda s: "x".join(map(str, s)),
    )
    def test_forward_backward(self, shape, dtype):
        n, heads, h, w = shape
        qkv = make_qkv(n, heads, h, w, dtype).cuda()
        y, lse = torch.ops.fastdiff.cosine_attention(qkv, heads)
        y_ref, lse_ref = explicit_reference(qkv.cpu(), heads)
        assert y.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(y.cpu(), y_ref) < TOL[dtype]
        assert (lse.cpu().double() - lse_ref).abs().max().item() < 1e-4
        got = grads(fused, qkv, heads).cpu()
        want = grads(lambda x, hd: explicit_reference(x, hd)[0], qkv.cpu().double(), heads)
        assert rel_err(got, want) < 2 * TOL[dtype]

    def test_non_contiguous(self):
        qkv = make_qkv(2, 2, 5, 3, layout="transposed").cuda()
        y, _ = torch.ops.fastdiff.cosine_attention(qkv, 2)
        assert rel_err(y.cpu(), explicit_reference(qkv.cpu(), 2)[0]) < TOL[torch.float32]

    def test_gradcheck_float64(self):
        qkv = make_qkv(1, 2, 1, 5, torch.float64).cuda().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: fused(x, 2), (qkv,), eps=1e-6, atol=1e-6, rtol=1e-4)
