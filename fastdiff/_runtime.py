"""Small run-time helpers every layer uses: the dtype names, NVTX ranges and whether ``torch.compile``
is tracing.

NVTX ranges (for profiling with Nsight Systems) are on when the ``nvtx`` package imports and CUDA is
available, or when ``FASTDIFF_NVTX=1``; ``FASTDIFF_NVTX=0`` turns them off. When off, :func:`nvtx_range` returns one shared no-op context
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

# Every dtype name fastdiff accepts (networks, the training precision, commands' --dtype), long and short.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def dtype_of(name) -> torch.dtype:
    """A ``torch.dtype`` from one of :data:`DTYPE_NAMES` (``"torch.float16"`` too), or the dtype itself."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().replace("torch.", "")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


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


def is_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces the calling code."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False
