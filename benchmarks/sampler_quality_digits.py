"""Quality against network evaluations for every sampler on the CPU preset: a tiny-16 network trained on
builtin:digits for ``--kimg`` thousand images (fastdiff.training, as `fastdiff demo` trains), scored by the
demo's metric, the Frechet distance in the 128-d feature space of the demo's small digit classifier
("FD(classifier)", not FID) between ``--num`` generated images (seeds 0..num-1, a random class per
seed, no guidance) and all the real images.

    PYTHONPATH=. python benchmarks/sampler_quality_digits.py --outdir /tmp/sq --kimg 8 --num 256
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

from fastdiff.data import open_dataset
from fastdiff.experiments.demo.training import train_network
from fastdiff.io import load_network
from fastdiff.metrics import compute_feature_stats, frechet_distance
from fastdiff.metrics.classifier import classifier_detector, train_classifier
from fastdiff.sampling import SAMPLERS, generate_images


def _fd(images: torch.Tensor, detector, ref) -> float:
    stats = compute_feature_stats(images.split(256), detector, num=len(images), progress=False)
    return float(frechet_distance(stats.mean, stats.cov, ref.mean, ref.cov))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", required=True)
    p.add_argument("--kimg", type=float, default=8.0)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--steps", type=int, nargs="+", default=[6, 12, 24])
    p.add_argument("--rtol", type=float, nargs="+", default=[0.1, 0.03])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--classifier-epochs", type=int, default=6)
    args = p.parse_args()
    device = torch.device("cpu")
    dataset = open_dataset("builtin:digits", resolution=16, channels=1)
    real = torch.from_numpy(np.ascontiguousarray(dataset.images))
    t = time.perf_counter()
    clf, acc, _ = train_classifier(dataset.images, np.asarray(dataset.labels, dtype=np.int64),
                                   int(dataset.label_dim), epochs=args.classifier_epochs, seed=0, device=device, progress=False)
    detector = classifier_detector(clf, device=device)
    ref = compute_feature_stats(real.split(256), detector, num=len(real), progress=False)
    print(f"classifier accuracy {acc:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    rundir = os.path.join(args.outdir, "train")
    info = train_network("tiny-16", dataset, rundir, kimg=args.kimg, batch=64, label_dropout=0.0, seed=0,
                         device=device, progress=False)
    last = sorted(glob.glob(os.path.join(rundir, "network-snapshot-*-0.100.safetensors")))[-1]
    net = load_network(last, device=device).eval().requires_grad_(False)
    print(f"trained {info['kimg']} kimg in {info['time']['wall_s']:.0f} s ({os.path.basename(last)})", file=sys.stderr, flush=True)
    rows = []
    for name in args.samplers:
        settings = ([dict(rtol=r, atol=r / 10) for r in args.rtol] if name == "dpm_adaptive"
                    else [dict(steps=s) for s in args.steps])
        for kw in settings:
            t = time.perf_counter()
            counted = {"n": 0}

            def counting(x, sigma, labels=None, _net=net):
                counted["n"] += 1
                return _net(x, sigma, labels)

            for attr in ("img_resolution", "img_channels", "label_dim"):
                setattr(counting, attr, getattr(net, attr))
            images = torch.cat([im for _, im in generate_images(counting, range(args.num), sampler=name,
                                                                 batch=args.num, **kw)])
            fd = _fd(images, detector, ref)
            setting = f"rtol {kw['rtol']}" if "rtol" in kw else f"{kw['steps']} steps"
            rows.append((name, setting, counted["n"], fd))
            print(f"{name:20s} {setting:12s} NFE {counted['n']:4d}  FD {fd:8.3f}  ({time.perf_counter() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    print("\n| sampler | setting | network evaluations | FD(classifier) |")
    print("|---|---|---:|---:|")
    for name, setting, nfe, fd in rows:
        print(f"| {name} | {setting} | {nfe} | {fd:.2f} |")


if __name__ == "__main__":
    main()
