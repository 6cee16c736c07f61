"""Streaming feature statistics and reference ``.npz`` files.

:class:`FeatureStats` accumulates, in float64, the count, sum and sum of outer products of the features it is
fed (any number of images in O(D^2) memory) and optionally a uniform random subset of the raw features for
precision/recall and KID. A reference file (:class:`ReferenceStats`) is a plain ``.npz`` holding ``mu``,
``sigma``, ``num_images``, ``detector`` and optionally ``features``; ``load`` also reads the official EDM2
dataset-refs pickles through the allow-list unpickler (plain containers and numeric arrays only).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from fastdiff._dist import rank_and_world
from fastdiff.metrics._util import atomic_write, check_features

__all__ = ["FeatureStats", "ReferenceStats", "save_reference", "load_reference"]

REF_FORMAT_VERSION = 1
_REQUIRED_KEYS = ("mu", "sigma", "num_images", "detector")


class FeatureStats:
    """Streaming float64 mean / covariance of feature vectors, optionally keeping raw features.

    Args:
        max_features: keep a uniform random subset of at most this many raw features (0: keep none).
        seed: seed of the subset selection.

    ``FeatureStats`` accumulates, in float64, the count, the sum and the sum of outer products of the
    features it is fed, so that any number of images can be summarised in O(D^2) memory::

        mu    = sum f / n
        Sigma = (sum f f^T - n mu mu^T) / (n - 1)
    """

    def __init__(self, max_features: int = 0, seed: int = 0):
        if max_features < 0:
            raise ValueError(f"max_features must be >= 0, got {max_features}")
        self.max_features = int(max_features)
        self.feature_dim: int | None = None
        self._n = 0
        self._sum: torch.Tensor | None = None  # [D] float64
        self._outer: torch.Tensor | None = None  # [D, D] float64
        self._kept: np.ndarray | None = None  # [max_features, D] float32 reservoir
        self._rng = np.random.default_rng(seed)
        self._reduced = False

    @property
    def count(self) -> int:
        return self._n

    def update(self, features) -> None:
        """Add a batch of features [N, D] (tensor on any device, or numpy array)."""
        f = check_features(features, "features", self.feature_dim)
        if self._sum is None:
            self.feature_dim = f.shape[1]
            self._sum = torch.zeros(self.feature_dim, dtype=torch.float64, device=f.device)
            self._outer = torch.zeros(self.feature_dim, self.feature_dim, dtype=torch.float64, device=f.device)
        f64 = f.to(self._sum.device, torch.float64)
        self._sum += f64.sum(0)
        self._outer += f64.T @ f64
        if self.max_features:
            self._keep(f.detach().to("cpu", torch.float32).numpy())
        self._n += f.shape[0]

    def _keep(self, f: np.ndarray) -> None:
        """Reservoir sampling: after n items each one is kept with probability max_features / n."""
        if self._kept is None:
            self._kept = np.empty((0, f.shape[1]), np.float32)
        room = self.max_features - len(self._kept)
        if room > 0:
            self._kept = np.concatenate([self._kept, f[:room]])
        seen = self._n + max(room, 0)
        for row in f[max(room, 0):]:
            seen += 1
            j = self._rng.integers(seen)
            if j < self.max_features:
                self._kept[j] = row

    def all_reduce(self) -> None:
        """Combine the statistics of all ranks of torch.distributed (a no-op when not initialised).

        Every rank must call it once, after its last ``update``; afterwards each rank holds the
        totals. Kept features are gathered and, when more than ``max_features``, subsampled.
        """
        rank, world = rank_and_world()
        if world == 1:
            return
        if self._reduced:
            raise RuntimeError("FeatureStats.all_reduce() was already called")
        dist = torch.distributed
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        dims = [None] * world
        dist.all_gather_object(dims, self.feature_dim)
        dims = {d for d in dims if d is not None}
        if len(dims) != 1:
            raise RuntimeError(f"ranks disagree on the feature dimension (or none has data): {sorted(dims)}")
        dim = dims.pop()
        if self._sum is None:
            self.feature_dim = dim
            self._sum = torch.zeros(dim, dtype=torch.float64)
            self._outer = torch.zeros(dim, dim, dtype=torch.float64)
        home = self._sum.device
        packed = torch.cat([torch.tensor([float(self._n)], dtype=torch.float64, device=home),
                            self._sum, self._outer.flatten()]).to(device)
        dist.all_reduce(packed)
        packed = packed.to(home)
        self._n = int(round(packed[0].item()))
        self._sum = packed[1:dim + 1].clone()
        self._outer = packed[dim + 1:].reshape(dim, dim).clone()
        if self.max_features:
            parts = [None] * world
            dist.all_gather_object(parts, self._kept)
            kept = np.concatenate([p for p in parts if p is not None] or [np.empty((0, dim), np.float32)])
            if len(kept) > self.max_features:
                kept = kept[np.sort(self._rng.choice(len(kept), self.max_features, replace=False))]
            self._kept = kept
        self._reduced = True

    def _require(self, n: int) -> None:
        if self._n < n:
            raise ValueError(f"need at least {n} feature vectors, have {self._n}")

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector [D], float64."""
        self._require(1)
        return (self._sum / self._n).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D], float64: (sum f f^T - n mu mu^T) / (n - 1)."""
        self._require(2)
        mu = self._sum / self._n
        cov = (self._outer - self._n * torch.outer(mu, mu)) / (self._n - 1)
        return cov.cpu().numpy()

    @property
    def features(self) -> np.ndarray | None:
        """The kept raw features [K, D] float32 (K <= max_features), or None when none are kept."""
        return None if self._kept is None else self._kept.copy()

    def to_reference(self, detector: str) -> "ReferenceStats":
        return ReferenceStats(mu=self.mean, sigma=self.cov, num_images=self._n, detector=detector,
                              features=self.features)


@dataclasses.dataclass
class ReferenceStats:
    """Statistics of a reference set: what ``fastdiff metrics ref`` writes and ``calc`` reads."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None  # None: not recorded (an official dataset-refs pickle)
    detector: str
    features: np.ndarray | None = None
    resolution: tuple[int, int] | None = None  # (H, W) of the reference images, when known

    def __post_init__(self):
        if self.resolution is not None:
            res = np.asarray(self.resolution).reshape(-1)
            if res.shape != (2,) or res.dtype.kind not in "iu" or not (0 < res).all() or not (res < 2**31).all():
                raise ValueError(f"reference resolution must be two positive integers (H, W), got {self.resolution!r}")
            self.resolution = (int(res[0]), int(res[1]))
        self.mu = np.asarray(self.mu, np.float64)
        self.sigma = np.asarray(self.sigma, np.float64)
        self.num_images = None if self.num_images is None or int(self.num_images) < 0 else int(self.num_images)
        self.detector = str(self.detector)
        d = self.mu.shape[0] if self.mu.ndim == 1 else None
        if d is None or self.sigma.shape != (d, d):
            raise ValueError(f"reference statistics need mu [D] and sigma [D, D], got {self.mu.shape} and "
                             f"{self.sigma.shape}")
        if self.features is not None:
            self.features = np.asarray(self.features, np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != d:
                raise ValueError(f"reference features must have shape [K, {d}], got {self.features.shape}")

    @property
    def feature_dim(self) -> int:
        return self.mu.shape[0]

    def validate(self) -> None:
        """``ValueError`` unless ``mu`` is finite and ``sigma`` a finite, symmetric, positive semi-definite
        matrix (within round-off; ``fastdiff.metrics.frechet.check_covariance``) and ``num_images >= 2``."""
        from fastdiff.metrics.frechet import check_covariance

        if not np.isfinite(self.mu).all():
            raise ValueError("reference mu contains NaN or Inf values")
        if self.num_images is not None and self.num_images < 2:
            raise ValueError(f"reference statistics of {self.num_images} image(s): a covariance needs at least 2")
        check_covariance(self.sigma, "reference sigma")

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (temporary file, then ``os.replace``)."""
        count = -1 if self.num_images is None else self.num_images  # -1: not recorded
        arrays = dict(mu=self.mu, sigma=self.sigma, num_images=np.int64(count),
                      detector=np.str_(self.detector), format_version=np.int64(REF_FORMAT_VERSION))
        if self.features is not None:
            arrays["features"] = self.features
        if self.resolution is not None:
            arrays["resolution"] = np.asarray(self.resolution, np.int64)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, detector: str | None = None) -> "ReferenceStats":
        """Read a file written by ``save``, or an official EDM2 dataset-refs pickle, with clear errors for
        missing or malformed content; the statistics are validated (:meth:`validate`: finite, symmetric
        positive semi-definite sigma).

        ``detector``: which statistics to take from an official pickle, which holds one set per feature
        network (``'fid'`` -> ``inception``, ``'fd_dinov2'`` -> ``dinov2``); default: Inception's if present,
        else the only one. An ``.npz`` holds one detector's statistics and ignores it (a mismatch is reported
        where the metrics are resolved)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference statistics file not found: {path} "
                                    f"(create one with `fastdiff metrics ref --data DIR --dest {path}`)")
        with open(path, "rb") as f:
            head = f.read(1)
        if head == b"\x80":  # a pickle: the official dataset refs
            return _load_official_refs(cls, path, detector)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as e:  # zipfile / numpy raise many different types for a corrupt file
            raise ValueError(f"{path} is not a readable .npz reference file: {e}") from e
        missing = [k for k in _REQUIRED_KEYS if k not in arrays]
        if missing:
            raise ValueError(f"{path} is not a fastdiff reference file: missing key(s) {missing} "
                             f"(found {sorted(arrays)}; expected {list(_REQUIRED_KEYS)} and optionally 'features')")
        try:
            ref = cls(mu=arrays["mu"], sigma=arrays["sigma"], num_images=arrays["num_images"].item(),
                      detector=arrays["detector"].item(), features=arrays.get("features"),
                      resolution=arrays.get("resolution"))
            ref.validate()
            return ref
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _load_official_refs(cls, path: str, detector: str | None) -> ReferenceStats:
    """An official EDM2 dataset-refs pickle: ``{metric: {'mu': array, 'sigma': array}}`` with ``metric`` the
    Frechet distance's name (``fid``, ``fd_dinov2``), read by the allow-list unpickler."""
    import torch as _torch

    from fastdiff.io.safe_pickle import PersistentObject, PlainObject, SafePickleError, read_plain, short_repr
    from fastdiff.metrics.detectors import fd_metric_names

    try:
        raw = read_plain(path)
    except SafePickleError as e:
        raise ValueError(f"{path} is neither a .npz reference file nor a readable official dataset-refs pickle: {e}"
                         ) from None
    expected = "a dict {'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}} of numpy arrays"

    def plain_only(obj, where):
        if isinstance(obj, (PersistentObject, PlainObject, _torch.Tensor)):
            raise ValueError(f"{path}: {where} is a {type(obj).__name__}; an official dataset-refs pickle is "
                             f"{expected}")
        if isinstance(obj, dict):
            for k, v in obj.items():
                plain_only(v, f"{where}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                plain_only(v, f"{where}[{i}]")

    plain_only(raw, "the file's content")
    by_name = fd_metric_names()  # {'fid': 'inception', 'fd_dinov2': 'dinov2', ...}
    # The release writes dict(num_images=N, fid=dict(mu=..., sigma=...), fd_dinov2=dict(...)).
    count = raw.get("num_images") if isinstance(raw, dict) else None
    metrics = {k: v for k, v in raw.items() if k != "num_images"} if isinstance(raw, dict) else None
    if not metrics or not all(k in by_name for k in metrics):
        found = ", ".join(map(repr, raw)) if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise ValueError(f"{path} is not a reference file: an official dataset-refs pickle is {expected} "
                         f"(found {found}; known metrics: {', '.join(by_name)})")
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer))):
        raise ValueError(f"{path}: 'num_images' is {short_repr(count)}, expected an integer")
    have = {by_name[k]: k for k in metrics}
    if detector is None:
        detector = "inception" if "inception" in have else (next(iter(have)) if len(have) == 1 else None)
        if detector is None:
            raise ValueError(f"{path} holds statistics for {', '.join(sorted(have))}: choose one with --detector "
                             "or --metrics")
    if detector not in have:
        raise ValueError(f"{path} has no {detector} statistics; it holds {', '.join(map(repr, metrics))} "
                         f"({', '.join(have)})")
    entry = metrics[have[detector]]
    if not isinstance(entry, dict) or not all(isinstance(entry.get(k), np.ndarray) for k in ("mu", "sigma")):
        raise ValueError(f"{path}[{have[detector]!r}] must be a dict with numpy arrays 'mu' and 'sigma'")
    features = entry.get("features")  # some forks also store the raw features (for precision/recall, KID)
    if features is not None and not isinstance(features, np.ndarray):
        raise ValueError(f"{path}[{have[detector]!r}]['features'] must be a numpy array")
    try:
        ref = cls(mu=entry["mu"], sigma=entry["sigma"], num_images=None if count is None else int(count),
                  detector=detector, features=features)
        ref.validate()
        return ref
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}[{have[detector]!r}]: {e}") from e


def save_reference(path: str | os.PathLike, ref: ReferenceStats) -> None:
    """Write ``ref`` to ``path`` (see ``ReferenceStats.save``)."""
    ref.save(path)


def load_reference(path: str | os.PathLike, detector: str | None = None) -> ReferenceStats:
    """Read a reference file: an ``.npz`` or an official dataset-refs pickle (see ``ReferenceStats.load``)."""
    return ReferenceStats.load(path, detector)
