"""fastdiff's own network files: one ``.safetensors`` file holding the weights (and buffers) and, in its
metadata, a JSON config (class name, constructor arguments, preset name) to rebuild the network.

Writes go to a temporary file in the same folder that is then renamed over the target, so a crash never
leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os

import torch

from fastdiff._atomic import atomic_write

__all__ = ["save_network", "load_network", "read_network_config", "FORMAT", "atomic_write"]

FORMAT = "fastdiff.network/1"
_META_KEY = "fastdiff"


def _config_of(net) -> dict:
    kwargs = getattr(net, "init_kwargs", None)
    if kwargs is None:
        raise TypeError(
            f"save_network: expected a fastdiff.nn.Precond (with init_kwargs), got {type(net).__name__}"
        )
    import fastdiff

    return {
        "format": FORMAT,
        "class": type(net).__name__,
        "kwargs": kwargs,
        "preset": getattr(net, "preset", None),
        "fastdiff_version": fastdiff.__version__,
    }


def save_network(net: torch.nn.Module, path, extra: dict | None = None) -> None:
    """Write ``net`` (a ``fastdiff.nn.Precond``) to ``path`` as a single safetensors file.

    ``extra``: optional JSON-serializable information stored alongside (e.g. training step, EMA std).
    """
    from safetensors.torch import save_file

    config = _config_of(net)
    if extra is not None:
        config["extra"] = extra
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {_META_KEY: json.dumps(config)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_network_config(path) -> dict:
    """The JSON config stored in a fastdiff network file; a clear ``ValueError`` for any other file."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_network: no such file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        hint = ""
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80" or head == b"PK":
            hint = " (it looks like a pickle / torch.save file; official EDM2 .pkl files need the pickle importer)"
        raise ValueError(f"load_network: {path} is not a safetensors file{hint}: {exc}") from None
    if _META_KEY not in meta:
        raise ValueError(
            f"load_network: {path} is a safetensors file but not a fastdiff network file (no '{_META_KEY}' "
            "config in its metadata); write one with fastdiff.io.save_network"
        )
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_network: {path} has a corrupt fastdiff config: {exc}") from None
    if not str(config.get("format", "")).startswith("fastdiff.network/"):
        raise ValueError(f"load_network: {path}: unknown format {config.get('format')!r}, expected {FORMAT}")
    return config


def load_network(path, device="cpu"):
    """Rebuild the network saved by ``save_network`` and load its weights (strict) onto ``device``.

    Returns a ``fastdiff.nn.Precond`` in eval mode; ``net.preset`` and ``net.checkpoint_extra`` are set
    from the file.
    """
    from safetensors.torch import load_file

    from fastdiff import nn as fnn

    config = read_network_config(path)
    cls_name = config.get("class")
    cls = getattr(fnn, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"load_network: {path}: unknown network class {cls_name!r}")
    state = load_file(os.fspath(path), device=str(device))
    with torch.device("meta"):
        net = cls(**config["kwargs"])
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"load_network: {path}: the weights do not match the stored config: {exc}") from None
    net.preset = config.get("preset")
    net.checkpoint_extra = config.get("extra")
    return net.to(device).eval()
