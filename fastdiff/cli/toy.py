"""``fastdiff toy``: the 2-D toy of the autoguidance paper (Karras et al. 2024, "Guiding a diffusion
model with a bad version of itself"), end to end on the CPU.

A main and a smaller, shorter-trained guide MP-MLP denoiser (:mod:`fastdiff.toy.model`) learn a two-class
tree-shaped Gaussian mixture with an exact density (:func:`fastdiff.toy.mixture.tree_mixture`); no guidance,
CFG and autoguidance sample the same noise and labels with EDM's Heun sampler and are scored against the
exact density (:func:`evaluate_samples`); ``toy.png``, ``report.md`` and ``results.json`` go to ``--outdir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from fastdiff._atomic import atomic_write_with

from fastdiff.cli.common import torch_threads
from fastdiff.sampling import CFG, Autoguidance, sample
from fastdiff.toy.mixture import GaussianMixture, tree_mixture
from fastdiff.toy.model import ToyDenoiser, train_denoiser

__all__ = ["add_arguments", "main", "run_toy", "evaluate_samples", "PRESETS", "SIGMA_MAX"]

SIGMA_MAX = 5.0  # the toy's sampler starts at sigma = 5 (the data's std is 0.5), as the paper's toy does

# Network and training sizes: (channels, blocks, training steps, batch).
PRESETS = {
    "default": dict(main=(64, 3, 1200, 1024), guide=(32, 2, 300, 1024), samples=2048, grid=200),
    "fast": dict(main=(32, 2, 120, 512), guide=(16, 1, 40, 512), samples=512, grid=96),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outdir", default="toy-out", help="where toy.png, report.md and results.json go")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling (the tree is fixed)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance weight w of CFG and autoguidance")
    parser.add_argument("--steps", type=int, default=32, help="Heun sampler steps (2N-1 evaluations)")
    parser.add_argument("--fast", action="store_true", help="tiny networks and short training (a few seconds)")
    parser.add_argument("--samples", type=int, default=None, help="samples per setting (default 2048; fast 512)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps of the main model "
                        "(the guide gets a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the toy's tensors are tiny; "
                        "one thread avoids threading overhead)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="skip toy.png (matplotlib is optional)")


def _frechet_2d(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance of the Gaussian fits of two 2-D point sets; for 2x2 matrices
    ``Tr sqrtm(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))``."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    p = s1 @ s2
    tr_sqrt = math.sqrt(max(float(torch.trace(p)) + 2 * math.sqrt(max(float(torch.det(p)), 0.0)), 0.0))
    return max(float((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt, 0.0)


def evaluate_samples(mixture: GaussianMixture, x: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                     ref_labels: torch.Tensor, ref_logp: torch.Tensor | None = None) -> dict:
    """Exact-density numbers for samples ``x`` with one-hot ``labels`` against exact ``reference``
    samples; ``ref_logp``: the reference's log p, when already computed.

    1. The data: a two-class tree-shaped 2-D Gaussian mixture with an exact denoiser
       (:func:`fastdiff.toy.mixture.tree_mixture`).
    2. Two small MP-MLP denoisers built from ``fastdiff.ops`` (:mod:`fastdiff.toy.model`): the *main*
       model (wider, deeper, trained longer, with label dropout so that a zero label gives its
       unconditional version) and the *guide* (narrower, shallower, trained a quarter as long).
    3. Samples with fastdiff's EDM Heun sampler (same noise and labels in every setting): no guidance,
       CFG (main conditional vs main unconditional), autoguidance (main vs guide); plus exact samples and
       the exact denoiser driven by the same sampler as references.
    4. Numbers for each setting, from the exact density: mean and median ``log p(x | class)``, the
       fraction of samples inside the region that holds 90% of the true class mass (``log p`` above the
       true samples' 10% quantile), the fraction outside the 99% region (outliers), and the 2-D Frechet
       distance to exact samples (which grows when guidance trades diversity for fidelity).
    5. ``toy.png`` (the density and the sample sets), ``report.md`` and ``results.json`` in ``--outdir``,
       each written to a temporary file and renamed.
    """
    x, labels = x.double(), labels.double()
    lp = mixture.log_prob(x, 0.0, labels)
    ref_lp = mixture.log_prob(reference, 0.0, ref_labels) if ref_logp is None else ref_logp
    cls, ref_cls = labels.argmax(1), ref_labels.argmax(1)
    inside = torch.zeros_like(lp, dtype=torch.bool)
    outlier = torch.zeros_like(lp, dtype=torch.bool)
    fd = []
    for c in range(mixture.num_classes):
        rows, ref_rows = cls == c, ref_cls == c
        q10, q01 = torch.quantile(ref_lp[ref_rows], torch.tensor([0.10, 0.01], dtype=torch.float64))
        inside[rows] = lp[rows] >= q10
        outlier[rows] = lp[rows] < q01
        if int(rows.sum()) > 2:
            fd.append(_frechet_2d(x[rows], reference[ref_rows]))
    finite = torch.isfinite(x).all(1)
    return {
        "mean_logp": float(lp[finite].mean()) if bool(finite.any()) else float("nan"),
        "median_logp": float(lp.median()),
        "in_hdr90": float(inside.double().mean()),
        "outside_hdr99": float(outlier.double().mean()),
        "fd2d": sum(fd) / max(len(fd), 1),
    }


def _train(name, sizes, mixture, seed, quiet):
    channels, blocks, steps, batch = sizes
    net = ToyDenoiser(channels, blocks, label_dim=mixture.num_classes, sigma_data=0.5, seed=seed)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"train {name} ({channels}ch x {blocks} blocks)", leave=False)
    def report(step, loss):
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    progress = report if bar is not None else None
    ema = train_denoiser(net, mixture, steps, batch=batch, seed=seed, progress=progress)
    if bar is not None:
        bar.close()
    return ema


def run_toy(outdir: str = "toy-out", seed: int = 0, guidance: float = 3.0, steps: int = 32, fast: bool = False,
            samples: int | None = None, train_steps: int | None = None, quiet: bool = True,
            plot: bool = True) -> dict:
    """Runs the whole toy (the steps: :func:`evaluate_samples`); returns the results dict of results.json."""
    t_start = time.perf_counter()
    preset = dict(PRESETS["fast" if fast else "default"])
    main_sizes, guide_sizes = list(preset["main"]), list(preset["guide"])
    if train_steps is not None:
        main_sizes[2], guide_sizes[2] = int(train_steps), max(int(train_steps) // 4, 1)
    n = int(samples or preset["samples"])
    mixture = tree_mixture()

    timings = {}
    t = time.perf_counter()
    main_net = _train("main", main_sizes, mixture, seed, quiet)
    timings["train_main_s"] = time.perf_counter() - t
    t = time.perf_counter()
    guide_net = _train("guide", guide_sizes, mixture, seed + 1, quiet)
    timings["train_guide_s"] = time.perf_counter() - t

    # The same noise and labels for every setting (common random numbers), balanced classes.
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.nn.functional.one_hot(torch.arange(n) % mixture.num_classes, mixture.num_classes).float()
    noise = torch.randn(n, 2, generator=g)
    ref_n = max(4 * n, 4096)
    ref_labels = torch.nn.functional.one_hot(torch.arange(ref_n) % mixture.num_classes, mixture.num_classes).double()
    reference = mixture.sample(ref_n, ref_labels, g)

    t = time.perf_counter()
    settings = {
        "exact samples": mixture.sample(n, labels, g).float(),
        "exact denoiser": sample(mixture, noise.double(), steps=steps, labels=labels.double(), dtype=torch.float64,
                                 sigma_max=SIGMA_MAX),
        "guide only": sample(guide_net, noise, steps=steps, labels=labels, sigma_max=SIGMA_MAX),
        "no guidance": sample(main_net, noise, steps=steps, labels=labels, sigma_max=SIGMA_MAX),
        f"CFG w={guidance:g}": sample(main_net, noise, steps=steps, labels=labels, guidance=CFG(guidance),
                                      sigma_max=SIGMA_MAX),
        f"autoguidance w={guidance:g}": sample(main_net, noise, steps=steps, labels=labels,
                                               guidance=Autoguidance(guidance, guide_net), sigma_max=SIGMA_MAX),
    }
    timings["sampling_s"] = time.perf_counter() - t
    ref_logp = mixture.log_prob(reference, 0.0, ref_labels)
    metrics = {name: evaluate_samples(mixture, x, labels, reference, ref_labels, ref_logp)
               for name, x in settings.items()}

    results = {
        "settings": metrics,
        "guidance": guidance,
        "sampler_steps": steps,
        "samples": n,
        "seed": seed,
        "fast": fast,
        "main": dict(zip(("channels", "blocks", "train_steps", "batch"), main_sizes)),
        "guide": dict(zip(("channels", "blocks", "train_steps", "batch"), guide_sizes)),
        "components": len(mixture),
        "sigma_max": SIGMA_MAX,
        "torch_threads": torch.get_num_threads(),
    }
    os.makedirs(outdir, exist_ok=True)
    results["plot"] = None
    if plot:
        t = time.perf_counter()
        try:
            _plot(os.path.join(outdir, "toy.png"), mixture, settings, labels, metrics, preset["grid"])
            results["plot"] = "toy.png"
        except ImportError as e:  # matplotlib is an optional dependency (pip install fastdiff[plot])
            results["plot_error"] = f"no plot: {e}; install matplotlib (pip install 'fastdiff[plot]')"
        timings["plot_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    results["timings"] = timings
    atomic_write_with(os.path.join(outdir, "results.json"),
                        lambda f: f.write(json.dumps(results, indent=2).encode()))
    atomic_write_with(os.path.join(outdir, "report.md"), lambda f: f.write(_report(results).encode()))
    return results


def _table(results: dict) -> str:
    lines = ["| setting | mean log p | median log p | in 90% region | outside 99% region | FD (2-D) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in results["settings"].items():
        lines.append(f"| {name} | {m['mean_logp']:.3f} | {m['median_logp']:.3f} | {m['in_hdr90']:.3f} | "
                     f"{m['outside_hdr99']:.3f} | {m['fd2d']:.4f} |")
    return "\n".join(lines)


def _report(results: dict) -> str:
    s = results["settings"]
    w = results["guidance"]
    ng, ag, cfg = s["no guidance"], s[f"autoguidance w={w:g}"], s[f"CFG w={w:g}"]
    mn, gd, tm = results["main"], results["guide"], results["timings"]
    verdict = "higher" if ag["mean_logp"] > ng["mean_logp"] else "NOT higher"
    return f"""# fastdiff toy: CFG vs autoguidance on a 2-D tree

The autoguidance paper's two-class tree ({results['components']} anisotropic Gaussian components, exact
denoiser; `fastdiff.toy.mixture.tree_mixture`): per class a binary tree of 7 levels, every branch 8
Gaussians elongated along it, the two classes grown from a common root in opposite directions, with
prior masses 0.477 / 0.523. The sampler starts at sigma_max = {results.get('sigma_max', 5):g}. Main model: MP-MLP {mn['channels']} channels x {mn['blocks']} blocks, {mn['train_steps']}
steps of batch {mn['batch']} (label dropout 0.1, so a zero label is its unconditional version).
Guide: {gd['channels']} channels x {gd['blocks']} blocks, {gd['train_steps']} steps. EDM Heun,
{results['sampler_steps']} steps, {results['samples']} samples per setting (same noise and labels),
guidance weight w = {w:g}, seed {results['seed']}{' (fast mode)' if results['fast'] else ''}.

log p is the exact log-density of a sample under its class (nats, 2-D); "in 90% region" is the
fraction of samples whose log p exceeds the 10% quantile of exact samples' log p (0.9 for a perfect
sampler; guidance pushes it towards 1); "outside 99% region" counts outliers (0.01 for a perfect
sampler); FD is the 2-D Frechet distance to exact samples (0 is best; guidance trades it for fidelity).

{_table(results)}

Autoguidance vs no guidance: mean log p {ag['mean_logp']:.3f} vs {ng['mean_logp']:.3f} ({verdict}),
outliers {ag['outside_hdr99']:.3f} vs {ng['outside_hdr99']:.3f}; CFG: mean log p {cfg['mean_logp']:.3f},
outliers {cfg['outside_hdr99']:.3f}.

Time: train main {tm['train_main_s']:.1f} s, guide {tm['train_guide_s']:.1f} s, sampling
{tm['sampling_s']:.1f} s, total {tm['total_s']:.1f} s on {results['torch_threads']} torch thread(s).
"""


def _plot(path, mixture, settings, labels, metrics, grid):
    # The Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = -1.6, 1.6
    xs = torch.linspace(lo, hi, grid, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    logp = mixture.log_prob(pts).reshape(grid, grid).clamp_min(-12).numpy()
    cls = labels.argmax(1).numpy()
    colors = ["tab:orange", "tab:blue"]
    names = list(settings)
    fig = Figure(figsize=(16, 8.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    panels = [("ground-truth density", None)] + [(k, settings[k]) for k in names]
    for ax, (title, x) in zip(axes.flat, panels):
        ax.imshow(logp, origin="lower", extent=(lo, hi, lo, hi), cmap="Greys", alpha=0.9 if x is None else 0.35,
                  vmin=-12, vmax=float(logp.max()))
        if x is not None:
            x = x.float().numpy()
            for c in range(mixture.num_classes):
                sel = cls == c
                ax.scatter(x[sel, 0], x[sel, 1], s=1.5, c=colors[c % len(colors)], alpha=0.6, linewidths=0)
            m = metrics[title]
            title = f"{title}\nmean log p {m['mean_logp']:.2f}, in-90% {m['in_hdr90']:.2f}, FD {m['fd2d']:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=90))


def main(args: argparse.Namespace) -> int:
    with torch_threads(args.threads):
        results = run_toy(outdir=args.outdir, seed=args.seed, guidance=args.guidance, steps=args.steps,
                          fast=args.fast, samples=args.samples, train_steps=args.train_steps, quiet=args.quiet,
                          plot=not args.no_plot)
    print(_table(results))
    tm = results["timings"]
    if results.get("plot_error"):
        print(results["plot_error"])
    written = ", ".join(f for f in (results["plot"], "report.md", "results.json") if f)
    print(f"\nwrote {written} in {args.outdir} (total {tm['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    import sys

    p = argparse.ArgumentParser(prog="fastdiff toy", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
