"""fastdiff.ops.solver_step: the fused kernel against its plain-PyTorch reference."""

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import _ext
from fastdiff.ops.reference import solver_step_reference

HAS_CPU = _ext.has_kernel("solver_step", "cpu")
HAS_CUDA = torch.cuda.is_available() and _ext.has_kernel("solver_step", "cuda")

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, dtype, device="cpu", guided=True, heun=False, seed=0, per_sample_w=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    n = shape[0]
    x, d1 = mk(), mk()
    d0 = mk() if guided else None
    sc = (torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1).to(device)
    sn = sc * 0.7
    w = (torch.rand(n, generator=g, dtype=torch.float64) * 3).to(device) if per_sample_w else 2.5
    dp, xb = (mk(), mk()) if heun else (None, None)
    return dict(x=x, d1=d1, d0=d0, w=w, sigma_cur=sc, sigma_next=sn, d_prev=dp, x_base=xb)


def _kernel(args):
    n = args["x"].shape[0]
    acc = torch.float64 if args["x"].dtype == torch.float64 else torch.float32
    ps = lambda v: (v if isinstance(v, torch.Tensor) else torch.full((n,), float(v), dtype=torch.float64)).to(args["x"].device, acc)  # noqa: E731
    return torch.ops.fastdiff.solver_step(
        args["x"], args["d1"], args["d0"], ps(args["w"]), ps(args["sigma_cur"]), ps(args["sigma_next"]),
        args["d_prev"], args["x_base"],
    )


def _compare(got, want, dtype):
    tol = TOL[dtype]
    for a, b, name in zip(got, want, ("x_next", "d", "denoised")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        scale = b.double().abs().max().clamp_min(1.0)
        err = (a.double() - b.double()).abs().max() / scale
        assert err <= tol, f"{name}: max rel err {err:.3g} > {tol}"


def _reference_formula(x, d1, d0, w, sigma_cur, sigma_next, d_prev=None, x_base=None):
    """The step written out directly in float64."""
    sh = (-1,) + (1,) * (x.ndim - 1)
    sc, sn = sigma_cur.double().reshape(sh), sigma_next.double().reshape(sh)
    w = w.double().reshape(sh) if isinstance(w, torch.Tensor) else w
    D = d1.double() if d0 is None else d0.double() + w * (d1.double() - d0.double())
    if d_prev is None:
        d = (x.double() - D) / sc
        return x.double() + (sn - sc) * d, d, D
    d = (x.double() - D) / sn
    return x_base.double() + (sn - sc) * (d_prev.double() + d) / 2, d, D


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("heun", [False, True])
def test_reference_matches_formula(guided, heun):
    a = _inputs((3, 2, 5, 7), torch.float64, guided=guided, heun=heun)
    got = solver_step_reference(**a)
    want = _reference_formula(**a)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_CPU, reason="fastdiff._C without a CPU solver_step kernel (extension not built)")
class TestCPU:
    device = "cpu"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("guided", [False, True])
    @pytest.mark.parametrize("heun", [False, True])
    def test_parity(self, dtype, guided, heun):
        a = _inputs((5, 3, 7, 9), dtype, self.device, guided=guided, heun=heun)
        _compare(_kernel(a), solver_step_reference(**a), dtype)

    @pytest.mark.parametrize("shape", [(1, 1), (7, 1, 1, 1), (2, 3, 33, 17), (3, 4099), (4, 2, 3, 5, 7)])
    def test_odd_shapes(self, shape):
        a = _inputs(shape, torch.float32, self.device, guided=True, heun=True)
        _compare(_kernel(a), solver_step_reference(**a), torch.float32)

    def test_large_parallel(self):
        # Several threads' ranges, each crossing sample boundaries.
        a = _inputs((3, 5, 61, 97), torch.float32, self.device, guided=True, heun=False)
        _compare(_kernel(a), solver_step_reference(**a), torch.float32)

    def test_non_contiguous_and_channels_last(self):
        a = _inputs((4, 6, 10, 12), torch.float32, self.device, guided=True, heun=True)
        b = dict(a)
        b["x"] = a["x"].contiguous(memory_format=torch.channels_last)  # dense, sample-major: kept as is
        b["d1"] = a["d1"].transpose(2, 3).contiguous().transpose(2, 3)  # other layout: copied
        b["d0"] = torch.stack([a["d0"], torch.zeros_like(a["d0"])], dim=-1)[..., 0]  # strided view
        b["d_prev"] = a["d_prev"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # batch not outermost
        got = _kernel(b)
        _compare(got, solver_step_reference(**a), torch.float32)
        assert got[0].is_contiguous(memory_format=torch.channels_last)

    def test_scalar_w_and_sigma_via_wrapper(self):
        a = _inputs((3, 2, 4, 4), torch.float32, self.device, guided=True, per_sample_w=False)
        a["sigma_cur"], a["sigma_next"] = 2.0, 1.5
        assert ops.uses_kernel("solver_step", a["x"]) or _ext.FORCE_REFERENCE
        _compare(ops.solver_step(**a), solver_step_reference(**a), torch.float32)

    def test_empty_batch(self):
        a = _inputs((0, 3, 4, 4), torch.float32, self.device, guided=True)
        a["w"] = torch.zeros(0, dtype=torch.float64)
        out = _kernel(a)
        assert all(t.shape == (0, 3, 4, 4) for t in out)

    def test_errors(self):
        a = _inputs((2, 3, 4, 4), torch.float32, self.device, guided=True, heun=True)
        bad = dict(a, d0=a["d0"][:, :2])
        with pytest.raises(RuntimeError, match="same shape"):
            _kernel(bad)
        bad = dict(a, d1=a["d1"].double())
        with pytest.raises(RuntimeError, match="same dtype"):
            _kernel(bad)
        bad = dict(a, sigma_cur=a["sigma_cur"][:1].expand(3).contiguous())
        with pytest.raises(RuntimeError, match=r"shape \[N\]"):
            _kernel(bad)
        bad = dict(a, x_base=None)
        with pytest.raises(RuntimeError, match="go together"):
            _kernel(bad)

    def test_not_differentiable(self):
        a = _inputs((2, 3, 4, 4), torch.float32, self.device, guided=True)
        a["d1"].requires_grad_(True)
        with pytest.raises(RuntimeError, match="not differentiable"):
            ops.solver_step(**a)
        with torch.no_grad():
            ops.solver_step(**a)

    def test_opcheck_fake(self):
        a = _inputs((3, 2, 5, 5), torch.float32, self.device, guided=True, heun=True)
        n = 3
        args = (a["x"], a["d1"], a["d0"], a["w"].float(), a["sigma_cur"].float(), a["sigma_next"].float(), a["d_prev"], a["x_base"])
        utils = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.fastdiff.solver_step.default, args, test_utils=utils)
        # Output layout follows a channels-last x; a permuted batch dim gives contiguous outputs.
        cl = (a["x"].contiguous(memory_format=torch.channels_last),) + args[1:]
        torch.library.opcheck(torch.ops.fastdiff.solver_step.default, cl, test_utils=utils)
        pb = (a["x"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),) + args[1:]
        torch.library.opcheck(torch.ops.fastdiff.solver_step.default, pb, test_utils=utils)
        assert n == a["x"].shape[0]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and the CUDA solver_step kernel")
class TestCUDA(TestCPU):
    device = "cuda"

    def test_matches_cpu_kernel(self):
        a = _inputs((4, 3, 17, 19), torch.float32, "cpu", guided=True, heun=True)
        b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        for u, v in zip(_kernel(b), _kernel(a)):
            torch.testing.assert_close(u.cpu(), v, rtol=1e-5, atol=1e-5)

    def test_scalar_fallback_paths(self):
        # Per-sample length not a multiple of the 16-byte vector width.
        a = _inputs((3, 1029), torch.float16, "cuda", guided=True, heun=True)
        _compare(_kernel(a), solver_step_reference(**a), torch.float16)
        # Contiguous but misaligned data pointers.
        a = _inputs((3, 1024), torch.float32, "cuda", guided=True, heun=True)
        a = {k: (torch.cat([v.new_zeros(1), v.flatten()])[1:].view(v.shape) if isinstance(v, torch.Tensor) and v.ndim == 2 else v)
             for k, v in a.items()}
        _compare(_kernel(a), solver_step_reference(**a), torch.float32)
