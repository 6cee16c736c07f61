"""Sampling loop benchmark: 32-step Heun with autoguidance + guidance interval, batch 8.

Side by side in one run:
  - plain PyTorch: the same loop written with separate tensor ops, the guide evaluated at every step
    and its result discarded outside the interval (what a straightforward implementation does);
  - fastdiff (reference ops): fastdiff.sampling with the fused op replaced by its PyTorch reference;
  - fastdiff: fastdiff.sampling with the fused solver step and interval skipping.

Networks: the `tiny-16` preset (main; 16x16, 32 channels) and the same preset at half width (the guide,
as in autoguidance: a smaller model), with non-zero gains so every branch does real work. fastdiff runs
them as `fastdiff.nn.Precond` (cached weights, fused ops); the plain loop runs the same weights through
the plain-PyTorch EDM2 of fastdiff/bench/plain_edm2.py (weights normalized on every call, no fused ops).

    PYTHONPATH=. python benchmarks/bench_sampling.py                 # table
    PYTHONPATH=. pytest benchmarks/bench_sampling.py --benchmark-enable   # pytest-benchmark, one group
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastdiff import ops
from fastdiff.bench import Options, device_info
from fastdiff.bench.suites import build_net
from fastdiff.bench.timing import time_interleaved
from fastdiff.bench.suites import GUIDE_W as W
from fastdiff.bench.suites import INTERVAL, fastdiff_heun_loop, plain_heun_loop

BATCH, STEPS = 8, 32
MAIN, GUIDE = ("tiny-16", {}), ("tiny-16", dict(model_channels=16, logvar_channels=16))


def _build(preset, overrides, seed, device="cpu"):
    return build_net(preset, Options(device=device), seed, **overrides)


def plain_loop(net, gnet, noise, labels=None, w=W, interval=INTERVAL, num_steps=STEPS):
    """The loop in plain PyTorch, no fused ops, guide evaluated at every step."""
    return plain_heun_loop(net, gnet, noise, labels, w, interval, num_steps)


def fastdiff_loop(net, gnet, noise, labels=None, reference=False):
    with ops.use_reference(reference):
        return fastdiff_heun_loop(net, gnet, noise, labels, W, INTERVAL, STEPS)


def setup(device="cpu"):
    """(fastdiff main, fastdiff guide, plain main, plain guide, noise, labels) with shared weights."""
    from fastdiff.bench import plain_edm2 as plain

    net = _build(*MAIN, seed=0, device=device).eval().requires_grad_(False)
    gnet = _build(*GUIDE, seed=1, device=device).eval().requires_grad_(False)
    pnet = plain.PlainEDM2.from_module(dict(net.init_kwargs), net)
    pgnet = plain.PlainEDM2.from_module(dict(gnet.init_kwargs), gnet)
    g = torch.Generator().manual_seed(0)
    r, c = net.img_resolution, net.img_channels
    noise = torch.randn(BATCH, c, r, r, generator=g).to(device)
    labels = torch.nn.functional.one_hot(torch.randint(0, net.label_dim, (BATCH,), generator=g), net.label_dim)
    return net, gnet, pnet, pgnet, noise, labels.float().to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    net, gnet, pnet, pgnet, noise, labels = setup(args.device)
    with torch.no_grad():  # warm-up and agreement check
        a, b = plain_loop(pnet, pgnet, noise, labels), fastdiff_loop(net, gnet, noise, labels)
    diff = float((a - b).abs().max())
    rows = [
        ("plain PyTorch (plain EDM2, no fused ops, guide at every step)", lambda: plain_loop(pnet, pgnet, noise, labels)),
        ("fastdiff.sampling, reference ops", lambda: fastdiff_loop(net, gnet, noise, labels, reference=True)),
        ("fastdiff.sampling, fused ops", lambda: fastdiff_loop(net, gnet, noise, labels)),
    ]
    # Interleaved (fastdiff.bench.timing), so that load changes on a shared machine hit the rows alike.
    dev = device_info(args.device)
    fns = {name: torch.no_grad()(fn) for name, fn in rows}
    times = time_interleaved(fns, dev, warmup=0, rounds=args.repeats, block_s=0)
    step_rows = step_benchmark(args.device)
    base = statistics.median(times[rows[0][0]])
    print(f"32-step Heun, autoguidance w={W}, interval sigma in {INTERVAL}, batch {BATCH}, "
          f"main {MAIN}, guide {GUIDE}, device {args.device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; median of {args.repeats}; max |plain - fastdiff| = {diff:.2e}")
    print("| loop | median s | min s | speed-up |")
    print("|---|---|---|---|")
    for name, _ in rows:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {min(times[name]):.3f} | {base / med:.2f}x |")
    print()
    print("Solver step alone (guided Heun correction: D, derivative and update), per call:")
    print("| shape | dtype | plain PyTorch ops, us | fused solver_step, us | speed-up |")
    print("|---|---|---|---|---|")
    for shape, dtype, t_ref, t_fused in step_rows:
        print(f"| {'x'.join(map(str, shape))} | {str(dtype).replace('torch.', '')} | {t_ref * 1e6:.0f} | "
              f"{t_fused * 1e6:.0f} | {t_ref / t_fused:.2f}x |")
    return 0


def step_benchmark(device, shapes=((8, 3, 32, 32), (8, 4, 64, 64), (32, 3, 64, 64)), dtype=torch.float32, reps=50):
    """The fused step vs the same maths as separate PyTorch ops (the reference), median per call."""
    from fastdiff.ops import solver_step, solver_step_reference

    out = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x, d1, d0, dp, xb = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(5))
        n = shape[0]
        sc = torch.full((n,), 2.0, device=device)
        sn = torch.full((n,), 1.5, device=device)
        w = torch.full((n,), 2.0, device=device)
        fns = {name: torch.no_grad()(lambda fn=fn: fn(x, d1, d0, w, sc, sn, dp, xb))
               for name, fn in (("reference", solver_step_reference), ("fused", solver_step))}
        times = time_interleaved(fns, device_info(device), warmup=1, rounds=reps, block_s=0)
        res = [statistics.median(times["reference"]), statistics.median(times["fused"])]
        out.append((shape, dtype, res[0], res[1]))
    return out


# --- pytest-benchmark (one group, side by side) ---------------------------------------------------------

try:
    import pytest

    @pytest.fixture(scope="module")
    def _models():
        return setup("cuda" if torch.cuda.is_available() else "cpu")

    @pytest.mark.benchmark(group="sampling-heun32-autoguidance-interval")
    def test_plain_pytorch_loop(benchmark, _models):
        net, gnet, pnet, pgnet, noise, labels = _models
        benchmark.extra_info["impl"] = "plain"
        with torch.no_grad():
            benchmark.pedantic(plain_loop, args=(pnet, pgnet, noise, labels), rounds=3, iterations=1, warmup_rounds=1)

    @pytest.mark.benchmark(group="sampling-heun32-autoguidance-interval")
    def test_fastdiff_loop(benchmark, _models):
        net, gnet, pnet, pgnet, noise, labels = _models
        benchmark.extra_info["impl"] = "fastdiff"
        with torch.no_grad():
            benchmark.pedantic(fastdiff_loop, args=(net, gnet, noise, labels), rounds=3, iterations=1, warmup_rounds=1)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    raise SystemExit(main())
