"""The metrics pipeline: images -> detector features -> statistics -> metric values.

:func:`make_reference` (statistics of a dataset), :func:`calc_from_images` (a folder / .zip of generated
images against a reference) and :func:`calc_from_generator` (any iterator of uint8 NCHW batches, e.g. straight
from a sampler). Metric names: ``fd`` (reported as ``fid`` for Inception, ``fd_dinov2`` for DINOv2), ``pr``,
``kid``; ``fid`` and ``fd_dinov2`` also select their detector. Under torch.distributed each rank processes
its share and the statistics are all-reduced.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import numpy as np
import torch

from fastdiff.metrics.detectors import Detector, fd_metric_name, fd_metric_names, get_detector
from fastdiff.metrics.frechet import frechet_distance
from fastdiff.metrics.images import iterate_image_batches, open_images
from fastdiff.metrics.kid import kernel_inception_distance
from fastdiff.metrics.prdc import precision_recall
from fastdiff._dist import rank_and_world
from fastdiff.metrics.stats import FeatureStats, ReferenceStats, load_reference

__all__ = ["DEFAULT_NUM", "DEFAULT_MAX_FEATURES", "parse_metrics", "resolve_metrics", "requested_detector", "compute_feature_stats",
           "compute_metrics", "calc_from_generator", "calc_from_images", "make_reference", "select_indices"]

DEFAULT_NUM = 50_000  # the standard protocol: statistics over 50,000 generated images
DEFAULT_MAX_FEATURES = 50_000  # raw features kept for precision/recall and KID
SAMPLE_METRICS = ("pr", "kid")  # metrics that need raw features, not only mean/covariance


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """``"fid,pr"`` or ``["fid", "pr"]`` -> a de-duplicated, validated list of metric names."""
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = []
    for m in (str(x).strip().lower() for x in items):
        if m and m not in out:
            out.append(m)
    if not out:
        raise ValueError("no metrics requested")
    known = ["fd", *SAMPLE_METRICS, *fd_metric_names()]
    bad = [m for m in out if m not in known]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(known)}")
    return out


def resolve_metrics(metrics: str | Sequence[str], detector: str | None = None,
                    ref_detector: str | None = None) -> tuple[list[str], str]:
    """Canonical metrics (``fd`` / ``pr`` / ``kid``) and the one detector they are computed with.

    The detector comes from, and must agree between: an explicit ``detector``, the metric names
    (``fid`` -> inception, ``fd_dinov2`` -> dinov2) and the reference file's detector. Default: inception.
    """
    by_fd_name = fd_metric_names()
    wanted = parse_metrics(metrics)
    sources = {}
    for m in wanted:
        if m in by_fd_name:
            sources[f"metric {m!r}"] = by_fd_name[m]
    if detector is not None:
        sources["the requested detector"] = detector
    if ref_detector is not None:
        sources["the reference file"] = ref_detector
    names = set(sources.values())
    if len(names) > 1:
        detail = ", ".join(f"{src} -> {name}" for src, name in sources.items())
        raise ValueError(f"conflicting detectors ({detail}); one run uses one detector and a reference file made "
                         "with it (compute FID and FD_DINOv2 in separate runs)")
    name = names.pop() if names else "inception"
    canonical = []
    for m in wanted:
        m = "fd" if m in by_fd_name else m
        if m not in canonical:
            canonical.append(m)
    return canonical, name


def requested_detector(metrics: str | Sequence[str], detector: str | None = None) -> str | None:
    """The detector asked for by an explicit ``detector`` or the metric names (``fid`` -> inception,
    ``fd_dinov2`` -> dinov2), or None: which statistics to read from a reference file holding several (the
    official dataset-refs pickles). Conflicts are reported by :func:`resolve_metrics`."""
    if detector is not None:
        return detector
    by_fd_name = fd_metric_names()
    named = [by_fd_name[m] for m in parse_metrics(metrics) if m in by_fd_name]
    return named[0] if len(set(named)) == 1 else None


def select_indices(total: int, num: int | None, seed: int = 0) -> np.ndarray:
    """Which of ``total`` images to use: all (``num=None``), or ``num`` of them (a seeded random subset
    in sorted order when there are more). Fewer than ``num`` is an error."""
    if num is None:
        return np.arange(total)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if total < num:
        raise ValueError(f"found {total} images but {num} are required; the standard protocol uses {DEFAULT_NUM:,} "
                         f"images. Pass --num {total} to evaluate fewer, knowing the values are then "
                         "not comparable with published numbers.")
    if total == num:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, num, replace=False))


def _rank_share(num: int, rank: int, world: int) -> int:
    return num // world + (rank < num % world)


def compute_feature_stats(batches: Iterable[torch.Tensor], detector: Detector, *, num: int | None,
                          max_features: int = 0, seed: int = 0, progress: bool = True,
                          desc: str = "features") -> FeatureStats:
    """Feed uint8 batches through ``detector`` into a ``FeatureStats`` (all-reduced across ranks).

    ``num`` is the total number of images over all ranks (this rank consumes its share and never
    pulls a batch more than it needs; the last batch is truncated); ``None`` consumes everything.
    Running out before ``num`` images is an error.
    """
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    local = None if num is None else _rank_share(num, rank, world)
    stats = FeatureStats(max_features=max_features, seed=seed + rank)
    it = iter(batches)
    with tqdm(total=num, unit="img", desc=desc, disable=not progress or rank != 0, file=sys.stderr) as bar:
        while local is None or stats.count < local:
            batch = next(it, None)
            if batch is None:
                break
            if local is not None:
                batch = batch[:local - stats.count]
            stats.update(detector(batch))
            bar.update(len(batch) * world)
    if local is not None and stats.count < local:
        raise ValueError(f"the image source ran out after {stats.count} images; {local} were needed")
    stats.all_reduce()
    return stats


def compute_metrics(stats: FeatureStats, ref: ReferenceStats, metrics: Sequence[str], detector: Detector, *,
                    pr_k: int = 3, chunk_size: int = 10_000, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """Values of canonical ``metrics`` (``fd`` / ``pr`` / ``kid``) for ``stats`` against ``ref``."""
    if ref.detector != detector.name:
        raise ValueError(f"the reference was computed with detector {ref.detector!r}, not {detector.name!r}")
    if ref.feature_dim != stats.feature_dim:
        raise ValueError(f"feature dimensions differ: reference {ref.feature_dim}, images {stats.feature_dim}")
    results: dict[str, float] = {}
    for m in metrics:
        if m == "fd":
            fd = frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma, device=detector.device)
            results[fd_metric_name(detector.name)] = fd
        elif m in SAMPLE_METRICS:
            if ref.features is None or stats.features is None:
                raise ValueError(f"metric {m!r} needs raw features of both sets (reference and images)")
            if m == "pr":
                results.update(precision_recall(ref.features, stats.features, k=pr_k, chunk_size=chunk_size,
                                                device=detector.device))
            else:
                results["kid"] = kernel_inception_distance(ref.features, stats.features, num_subsets=kid_subsets,
                                                           subset_size=kid_subset_size, seed=seed,
                                                           device=detector.device)
        else:
            raise ValueError(f"unknown canonical metric {m!r}")
    return results


def _make_detector(detector, name: str, weights, device, batch_size: int) -> Detector:
    if isinstance(detector, Detector):
        return detector
    return get_detector(name, weights=weights, device=device, batch_size=batch_size)


def calc_from_generator(batches: Iterable[torch.Tensor], ref: ReferenceStats | str, *,
                        metrics: str | Sequence[str] = "fd", detector: Detector | str | None = None,
                        num: int | None = DEFAULT_NUM, device="cpu", batch_size: int = 64, weights=None,
                        max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0, progress: bool = True,
                        **metric_kwargs) -> dict[str, float]:
    """Metrics of the images an iterator yields (uint8 [n, 3, H, W] batches) against a reference.

    This is the hook for sampler-driven evaluation: pass a generator that samples batch after batch;
    exactly ``num`` images are consumed (fewer available is an error). ``ref`` is a
    ``ReferenceStats`` or a path to a reference ``.npz`` or official dataset-refs pickle; ``detector`` a
    ``Detector``, a registered name, or None (the reference's detector). ``metric_kwargs`` go to
    ``compute_metrics``. Returns e.g. ``{"fid": 2.1, "precision": 0.7, "recall": 0.6, "kid": 0.001}``.
    """
    det_name = detector.name if isinstance(detector, Detector) else detector
    ref = ref if isinstance(ref, ReferenceStats) else load_reference(ref, requested_detector(metrics, det_name))
    canonical, name = resolve_metrics(metrics, det_name, ref.detector)
    needs_features = any(m in SAMPLE_METRICS for m in canonical)
    if needs_features and ref.features is None:
        raise ValueError("precision/recall and KID need the reference's raw features, which this reference file "
                         "does not store; recreate it with `fastdiff metrics ref ... --metrics fd,pr,kid`")
    det = _make_detector(detector, name, weights, device, batch_size)
    stats = compute_feature_stats(batches, det, num=num, max_features=max_features if needs_features else 0,
                                  seed=seed, progress=progress, desc=f"{det.name} features")
    return compute_metrics(stats, ref, canonical, det, seed=seed, **metric_kwargs)


def _image_batches(path, num: int | None, batch_size: int, workers: int, seed: int, progress: bool,
                   resolution=None):
    """(batches of this rank's share of the selected images, number selected in total); every image of
    ``resolution`` (H, W) when given, else of the first one's."""
    files = open_images(path)
    indices = select_indices(len(files), num, seed)
    if progress and len(indices) < len(files):
        print(f"using a random subset of {len(indices):,} of the {len(files):,} images in {path}", file=sys.stderr)
    rank, world = rank_and_world()
    return (iterate_image_batches(files, indices[rank::world], batch_size, workers, resolution=resolution,
                                  what="the reference statistics' images"), len(indices))


def calc_from_images(images, ref: ReferenceStats | str, *, num: int | None = DEFAULT_NUM, batch_size: int = 64,
                     workers: int = 0, seed: int = 0, progress: bool = True, **kwargs) -> dict[str, float]:
    """``calc_from_generator`` on a folder or ``.zip`` of images (``num`` of them; None: all), each of the
    reference's resolution (when it records one)."""
    ref = ref if isinstance(ref, ReferenceStats) else load_reference(ref)
    batches, total = _image_batches(images, num, batch_size, workers, seed, progress, ref.resolution)
    return calc_from_generator(batches, ref, num=total, batch_size=batch_size, seed=seed, progress=progress,
                               **kwargs)


def make_reference(data, dest=None, *, metrics: str | Sequence[str] = "fd", detector: Detector | str | None = None,
                   num: int | None = DEFAULT_NUM, device="cpu", batch_size: int = 64, weights=None, workers: int = 0,
                   max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0, progress: bool = True) -> ReferenceStats:
    """Reference statistics of a folder or ``.zip`` of images; saved to ``dest`` (rank 0) when given.

    Raw features (at most ``max_features``) are stored when ``metrics`` include ``pr`` or ``kid``.
    """
    det_name = detector.name if isinstance(detector, Detector) else detector
    canonical, name = resolve_metrics(metrics, det_name)
    batches, total = _image_batches(data, num, batch_size, workers, seed, progress)
    det = _make_detector(detector, name, weights, device, batch_size)
    keep = max_features if any(m in SAMPLE_METRICS for m in canonical) else 0
    sizes = []  # the images' (H, W), one for all (iterate_image_batches checks), recorded in the file

    def recorded(batches):
        for b in batches:
            sizes.append(tuple(b.shape[-2:]))
            yield b

    stats = compute_feature_stats(recorded(batches), det, num=total, max_features=keep, seed=seed,
                                  progress=progress, desc=f"{det.name} features")
    ref = stats.to_reference(det.name)
    ref.resolution = sizes[0] if sizes else None
    if dest is not None and rank_and_world()[0] == 0:
        ref.save(dest)
    return ref
