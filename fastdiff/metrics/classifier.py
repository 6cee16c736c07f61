"""A small CNN digit classifier as a feature detector: the demo's metric ("FD on the classifier's
features", not FID) and class-consistency check, reusable by ``fastdiff sweep`` and ``fastdiff metrics``.

``train_classifier`` fits it in seconds on a 2-core CPU; ``save_classifier`` writes a ``.safetensors``
file with its shape in the metadata; the registered detector ``classifier`` (``get_detector("classifier",
weights=PATH)``, ``--detector classifier --detector-weights PATH``) loads such a file and yields the
128-d penultimate features.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch

from fastdiff._atomic import atomic_write
from fastdiff.metrics.detectors import ModuleDetector, register_detector

__all__ = ["DigitClassifier", "train_classifier", "classify", "save_classifier", "load_classifier",
           "classifier_detector", "to_unit"]

ENV_VAR = "FASTDIFF_CLASSIFIER"


class DigitClassifier(torch.nn.Module):
    """conv-conv-pool-conv-pool-fc(128)-fc for 1- or 3-channel images of 16 to 32 pixels.
    ``features(x)`` is the 128-d penultimate layer (after ReLU); input float in [0, 1]."""

    feature_dim = 128

    def __init__(self, channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.channels, self.num_classes, self.resolution = int(channels), int(num_classes), int(resolution)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(64 * 16, self.feature_dim), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_unit(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C', H, W] -> float [N, channels, H, W] in [0, 1] (3 -> 1 channel by averaging)."""
    x = images.to(torch.float32) / 255
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int, seed: int,
                     device="cpu", progress: bool = False) -> tuple[DigitClassifier, float, int]:
    """Trains on a seeded 80% split (with +-1 pixel random shifts); returns (classifier in eval mode,
    held-out accuracy, held-out size)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed + 12345)
    n = len(images)
    perm = torch.randperm(n, generator=gen)
    n_test = max(n // 5, 1)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    channels, res = x_all.shape[1], x_all.shape[-1]
    torch.manual_seed(seed + 54321)
    clf = DigitClassifier(channels, num_classes, res).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    xt, yt = x_all[train_idx], y_all[train_idx]
    batch = 64
    steps_per_epoch = math.ceil(len(xt) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(epochs * steps_per_epoch, 1))
    clf.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", disable=not progress, file=sys.stderr):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            x = to_unit(xt[idx], channels)
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(clf(x.to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf.eval().requires_grad_(False)
    pred = classify(clf, x_all[test_idx], device)
    acc = float((pred == y_all[test_idx]).double().mean())
    return clf, acc, int(n_test)


def classify(clf: DigitClassifier, images: torch.Tensor, device="cpu", batch: int = 256) -> torch.Tensor:
    """Predicted class of uint8 images (on the CPU)."""
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch):
            out.append(clf(to_unit(chunk, clf.channels).to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def save_classifier(clf: DigitClassifier, path, extra: dict | None = None) -> None:
    """Write the weights with ``channels`` / ``num_classes`` / ``resolution`` in the metadata (atomically)."""
    from safetensors.torch import save_file

    meta = dict(kind="fastdiff-digit-classifier", channels=clf.channels, num_classes=clf.num_classes,
                resolution=clf.resolution, extra=extra or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()}
    atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata={"fastdiff": json.dumps(meta)}))


def load_classifier(path, device="cpu") -> DigitClassifier:
    """Read a file written by :func:`save_classifier`; a file of another kind or shape is a ValueError."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights {path!r} do not exist (the demo writes OUTDIR/classifier.safetensors)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fastdiff", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors and json raise several types
        raise ValueError(f"{path}: not a readable classifier file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("kind") != "fastdiff-digit-classifier":
        raise ValueError(f"{path}: not a fastdiff digit classifier (no 'fastdiff-digit-classifier' metadata)")
    try:
        dims = [int(meta[k]) for k in ("channels", "num_classes", "resolution")]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad classifier metadata ({exc})") from exc
    if not (dims[0] in (1, 3) and 1 <= dims[1] <= 10_000 and 4 <= dims[2] <= 1024):
        raise ValueError(f"{path}: implausible classifier shape {dims}")
    clf = DigitClassifier(*dims)
    try:
        clf.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the tensors do not fit the classifier ({exc})") from exc
    return clf.to(device).eval().requires_grad_(False)


class _Features(torch.nn.Module):
    def __init__(self, clf: DigitClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.features(x)


def classifier_detector(clf: DigitClassifier, device="cpu", batch_size: int = 256) -> ModuleDetector:
    """The detector ``classifier``: the 128-d penultimate features of ``clf``."""
    return ModuleDetector(_Features(clf), "classifier", DigitClassifier.feature_dim,
                          preprocess=lambda x: to_unit(x, clf.channels), device=device, batch_size=batch_size)


def _factory(weights=None, device="cpu", batch_size: int = 64) -> ModuleDetector:
    path = weights if weights is not None else os.environ.get(ENV_VAR)
    if path is None:
        raise FileNotFoundError(f"detector 'classifier' needs its weights file: --detector-weights PATH (or ${ENV_VAR}); "
                                "`fastdiff demo` writes OUTDIR/classifier.safetensors")
    return classifier_detector(load_classifier(path, device), device, batch_size)


register_detector("classifier", _factory, fd_name="fd_classifier", overwrite=True)
