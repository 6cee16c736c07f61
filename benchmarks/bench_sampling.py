"""Sampling loop benchmark: 32-step Heun with autoguidance + guidance interval, batch 8.

Side by side in one run:
  - plain PyTorch: the same loop written with separate tensor ops, the guide evaluated at every step
    and its result discarded outside the interval (what a straightforward implementation does);
  - fastdiff (reference ops): fastdiff.sampling with the fused op replaced by its PyTorch reference;
  - fastdiff: fastdiff.sampling with the fused solver step and interval skipping.

The network is a STAND-IN (EDM-preconditioned conv denoiser: 3x3 convs, 64 channels at 32x32 for the
main network, 32 channels for the guide), until the fastdiff.nn presets are merged.

    PYTHONPATH=. python benchmarks/bench_sampling.py                 # table
    PYTHONPATH=. pytest benchmarks/bench_sampling.py --benchmark-enable   # pytest-benchmark, one group
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastdiff import ops
from fastdiff.sampling import Autoguidance, Interval, edm_sigma_steps, sample

BATCH, STEPS, RES, W = 8, 32, 32, 2.0
INTERVAL = (0.28, 2.9)


class StandInDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), F a small conv net (stand-in for EDM2)."""

    def __init__(self, channels=64, depth=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [4] + [channels] * (depth - 1) + [3]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        with torch.no_grad():
            for c in self.convs:
                c.weight.copy_(torch.randn(c.weight.shape, generator=g) / (c.weight[0].numel() ** 0.5))
                c.bias.zero_()

    def forward(self, x, sigma, labels=None):
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        sd = 0.5
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        h = torch.cat([c_in * x, (s.log() / 4).expand(-1, 1, *x.shape[2:])], dim=1)
        for k, conv in enumerate(self.convs):
            h = conv(h)
            if k < len(self.convs) - 1:
                h = torch.nn.functional.silu(h)
        return c_skip * x + c_out * h


def plain_loop(net, gnet, noise, w=W, interval=INTERVAL, num_steps=STEPS):
    """The loop in plain PyTorch, no fused ops, guide evaluated at every step."""
    t = edm_sigma_steps(num_steps, dtype=torch.float32, device=noise.device)
    lo, hi = interval

    def denoise(x, s):
        sig = s.expand(x.shape[0])
        d1, d0 = net(x, sig), gnet(x, sig)
        guided = d0 + w * (d1 - d0)
        return guided if lo < float(s) <= hi else d1

    x = noise * t[0]
    for i in range(num_steps):
        tc, tn = t[i], t[i + 1]
        d = (x - denoise(x, tc)) / tc
        x_next = x + (tn - tc) * d
        if i < num_steps - 1:
            d2 = (x_next - denoise(x_next, tn)) / tn
            x_next = x + (tn - tc) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def fastdiff_loop(net, gnet, noise, reference=False):
    g = Interval(Autoguidance(gnet, W), sigma=INTERVAL)
    with ops.use_reference(reference):
        return sample(net, noise, "heun", steps=STEPS, guidance=g)


def setup(device="cpu"):
    net = StandInDenoiser(64, seed=0).to(device).eval().requires_grad_(False)
    gnet = StandInDenoiser(32, seed=1).to(device).eval().requires_grad_(False)
    noise = torch.randn(BATCH, 3, RES, RES, generator=torch.Generator().manual_seed(0)).to(device)
    return net, gnet, noise


def _time(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    net, gnet, noise = setup(args.device)
    with torch.no_grad():
        a, b = plain_loop(net, gnet, noise), fastdiff_loop(net, gnet, noise)  # warm-up and agreement check
    diff = float((a - b).abs().max())
    rows = [
        ("plain PyTorch (no fused ops, guide at every step)", lambda: plain_loop(net, gnet, noise)),
        ("fastdiff.sampling, reference ops", lambda: fastdiff_loop(net, gnet, noise, reference=True)),
        ("fastdiff.sampling, fused solver step", lambda: fastdiff_loop(net, gnet, noise)),
    ]
    # Interleave the rows so that load changes on a shared machine hit them alike.
    times = {name: [] for name, _ in rows}
    for _ in range(args.repeats):
        for name, fn in rows:
            times[name] += _time(fn, 1, args.device)
    step_rows = step_benchmark(args.device)
    base = statistics.median(times[rows[0][0]])
    print(f"32-step Heun, autoguidance w={W}, interval sigma in {INTERVAL}, batch {BATCH}, 3x{RES}x{RES}, "
          f"stand-in conv denoiser (64 ch main / 32 ch guide), device {args.device}, torch {torch.__version__}, "
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
        res = []
        for fn in (solver_step_reference, solver_step):
            ts = []
            for _ in range(reps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    fn(x, d1, d0, w, sc, sn, dp, xb)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            res.append(statistics.median(ts))
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
        net, gnet, noise = _models
        with torch.no_grad():
            benchmark.pedantic(plain_loop, args=(net, gnet, noise), rounds=3, iterations=1, warmup_rounds=1)

    @pytest.mark.benchmark(group="sampling-heun32-autoguidance-interval")
    def test_fastdiff_loop(benchmark, _models):
        net, gnet, noise = _models
        with torch.no_grad():
            benchmark.pedantic(fastdiff_loop, args=(net, gnet, noise), rounds=3, iterations=1, warmup_rounds=1)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    raise SystemExit(main())
