"""3x3 MP convolution: the Winograd path (``fastdiff.ops.mp_conv_fused``, cached weight transform) vs ATen's
``F.conv2d`` (oneDNN) on the same effective weight, timed interleaved in one process at EDM2 shapes, with
1 and 2 threads. GFLOP/s are direct-convolution FLOPs (2 N Cin Cout 9 H W) per second, next to the measured
fp32 GEMM peak (a 2048^3 ``torch.mm``), so the table shows how far past the direct-convolution limit the
Winograd path goes. Also times the fused block chain (mp_silu -> conv -> mp_silu(y (1 + c))) against the
unfused chain on ATen's convolution, training's weight gradient (``winograd_weight_grad`` vs ATen's
``convolution_backward``), and the eval-mode 1x1 convolution (``fastdiff::conv1x1`` vs ``F.conv2d``).

    python benchmarks/bench_conv.py [--threads 1,2] [--quick] [--rounds 5] [--json out.json]
    python benchmarks/bench_conv.py --accuracy tiny-16,small-32,edm2-img64-s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fastdiff import ops

# (channels, resolution, batches): EDM2-S img64 levels (192/384/576/768 at 64/32/16/8) and the
# small-32 / XS widths (128 / 256).
SHAPES = [(128, 32, (1, 8)), (128, 16, (1, 8, 32)), (256, 16, (1, 8, 32)), (192, 64, (1, 8)),
          (384, 32, (1, 8)), (576, 16, (1, 8, 32)), (768, 8, (1, 8, 32)), (128, 8, (1, 8))]
QUICK = [(128, 16, (1, 8)), (256, 8, (8,))]


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def blas_gflops(rounds: int) -> float:
    """GFLOP/s of ``torch.mm`` (the BLAS) on 2048x2048 float32 matrices, best of ``rounds``."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048**3 / min(_time(lambda: torch.mm(a, b)) for _ in range(rounds)) / 1e9


def own_gemm_gflops(x: torch.Tensor, a: torch.Tensor, rounds: int) -> float | None:
    """GFLOP/s of fastdiff's micro-kernel on the product ``a @ x[i]`` (``fastdiff::conv1x1`` of ``x`` [N, in, H,
    W] with ``a`` [out, in]), best of ``rounds``; None without the kernel."""
    if not (ops.HAS_EXTENSION and ops._ext.has_kernel("conv1x1", "cpu")):
        return None
    torch.ops.fastdiff.conv1x1(x, a)
    flops = 2 * a.shape[0] * x.numel()
    return flops / min(_time(lambda: torch.ops.fastdiff.conv1x1(x, a)) for _ in range(rounds)) / 1e9


def gemm_peak(rounds: int) -> tuple[float, float | None]:
    """GFLOP/s of a 2048^3 product: ``torch.mm`` (the BLAS) and fastdiff's micro-kernel (as a 1x1 conv)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return blas_gflops(rounds), own_gemm_gflops(b.reshape(1, 2048, 32, 64), a, rounds)


def bench_case(c: int, r: int, n: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, r, r, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g)
    cc = torch.randn(n, c, generator=g)
    w_hat = ops.mp_weight(w)
    layer = ops.MPConvWeights()  # the eval-mode caches of an MPConv: transform (of the tile chosen), factor
    with ops.use_conv_path("winograd"):
        impls = {
            "aten": lambda: F.conv2d(x, w_hat, padding=1),
            "winograd": lambda: layer.run(x, w),
            "chain_aten": lambda: ops.mp_silu_modulate(F.conv2d(ops.mp_silu(x), w_hat, padding=1), cc),
            "chain_fused": lambda: layer.run(x, w, silu_in=True, c=cc),
            # Training's weight gradient: ATen's convolution_backward (weight only) vs the Winograd form.
            "wgrad_aten": lambda: torch.ops.aten.convolution_backward(
                x, x, w_hat, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]),
            "wgrad_winograd": lambda: torch.ops.fastdiff.winograd_weight_grad(x, x),
        }
        times = {k: [] for k in impls}
        with torch.no_grad():
            for f in impls.values():
                f()
            for _ in range(rounds):  # interleaved: one round of every implementation at a time
                for k, f in impls.items():
                    times[k].append(_time(f))
            err = ((impls["winograd"]() - impls["aten"]()).norm() / impls["aten"]().norm()).item()
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 2 * n * c * c * 9 * r * r
    return dict(channels=c, res=r, batch=n, threads=torch.get_num_threads(), **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                aten_gflops=flops / med["aten"] / 1e9, winograd_gflops=flops / med["winograd"] / 1e9,
                speedup=med["aten"] / med["winograd"], chain_speedup=med["chain_aten"] / med["chain_fused"],
                wgrad_speedup=med["wgrad_aten"] / med["wgrad_winograd"],
                rel_err=err, selector=ops.conv_path(c, c, r, r, n)[0])


# 1x1 convolutions of the EDM2 blocks (attention qkv / proj, skip): (in, out, resolution, batches).
SHAPES_1X1 = [(128, 384, 16, (1, 8)), (128, 128, 16, (1, 8)), (256, 128, 16, (1,)), (128, 64, 32, (1, 8)),
              (192, 64, 32, (1,)), (64, 192, 8, (8,)), (64, 64, 8, (8,)), (768, 2304, 8, (1, 8))]


def bench_1x1(cin: int, cout: int, r: int, n: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, cin, r, r, generator=g), torch.randn(cout, cin, 1, 1, generator=g)
    impls = {"aten": lambda: F.conv2d(x, w), "fastdiff": lambda: torch.ops.fastdiff.conv1x1(x, w)}
    times = {k: [] for k in impls}
    for f in impls.values():
        f()
    for _ in range(rounds):
        for k, f in impls.items():
            times[k].append(_time(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 2 * n * cin * cout * r * r
    return dict(kind="1x1", cin=cin, cout=cout, res=r, batch=n, threads=torch.get_num_threads(),
                aten_ms=med["aten"] * 1e3, fastdiff_ms=med["fastdiff"] * 1e3, aten_gflops=flops / med["aten"] / 1e9,
                fastdiff_gflops=flops / med["fastdiff"] / 1e9, speedup=med["aten"] / med["fastdiff"])


def _rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def accuracy(presets: list[str], sigmas=(0.002, 0.1, 1.0, 10.0, 80.0), batch: int = 2) -> None:
    """Winograd (forced on every 3x3 conv) vs the plain EDM2 network on the same weights: whole network
    (eval and training forward, relative RMS and max error), every 3x3 conv against float64 on its real
    input, and a 32-step Heun + autoguidance trajectory (for presets up to small-32)."""
    from fastdiff import nn as fnn
    from fastdiff.bench import suites

    opt = suites.Options()
    for preset in presets:
        net = suites.build_net(preset, opt).eval().requires_grad_(False)
        pnet = suites._plain(net, opt)
        x, _, labels = suites._inputs(net, batch, opt)
        print(f"\n{preset} batch {batch}: whole network, float32, relative to the plain EDM2 network")
        for sigma in sigmas:
            s = torch.full((batch,), sigma)
            with torch.no_grad():
                want = pnet(x * sigma, s, labels)
                with ops.use_conv_path("winograd"):
                    got = net(x * sigma, s, labels)
                with ops.use_aten_conv():
                    aten = net(x * sigma, s, labels)
            mx = ((got - want).abs().max() / want.abs().max()).item()
            print(f"  eval  sigma={sigma:<6g} Winograd rms {_rms_rel(got, want):.2e} max {mx:.2e}   "
                  f"(ATen path rms {_rms_rel(aten, want):.2e})")
        tnet = suites.build_net(preset, opt).train()
        tplain = suites._plain(tnet, opt, training=True)
        s = torch.full((batch,), 1.0)
        with ops.use_conv_path("winograd"):
            got = tnet(x, s, labels)
        want = tplain(x, s, labels)
        print(f"  train sigma=1      Winograd rms {_rms_rel(got, want):.2e}")
        # Per layer: each 3x3 conv with its fused chain (MPConv.fused) on its real input, float32 Winograd vs
        # the same chain in float64 on ATen's direct convolution.
        errs, names = [], {id(m): n for n, m in net.named_modules()}
        orig = fnn.MPConv.fused

        def fused(self, x, gain=1.0, **kw):
            out = orig(self, x, gain, **kw)
            d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            want = ops.reference.mp_conv_fused(x.double(), self.weight.double(), gain, **d)
            errs.append((names.get(id(self), "?"), _rms_rel(out, want)))
            return out

        fnn.MPConv.fused = fused
        try:
            with torch.no_grad(), ops.use_conv_path("winograd"):
                net(x, torch.full((batch,), 1.0), labels)
        finally:
            fnn.MPConv.fused = orig
        vals = [e for _, e in errs]
        worst = max(errs, key=lambda t: t[1])
        print(f"  per 3x3 conv (vs float64, {len(vals)} convs): median {statistics.median(vals):.2e}, "
              f"worst {worst[1]:.2e} ({worst[0]})")
        if net.img_resolution <= 32:
            gnet = suites.build_net(preset, opt, seed=1).eval().requires_grad_(False)
            gplain = suites._plain(gnet, opt)
            with torch.no_grad():
                with ops.use_conv_path("winograd"):
                    got = suites.plain_heun_loop(net, gnet, x, labels)
                want = suites.plain_heun_loop(pnet, gplain, x, labels)
            mx = ((got - want).abs().max() / want.abs().max()).item()
            print(f"  32-step Heun + autoguidance trajectory: rms {_rms_rel(got, want):.2e} max {mx:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--accuracy", default=None, metavar="PRESETS",
                   help="instead of timing: comma-separated presets for the accuracy report")
    a = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}")
    if a.accuracy:
        torch.set_num_threads(int(a.threads.split(",")[-1]))
        accuracy(a.accuracy.split(","))
        return
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        peak, own = gemm_peak(a.rounds)
        print(f"\n{threads} thread(s): fp32 GEMM peak (2048^3): torch.mm {peak:.0f} GFLOP/s, fastdiff's micro-kernel "
              f"{own or 0:.0f} GFLOP/s")
        print("| C | map | batch | ATen ms | GFLOP/s | Winograd ms | GFLOP/s | speedup | fused chain speedup | "
              "weight grad speedup | rel. err | selector |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for c, r, batches in QUICK if a.quick else SHAPES:
            for n in batches:
                row = bench_case(c, r, n, a.rounds)
                row["gemm_peak_gflops"], row["own_gemm_peak_gflops"] = peak, own
                rows.append(row)
                print(f"| {c} | {r}x{r} | {n} | {row['aten_ms']:.2f} | {row['aten_gflops']:.0f} | {row['winograd_ms']:.2f} | "
                      f"{row['winograd_gflops']:.0f} | {row['speedup']:.2f}x | {row['chain_speedup']:.2f}x | "
                      f"{row['wgrad_speedup']:.2f}x | {row['rel_err']:.1e} | {row['selector']} |", flush=True)
        print("\n| 1x1: in | out | map | batch | ATen ms | GFLOP/s | fastdiff ms | GFLOP/s | speedup |")
        print("|---|---|---|---|---|---|---|---|---|")
        for cin, cout, r, batches in SHAPES_1X1[:2] if a.quick else SHAPES_1X1:
            for n in batches:
                row = bench_1x1(cin, cout, r, n, a.rounds)
                rows.append(row)
                print(f"| {cin} | {cout} | {r}x{r} | {n} | {row['aten_ms']:.3f} | {row['aten_gflops']:.0f} | "
                      f"{row['fastdiff_ms']:.3f} | {row['fastdiff_gflops']:.0f} | {row['speedup']:.2f}x |", flush=True)
    if a.json:
        from fastdiff._atomic import atomic_open

        with atomic_open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
