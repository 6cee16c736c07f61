"""uint8 images as files and grids: what generation, the demo and the commands share."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastdiff._atomic import atomic_write_with

__all__ = ["make_grid", "save_png"]


def make_grid(images: Sequence[torch.Tensor] | torch.Tensor, cols: int | None = None, scale: int = 1, pad: int = 0,
              fill: int = 0) -> torch.Tensor:
    """uint8 ``[C, H, W]`` images (a list, or a tensor ``[N, C, H, W]``) as one uint8 grid ``[C, rows (H scale +
    pad) + pad, cols (W scale + pad) + pad]``, row-major: ``cols`` columns (default: a near-square grid), each
    image upscaled ``scale`` times (nearest neighbour), ``pad`` pixels of value ``fill`` around the cells."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = max(math.ceil(n / cols), 1)
    c, h, w = images[0].shape
    hs, ws = h * scale, w * scale
    grid = torch.full((c, rows * (hs + pad) + pad, cols * (ws + pad) + pad), fill, dtype=torch.uint8)
    for k, img in enumerate(images):
        if scale != 1:
            img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        r, q = divmod(k, cols)
        y, x = pad + r * (hs + pad), pad + q * (ws + pad)
        grid[:, y:y + hs, x:x + ws] = img
    return grid


def save_png(image, path: str) -> None:
    """A uint8 image as a PNG, written atomically (fastdiff._atomic): a tensor ``[C, H, W]`` (C = 1 or 3), or
    an array ``[H, W]`` / ``[H, W, 3]``."""
    import numpy as np
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    pil = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    atomic_write_with(path, lambda f: pil.save(f, format="PNG"))
