"""NVTX ranges for profiling (Nsight Systems), free when they are off.

Ranges are on when the ``nvtx`` package imports and CUDA is available, or when ``FASTDIFF_NVTX=1``;
``FASTDIFF_NVTX=0`` turns them off. When off, :func:`nvtx_range` returns one shared no-op context
manager, so a CPU run pays a function call and nothing else.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # pragma: no cover - depends on the environment
    import nvtx as _nvtx
except Exception:  # noqa: BLE001
    _nvtx = None

_NULL = contextlib.nullcontext()


def _enabled() -> bool:
    flag = os.environ.get("FASTDIFF_NVTX", "")
    if _nvtx is None or flag == "0":
        return False
    return flag == "1" or torch.cuda.is_available()


ENABLED = _enabled()


def nvtx_range(name: str):
    """A context manager marking ``name`` on the NVTX timeline (a shared no-op when disabled)."""
    if ENABLED:
        return _nvtx.annotate(name, domain="fastdiff")
    return _NULL
