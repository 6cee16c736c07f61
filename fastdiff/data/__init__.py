"""Datasets: a folder or zip of images (or ``.npy`` latents) with ``dataset.json`` labels, built-in offline
datasets, and the infinite resumable sampler that splits batches across ranks."""

from __future__ import annotations

import os

from fastdiff.data.dataset import ArrayDataset, Dataset, DatasetError, ImageDataset, to_model_input
from fastdiff.data.sampler import InfiniteSampler, make_loader

__all__ = ["Dataset", "ImageDataset", "ArrayDataset", "DatasetError", "InfiniteSampler", "make_loader",
           "open_dataset", "to_model_input"]


def open_dataset(spec: str, resolution: int | None = None, channels: int | None = None, xflip: bool = False,
                 use_labels: bool = True, max_size: int | None = None) -> Dataset:
    """``spec``: ``builtin:digits``, ``builtin:mnist``, ``builtin:shapes[?n=..&seed=..]``, a folder or a zip.

    ``resolution`` / ``channels``: what the network expects (built-in data is made to fit; files must match)."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        from fastdiff.data.builtin import load_builtin

        ds = load_builtin(spec[len("builtin:"):], resolution=resolution, channels=channels, xflip=xflip)
        if not use_labels:
            ds.labels, ds.label_dim = None, 0
        if max_size is not None and max_size < ds.raw_len:
            ds = ArrayDataset(ds.images[:max_size], None if ds.labels is None else ds.labels[:max_size],
                              name=ds.name, xflip=xflip, label_dim=ds.label_dim or None)
        return ds
    if not os.path.exists(spec):
        raise FileNotFoundError(f"dataset not found: {spec} (a folder, a .zip, or builtin:digits / builtin:mnist / "
                                f"builtin:shapes)")
    return ImageDataset(spec, resolution=resolution, channels=channels, xflip=xflip, use_labels=use_labels,
                        max_size=max_size)
