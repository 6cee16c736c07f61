"""EMA snapshot files: one safetensors file per network, with JSON metadata.

The layout is that of ``fastdiff.io.save_network`` (metadata key ``"fastdiff"`` holding a JSON object with
``format``, ``class``, ``kwargs``, ``preset``, ``fastdiff_version`` and ``extra``), so a snapshot loads with
``fastdiff.io.load_network`` like any other network file. ``extra`` says what the file is:
``{"kind": "ema", "nimg": ..., "step": ..., "batch_size": ..., "std": ..., "exponent": ...}`` for a tracked
EMA, ``{"kind": "phema", ...}`` for a post-hoc reconstruction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from fastdiff._atomic import atomic_write

__all__ = ["atomic_write", "save_snapshot", "read_snapshot_meta", "load_snapshot_tensors", "list_snapshots",
           "SnapshotInfo", "snapshot_name"]

FORMAT = "fastdiff.network/1"
META_KEY = "fastdiff"


def network_config(net: torch.nn.Module) -> dict:
    """The ``fastdiff.io`` network config of ``net`` (constructor arguments when it has ``init_kwargs``)."""
    import fastdiff

    return {
        "format": FORMAT,
        "class": type(net).__name__,
        "kwargs": getattr(net, "init_kwargs", None),
        "preset": getattr(net, "preset", None),
        "fastdiff_version": fastdiff.__version__,
    }


def snapshot_name(nimg: int, std: float | None, prefix: str = "network-snapshot") -> str:
    tail = "" if std is None else f"-{std:.3f}"
    return f"{prefix}-{int(nimg):010d}{tail}.safetensors"


def save_tensors(tensors: dict[str, torch.Tensor], path, config: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(config)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_snapshot(net: torch.nn.Module, path, extra: dict) -> None:
    """Write ``net``'s state dict to ``path`` (atomically) with ``extra`` in the metadata."""
    config = network_config(net)
    config["extra"] = dict(extra)
    save_tensors(net.state_dict(), path, config)


def read_snapshot_meta(path) -> dict:
    """The JSON config stored in a network file; ``ValueError`` naming the file when it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if META_KEY not in meta:
        raise ValueError(f"{path}: no fastdiff metadata (not written by fastdiff)")
    try:
        return json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt fastdiff metadata ({exc})") from exc


def load_snapshot_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(path), device=str(device))
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the tensors ({exc})") from exc


@dataclass
class SnapshotInfo:
    path: str
    nimg: int
    std: float
    exponent: float
    step: int | None
    batch_size: int | None
    config: dict


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
