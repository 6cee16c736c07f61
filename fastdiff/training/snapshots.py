"""EMA snapshot files: fastdiff network files (``fastdiff.io.network_file``, format ``fastdiff.network/1``),
one per tracked EMA, so a snapshot loads with ``fastdiff.io.load_network`` like any other network file.

The config's ``extra`` says what the file is: ``{"kind": "ema", "nimg": ..., "step": ..., "batch_size": ...,
"std": ..., "exponent": ...}`` for a tracked EMA, ``{"kind": "phema", ...}`` for a post-hoc reconstruction.
The writer, the reader and the digest check are ``fastdiff.io``'s; this module names and lists snapshots.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from fastdiff._atomic import atomic_write
from fastdiff.io.network_file import network_config, read_network_config, read_network_tensors, write_network_file

__all__ = ["atomic_write", "save_snapshot", "read_snapshot_meta", "load_snapshot_tensors", "list_snapshots",
           "list_official_snapshots", "official_kimg_to_nimg", "SnapshotInfo", "snapshot_name", "network_config",
           "save_tensors"]

# Training's names for the network file functions of fastdiff.io (one implementation).
save_tensors = write_network_file
read_snapshot_meta = read_network_config
load_snapshot_tensors = read_network_tensors


def snapshot_name(nimg: int, std: float | None, prefix: str = "network-snapshot") -> str:
    tail = "" if std is None else f"-{std:.3f}"
    return f"{prefix}-{int(nimg):010d}{tail}.safetensors"


def save_snapshot(net: torch.nn.Module, path, extra: dict) -> None:
    """Write ``net``'s state dict to ``path`` (atomically) with ``extra`` in the metadata."""
    config = network_config(net)
    config["extra"] = dict(extra)
    save_tensors(net.state_dict(), path, config)


@dataclass
class SnapshotInfo:
    path: str
    nimg: int
    std: float
    exponent: float
    step: int | None
    batch_size: int | None
    config: dict | None  # None for an official pickle (read when the file is loaded)
    official: bool = False


def list_snapshots(indir, kind: str = "ema") -> list[SnapshotInfo]:
    """The EMA snapshots in ``indir`` (by their metadata, not their names), sorted by (nimg, std)."""
    indir = os.fspath(indir)
    if not os.path.isdir(indir):
        raise FileNotFoundError(f"no such folder: {indir}")
    out = []
    for name in sorted(os.listdir(indir)):
        if not name.endswith(".safetensors") or name.startswith("."):
            continue
        path = os.path.join(indir, name)
        try:
            config = read_snapshot_meta(path)
        except ValueError:
            if re.match(r"network-snapshot-", name):
                raise
            continue
        extra = config.get("extra") or {}
        if extra.get("kind") != kind:
            continue
        try:
            out.append(SnapshotInfo(path=path, nimg=int(extra["nimg"]), std=float(extra["std"]),
                                    exponent=float(extra.get("exponent", "nan")), step=extra.get("step"),
                                    batch_size=extra.get("batch_size"), config=config))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: snapshot metadata lacks nimg/std ({exc})") from exc
    out.sort(key=lambda s: (s.nimg, s.std))
    return out


# The official training loop's raw snapshots: ``<prefix>-<kimg:07d>-<std:.3f>.pkl``, a pickle of
# ``{'ema': Precond (float16), 'loss_fn': ..., 'encoder': ..., 'dataset_kwargs': ...}``.
_OFFICIAL_NAME = re.compile(r"(.*)-(\d+)-(\d+\.\d+)\.pkl")


def official_kimg_to_nimg(kimg: int) -> int:
    """The training time (images) of an official snapshot named by ``kimg = nimg // 1000``: the official runs
    count images in multiples of 1024, so ``nimg`` is the multiple of 1024 with ``nimg // 1000 == kimg``
    (the official reconstruction's rule); ``kimg * 1000`` when there is none."""
    kimg = int(kimg)
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    return nimg if nimg // 1000 == kimg else kimg * 1000


def list_official_snapshots(indir, prefix: str | None = None) -> list[SnapshotInfo]:
    """The official EDM2 raw snapshots in ``indir`` (by their names, as the official reconstruction lists
    them: training time and std from ``<prefix>-<kimg>-<std>.pkl``), sorted by (nimg, std). Nothing is read."""
    from fastdiff.training.phema import std_to_exp

    indir = os.fspath(indir)
    if not os.path.isdir(indir):
        raise FileNotFoundError(f"no such folder: {indir}")
    out = []
    for name in sorted(os.listdir(indir)):
        m = _OFFICIAL_NAME.fullmatch(name)
        path = os.path.join(indir, name)
        if not m or name.startswith(".") or not os.path.isfile(path):
            continue
        if prefix is not None and m.group(1) != prefix:
            continue
        std = float(m.group(3))
        try:
            exponent = std_to_exp(std)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        out.append(SnapshotInfo(path=path, nimg=official_kimg_to_nimg(int(m.group(2))), std=std, exponent=exponent,
                                step=None, batch_size=None, config=None, official=True))
    out.sort(key=lambda s: (s.nimg, s.std))
    return out
