"""The fused MP ops vs the plain ATen expressions they replace, side by side, at EDM2-S shapes (img64).

EDM2-S at 64x64 has 192/384/576/768 channels at 64/32/16/8 pixels. Each case runs the fastdiff kernel and
the ATen expression (what EDM2's code computes, e.g. ``F.silu(x) / 0.596``) on the same inputs.

Two ways to run it:
- ``pytest benchmarks/bench_ops.py`` (pytest-benchmark; CI runs it once with ``--benchmark-disable``);
- ``python benchmarks/bench_ops.py --threads 1 2`` prints a table timed interleaved (fused and ATen in
  turns; the fastest round of each, the least disturbed estimate on a shared machine), with GB/s (bytes read + written per second), a copy of the same size as
  the yardstick, and the ratio ATen time / fused time. ``--isa avx2`` lowers the kernels' instruction set.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.nn.layers import resample
from fastdiff.ops import reference as R

# (batch, channels, resolution) at EDM2-S levels; batch 32 only where it stays affordable on 2 cores.
ACT_SHAPES = [(1, 192, 64), (1, 768, 8), (32, 384, 32), (32, 768, 8)]
WEIGHT_SHAPES = [(192, 192, 3, 3), (768, 768, 3, 3), (2304, 768, 1, 1)]
IMPLS = ["fastdiff", "aten"]
EPS = R.EPS


def _id(shape):
    n, c, r = shape
    return f"b{n}-c{c}-{r}x{r}"


# --- the ATen expressions the fused ops replace (EDM2's code, without the limits at +-inf) ---------------


def aten_mp_silu(x):
    return F.silu(x) / 0.596


def aten_mp_silu_backward(g, x):
    return torch.ops.aten.silu_backward(g, x) / 0.596


def aten_mp_sum(a, b, t=0.3):
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def aten_mp_cat(a, b, t=0.5):
    na, nb = a.shape[1], b.shape[1]
    k = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (k / math.sqrt(na) * (1 - t)), b * (k / math.sqrt(nb) * t)], dim=1)


def aten_normalize(x, dim):
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(EPS, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def aten_pixel_norm(x):
    return aten_normalize(x, 1)


def aten_mp_silu_modulate(y, c):
    return F.silu(y * (c + 1)[:, :, None, None].to(y.dtype)) / 0.596


def aten_weight_norm_(w):
    with torch.no_grad():
        return w.copy_(aten_normalize(w, list(range(1, w.ndim))))


def aten_solver_step(x, d1, d0, w, s, s_next):
    denoised = d0 + w[:, None, None, None] * (d1 - d0)
    d = (x - denoised) / s[:, None, None, None]
    return x + (s_next - s)[:, None, None, None] * d, d, denoised


def aten_backward(fn, *inputs):
    """The backward of ATen's autograd graph of ``fn`` (built once, outside the timing): g -> input grads."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        out = fn(*leaves)

    def backward(g, *_):
        with torch.enable_grad():
            return torch.autograd.grad(out, leaves, g, retain_graph=True)

    return backward


def cases(shape, dtype=torch.float32):
    """(name, fused, aten, args, bytes moved per call) for one activation shape."""
    n, c, r = shape
    g = torch.Generator().manual_seed(0)
    x, b, gr = (torch.randn(n, c, r, r, generator=g).to(dtype) for _ in range(3))
    cm = torch.randn(n, c, generator=g)
    w, s, sn = torch.rand(n) + 1, torch.rand(n) + 1, torch.rand(n)
    nb = x.numel() * x.element_size()
    fd = torch.ops.fastdiff
    return [
        ("copy (yardstick)", torch.clone, torch.clone, (x,), 2 * nb),
        ("mp_silu", ops.mp_silu, aten_mp_silu, (x,), 2 * nb),
        ("mp_silu_backward", fd.mp_silu_backward, aten_mp_silu_backward, (gr, x), 3 * nb),
        ("mp_sum t=0.3", lambda a, b: ops.mp_sum(a, b, 0.3), aten_mp_sum, (x, b), 3 * nb),
        ("clip(mp_sum)", lambda a, b: ops.clip(ops.mp_sum(a, b, 0.3)), lambda a, b: aten_mp_sum(a, b).clamp(-256, 256),
         (x, b), 3 * nb),
        ("clip_backward", lambda g, x: fd.clip_backward(g, x, 1.0), lambda g, x: g * (x.abs() <= 1.0), (gr, x), 3 * nb),
        ("mp_cat t=0.5", lambda a, b: ops.mp_cat(a, b, t=0.5), aten_mp_cat, (x, b), 4 * nb),
        ("pixel_norm", ops.pixel_norm, aten_pixel_norm, (x,), 2 * nb),
        ("pixel_norm_backward", lambda g, x: fd.pixel_norm_backward(g, x, EPS),
         aten_backward(aten_pixel_norm, x), (gr, x), 3 * nb),
        ("mp_silu_modulate", ops.mp_silu_modulate, aten_mp_silu_modulate, (x, cm), 2 * nb),
        ("mp_silu_modulate_backward", fd.mp_silu_modulate_backward,
         aten_backward(aten_mp_silu_modulate, x, cm), (gr, x, cm), 3 * nb),
        ("solver_step (guided Euler)", lambda *a: ops.solver_step(*a), aten_solver_step, (x, b, gr, w, s, sn), 6 * nb),
        # EDM2's 2x resampling: fastdiff.nn's cheap forms (strided adds, broadcast copies) vs ATen's kernels
        ("resample down", lambda x: resample(x, "down"), lambda x: F.avg_pool2d(x, 2), (x,), nb + nb // 4),
        ("resample up", lambda x: resample(x, "up"), lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
         (x,), 5 * nb),
    ]


# --- pytest-benchmark ------------------------------------------------------------------------------------


def _run(benchmark, group, impl, fused, aten, *args):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    fn = fused if impl == "fastdiff" else aten
    with torch.no_grad():
        benchmark(fn, *args)


CASE_NAMES = [name for name, *_ in cases((1, 1, 1))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_id)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_elementwise(benchmark, impl, shape, name):
    _, fused, aten, args, _ = next(c for c in cases(shape) if c[0] == name)
    _run(benchmark, f"{name} {_id(shape)}", impl, fused, aten, *args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weight_norm_inplace(benchmark, impl, shape):
    w = torch.randn(*shape)
    _run(benchmark, f"weight_norm_ {'x'.join(map(str, shape))}", impl, ops.weight_norm_, aten_weight_norm_, w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 192, 64), (1, 768, 8)], ids=_id)
def test_mp_conv_eval_cached(benchmark, impl, shape):
    """Eval mode: fastdiff convolves with a cached effective weight; the reference normalizes per call."""
    n, c, r = shape
    x, w = torch.randn(n, c, r, r), torch.randn(c, c, 3, 3)
    cached = ops.mp_weight(w, 1.0, dtype=x.dtype)
    _run(
        benchmark, f"mp_conv eval 3x3 {_id(shape)}", impl,
        lambda x: torch.nn.functional.conv2d(x, cached, padding=1), lambda x: R.mp_conv(x, w), x,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 768, 8), (32, 192, 16)], ids=_id)
def test_mp_conv_uncached(benchmark, impl, shape):
    """Training-style forward (normalization every call): the fused op vs normalize-then-conv."""
    n, c, r = shape
    x, w = torch.randn(n, c, r, r), torch.randn(c, c, 3, 3)
    _run(benchmark, f"mp_conv 3x3 {_id(shape)}", impl, ops.mp_conv, R.mp_conv, x, w)


# --- interleaved table -------------------------------------------------------------------------------------


def _table(threads: int, rounds: int, dtype: torch.dtype) -> None:
    from fastdiff.bench import timing
    from fastdiff.ops import _ext

    torch.set_num_threads(threads)
    dev = timing.Device("cpu", "cpu", None, None, threads=threads)
    print(f"\n{threads} thread(s), {dtype}, kernels: {_ext.isa()}; fastest of {rounds} interleaved rounds")
    print(f"| shape | op | fused ms | ATen ms | fused GB/s | ATen GB/s | copy GB/s | ATen / fused |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for shape in ACT_SHAPES:
            copy_gbs = None
            for name, fused, aten, args, nbytes in cases(shape, dtype):
                fns = {"fused": lambda f=fused, a=args: f(*a), "aten": lambda f=aten, a=args: f(*a)}
                if name.startswith("copy"):
                    fns = {"fused": fns["fused"]}
                t = {k: min(v) for k, v in timing.time_interleaved(fns, dev, rounds=rounds).items()}
                if name.startswith("copy"):
                    copy_gbs = nbytes / t["fused"] / 1e9
                    continue
                print(f"| {_id(shape)} | {name} | {t['fused'] * 1e3:.3f} | {t['aten'] * 1e3:.3f} | "
                      f"{nbytes / t['fused'] / 1e9:.1f} | {nbytes / t['aten'] / 1e9:.1f} | {copy_gbs:.1f} | "
                      f"{t['aten'] / t['fused']:.2f} |", flush=True)
        for shape in WEIGHT_SHAPES:
            w1, w2 = torch.randn(*shape), torch.randn(*shape)
            fns = {"fused": lambda: ops.weight_norm_(w1), "aten": lambda: aten_weight_norm_(w2)}
            t = {k: min(v) for k, v in timing.time_interleaved(fns, dev, rounds=rounds).items()}
            nbytes = 3 * w1.numel() * 4  # read twice (norms, scaling), written once
            print(f"| {'x'.join(map(str, shape))} | weight_norm_ | {t['fused'] * 1e3:.3f} | {t['aten'] * 1e3:.3f} | "
                  f"{nbytes / t['fused'] / 1e9:.1f} | {nbytes / t['aten'] / 1e9:.1f} | | {t['aten'] / t['fused']:.2f} |",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--isa", choices=["avx512", "avx2", "baseline"], default=None,
                   help="run the kernels at this instruction set (FASTDIFF_ISA)")
    args = p.parse_args(argv)
    if args.isa and os.environ.get("FASTDIFF_ISA") != args.isa:  # the level is read when fastdiff loads
        env = dict(os.environ, FASTDIFF_ISA=args.isa)
        return subprocess.call([sys.executable, *sys.argv], env=env)
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    print(f"CPU: {cpu}; load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}")
    for threads in args.threads:
        _table(threads, args.rounds, getattr(torch, args.dtype))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
