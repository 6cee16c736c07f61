"""Every fused CUDA kernel once, forward and backward, on small odd shapes: a driver short enough to run
under compute-sanitizer (memcheck, racecheck, initcheck, synccheck), which slows kernels a hundredfold.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python tools/cuda_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/cuda_smoke.py

Each result is also compared with the plain-PyTorch reference (loosely: this is a sanitizer driver, the
exact tolerances live in tests/test_cuda_ops.py); exits 1 on a mismatch, 0 when everything ran and agreed.
FASTDIFF_SMOKE_DEVICE=cpu runs the same calls on the CPU kernels (the test suite does, so it cannot rot).
TF32 is off: mp_conv's cuDNN / cuBLAS convolution would otherwise round its inputs to 10 mantissa bits and
report a false mismatch against the float32 reference.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdiff import ops  # noqa: E402
from fastdiff.ops import reference as R  # noqa: E402

DEVICE = os.environ.get("FASTDIFF_SMOKE_DEVICE", "cuda")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check(name, got, want, dtype, failures):
    err = _rel(got, want)
    ok = err <= TOL[dtype]
    print(f"  {name:40s} {str(dtype):15s} rel. error {err:.1e} {'ok' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        failures.append(name)


def _fwd_bwd(name, fn, ref, inputs, dtype, failures):
    """fn(*inputs) vs ref(*inputs), and the gradients of a random projection of the output."""
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    xr = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y, yr = fn(*xs), ref(*xr)
    _check(name, y, yr, dtype, failures)
    g = torch.randn_like(yr)
    grads = torch.autograd.grad(y, [t for t in xs if t.requires_grad], g)
    grads_r = torch.autograd.grad(yr, [t for t in xr if t.requires_grad], g)
    for i, (a, b) in enumerate(zip(grads, grads_r)):
        _check(f"{name} grad[{i}]", a, b, dtype, failures)


def _unfused_sum_clip(a, b, t, limit, silu):
    x = ops.clip(ops.mp_sum(a, b, t), limit)
    return (x, ops.mp_silu(x)) if silu else x


def _cat(out):
    """One tensor from an op's output (a tuple's members flattened and concatenated)."""
    return torch.cat([t.reshape(-1) for t in out]) if isinstance(out, tuple) else out


def main() -> int:
    if not ops.HAS_EXTENSION or (DEVICE == "cuda" and not torch.cuda.is_available()):
        print("needs the compiled extension (and a CUDA GPU unless FASTDIFF_SMOKE_DEVICE=cpu)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures: list[str] = []
    for dtype in (torch.float32, torch.bfloat16):
        print(f"dtype {dtype}")
        for shape in ((3, 7, 5, 5), (2, 65, 9, 7)):
            n, c = shape[:2]
            x, b = _rand(*shape, dtype=dtype, seed=0), _rand(*shape, dtype=dtype, seed=1)
            cm = _rand(n, c, dtype=dtype, seed=2)
            tag = "x".join(map(str, shape))
            _fwd_bwd(f"mp_silu {tag}", ops.mp_silu, R.mp_silu, [x], dtype, failures)
            _fwd_bwd(f"mp_sum {tag}", lambda a, b: ops.mp_sum(a, b, 0.3), lambda a, b: R.mp_sum(a, b, 0.3),
                     [x, b], dtype, failures)
            _fwd_bwd(f"mp_cat {tag}", lambda a, b: ops.mp_cat(a, b[:, :3], t=0.5),
                     lambda a, b: R.mp_cat(a, b[:, :3], t=0.5), [x, b], dtype, failures)
            _fwd_bwd(f"pixel_norm {tag}", ops.pixel_norm, R.pixel_norm, [x], dtype, failures)
            _fwd_bwd(f"mp_silu_modulate {tag}", ops.mp_silu_modulate, R.mp_silu_modulate, [x, cm], dtype, failures)
            _fwd_bwd(f"clip {tag}", lambda a: ops.clip(a * 300), lambda a: R.clip(a * 300), [x], dtype, failures)
            for silu in (False, True):  # the block epilogue, channels-first and channels-last
                for cl in (False, True):
                    if cl and len(shape) != 4:
                        continue
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    xa, xb = x.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
                    # Against the unfused kernels (each rounds once, as the fused one): the clip's gradient
                    # mask then sees the same stored sum; the bf16 reference rounds each product first.
                    _fwd_bwd(f"mp_sum_clip{'_silu' if silu else ''} {tag}{' cl' if cl else ''}",
                             lambda a, b, s=silu: _cat(ops.mp_sum_clip(a, b, 0.3, 1.5, silu=s)),
                             lambda a, b, s=silu: _cat(_unfused_sum_clip(a, b, 0.3, 1.5, s)), [xa, xb], dtype, failures)
            w = _rand(5, c, 3, 3, dtype=torch.float32, seed=3)
            gain = torch.tensor(1.5, device=DEVICE)
            _fwd_bwd(f"mp_conv {tag}", lambda a, w: ops.mp_conv(a, w.to(a.dtype), gain),
                     lambda a, w: R.mp_conv(a, w.to(a.dtype), gain), [x, w], dtype, failures)
        w = _rand(9, 5, 3, 3, dtype=torch.float32, seed=4)
        _fwd_bwd("weight_norm 9x5x3x3", ops.weight_norm, R.weight_norm, [w], torch.float32, failures)
        w2, w3 = w.clone(), w.clone()
        ops.weight_norm_(w2)
        R.weight_norm_(w3)
        _check("weight_norm_ (in place)", w2, w3, torch.float32, failures)
        for n, heads, r in ((2, 1, 5), (1, 2, 9), (1, 1, 13)):  # odd token counts: 25, 81, 169
            qkv = _rand(n, 3 * 64 * heads, r, r, dtype=dtype, seed=5)
            _fwd_bwd(f"cosine_attention b{n} h{heads} {r}x{r}", lambda q, h=heads: ops.cosine_attention(q, h),
                     lambda q, h=heads: R.cosine_attention(q, h), [qkv], dtype, failures)
        for n, heads, d, r in ((2, 1, 64, 5), (1, 2, 32, 9), (1, 3, 64, 13)):  # the SDPA route and its norm
            for cl in (False, True):
                fmt = torch.channels_last if cl else torch.contiguous_format
                qkv = _rand(n, 3 * d * heads, r, r, dtype=dtype, seed=6).contiguous(memory_format=fmt)
                tag = f"b{n} h{heads} d{d} {r}x{r}{' cl' if cl else ''}"
                _fwd_bwd(f"attention_qkv_norm {tag}", lambda q, h=heads: _cat(ops.attention_qkv_norm(q, h)),
                         lambda q, h=heads: _cat(R.attention_qkv_norm(q, h)), [qkv], dtype, failures)
                _fwd_bwd(f"cosine_attention sdpa {tag}", lambda q, h=heads: ops.cosine_attention(q, h, impl="sdpa"),
                         lambda q, h=heads: R.cosine_attention(q, h), [qkv], dtype, failures)
        for heun in (False, True):
            shape = (3, 3, 7, 5)
            x, d1, d0, dp, xb = (_rand(*shape, dtype=dtype, seed=10 + i) for i in range(5))
            sc = torch.tensor([2.0, 1.0, 0.5], device=DEVICE)
            sn = torch.tensor([1.5, 0.7, 0.0 if not heun else 0.1], device=DEVICE)  # no Heun correction at 0
            extra = (dp, xb) if heun else (None, None)
            with torch.no_grad():
                got = ops.solver_step(x, d1, d0, 2.0, sc, sn, *extra)
                want = ops.solver_step_reference(x, d1, d0, 2.0, sc, sn, *extra)
            for i, (a, b) in enumerate(zip(got, want)):
                _check(f"solver_step {'heun' if heun else 'euler'} out[{i}]", a, b, dtype, failures)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("OK: every kernel ran and agreed with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
