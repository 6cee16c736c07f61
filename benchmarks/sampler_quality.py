"""Quality against network evaluations for every sampler of fastdiff.sampling.SAMPLERS, on the 2-D toy of
fastdiff.toy (the tree-shaped two-class Gaussian mixture) with its exact denoiser: the only error left is
the sampler's.

For each sampler and step count: ``--n`` class-conditional samples (half per class; noise and every
random draw from torch's global generator seeded 0) scored against the exact distribution by

- FD: the Frechet distance between the samples' mean/covariance and the mixture's exact moments, per
  class, averaged over the two classes (x1000);
- MMD: the squared maximum mean discrepancy (Gaussian kernel, bandwidth ``--bandwidth``) to as many
  exact samples, per class, averaged (x1000); the line ``exact`` is an exact sample against another
  (the noise floor of the estimate).

    PYTHONPATH=. python benchmarks/sampler_quality.py              # markdown table
    PYTHONPATH=. python benchmarks/sampler_quality.py --steps 8 16 --n 1024
"""

from __future__ import annotations

import argparse

import torch

from fastdiff.metrics.frechet import frechet_distance
from fastdiff.sampling import SAMPLERS, sample
from fastdiff.toy import tree_mixture


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared MMD with the kernel exp(-|x - y|^2 / (2 h^2))."""
    def k(x, y):
        return torch.exp(-torch.cdist(x, y) ** 2 / (2 * bandwidth**2))

    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return float((kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
                 - 2 * k(a, b).mean())


def score(mix, x: torch.Tensor, labels: torch.Tensor, exact: torch.Tensor, bandwidth: float) -> tuple[float, float]:
    fd, mm = [], []
    cls = labels.argmax(1)
    for c in range(mix.num_classes):
        xc = x[cls == c]
        mu, cov = mix.moments(c)
        fd.append(frechet_distance(xc.mean(0), torch.cov(xc.T), mu, cov))
        mm.append(mmd2(xc, exact[cls == c], bandwidth))
    return sum(fd) / len(fd), sum(mm) / len(mm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--rtol", type=float, nargs="+", default=[0.2, 0.05, 0.01], help="dpm_adaptive tolerances")
    p.add_argument("--n", type=int, default=2048, help="samples per cell (half per class)")
    p.add_argument("--bandwidth", type=float, default=0.05)
    args = p.parse_args()
    mix = tree_mixture()
    n = args.n
    labels = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = mix.sample(n, labels, generator=g)
    floor = score(mix, mix.sample(n, labels, generator=g), labels, exact, args.bandwidth)
    rows = [("exact", "-", "-", floor)]
    for name in SAMPLERS:
        settings = [dict(rtol=r, atol=r / 10) for r in args.rtol] if name == "dpm_adaptive" else [
            dict(steps=s) for s in args.steps]
        for kw in settings:
            torch.manual_seed(0)
            info: dict = {}
            x = sample(mix, noise, name, labels=labels, dtype=torch.float64, info=info, **kw)
            nfe = info["evaluations"]
            setting = f"rtol {kw['rtol']}" if "rtol" in kw else f"{kw['steps']} steps"
            if "nfe" in info:
                nfe = f"{float(info['nfe'].double().mean()):.0f} (mean per sample)"
            rows.append((name, setting, nfe, score(mix, x, labels, exact, args.bandwidth)))
            print(f"{name:20s} {setting:12s} NFE {nfe}  FD {rows[-1][3][0] * 1e3:8.3f}  MMD {rows[-1][3][1] * 1e3:8.3f}",
                  flush=True)
    print("\n| sampler | setting | network evaluations | FD x1000 | MMD^2 x1000 |")
    print("|---|---|---|---:|---:|")
    for name, setting, nfe, (fd, mm) in rows:
        print(f"| {name} | {setting} | {nfe} | {fd * 1e3:.3f} | {mm * 1e3:.3f} |")


if __name__ == "__main__":
    main()
