"""One network from any file ``--net`` takes: fastdiff's own format, an official EDM2 pickle or a
``torch.save`` file, told apart by their first bytes (never by the file name)."""

from __future__ import annotations

import os

from fastdiff.io.edm2_pickle import load_edm2_network
from fastdiff.io.network_file import load_network

__all__ = ["load_any_network", "load_network_and_info"]


def load_any_network(path, device="cpu", key=None, max_bytes=None):
    """One network from ``path``, whatever its format (sniffed from the content):

    * a fastdiff network file (``.safetensors``) -> :func:`fastdiff.io.load_network`;
    * an official EDM2 pickle -> entry ``key`` (default ``'ema'``) via the safe importer;
    * a ``torch.save`` file holding a ``Precond`` state dict (config inferred from names and shapes,
      see :func:`fastdiff.io.edm2_pickle.infer_precond_kwargs`), or a dict with such a state dict or a
      network under ``key`` (default: ``'ema'``, ``'net'``, ``'state_dict'``, ``'model'``, the first present).

    ``max_bytes``: for pickles and ``torch.save`` files, what reading the file and building the network may
    allocate (default: a multiple of the file's size; see ``fastdiff.io.safe_pickle``).
    """
    return load_network_and_info(path, device, key, max_bytes)[0]


def load_network_and_info(path, device="cpu", key=None, max_bytes=None):
    """``(network, info)``: :func:`load_any_network`'s network, and the file's other top-level entries as
    plain data (other networks as ``{'class_name': ...}`` only); ``info`` is ``{}`` for fastdiff files. The
    network keeps ``info`` as ``net.source_entries`` (so an img512 network knows its encoder record)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"\x80") or head == b"PK\x03\x04"):
        return load_network(path, device=device), {}
    return load_edm2_network(path, device, key, max_bytes)
