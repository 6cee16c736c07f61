"""Loads the compiled extension ``fastdiff._C`` and answers which kernels it has.

If the extension is missing (a source checkout that was never built, a failed build), fastdiff still
works on the plain-PyTorch reference ops and says so once with a warning. Setting
``FASTDIFF_REFERENCE=1`` selects the reference ops on purpose, without a warning.

The CPU kernels pick their instruction set (AVX-512, AVX2 or the x86-64 baseline) from the CPU's feature
bits; ``FASTDIFF_ISA=avx512|avx2|baseline`` lowers it (never above what the CPU has), and ``isa()`` says
which one each kernel family runs.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from fastdiff import _build

FORCE_REFERENCE = os.environ.get("FASTDIFF_REFERENCE", "0") not in ("", "0")
LOAD_ERROR: Exception | None = None
ISA_LEVELS = ("avx512", "avx2", "baseline")
if os.environ.get("FASTDIFF_ISA", "") not in ("", *ISA_LEVELS):
    raise ValueError(
        f"fastdiff: FASTDIFF_ISA must be one of {', '.join(ISA_LEVELS)} (or unset), got {os.environ['FASTDIFF_ISA']!r}"
    )

# Checked before _C is imported: an extension built for another torch must never be loaded (fastdiff._build).
BUILD_PROBLEM = _build.extension_problem()
try:
    if BUILD_PROBLEM is not None:
        raise ImportError(BUILD_PROBLEM)
    from fastdiff import _C  # noqa: F401  (registers torch.ops.fastdiff.*)

    LOADED = True
except ImportError as exc:  # pragma: no cover - exercised only in unbuilt checkouts
    LOADED = False
    LOAD_ERROR = exc
    if BUILD_PROBLEM is not None and not FORCE_REFERENCE:
        warnings.warn(f"fastdiff: {BUILD_PROBLEM}. Running on the plain-PyTorch reference ops, which are correct but "
                      "slower (`fastdiff info` shows the build).", RuntimeWarning, stacklevel=2)
    elif not FORCE_REFERENCE:
        warnings.warn(
            f"fastdiff: the compiled extension fastdiff._C could not be loaded ({exc}); running on the "
            "plain-PyTorch reference ops, which are correct but slower. Build it with "
            "`pip install --no-build-isolation -e .` (see README.md).",
            RuntimeWarning,
            stacklevel=2,
        )

_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _kernel_table() -> dict[tuple[str, str], bool]:
    """(op, device type) -> whether a kernel exists; computed once, so lookups are plain dict reads
    that torch.compile can trace."""
    table: dict[tuple[str, str], bool] = {}
    if not LOADED:
        return table
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("fastdiff::"):
            continue
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")
        for device_type, key in _KEYS.items():
            has = composite or torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
            table[(name.split("::", 1)[1], device_type)] = has
    return table


KERNELS = _kernel_table()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.fastdiff.<op>`` has a kernel for ``device_type`` ('cpu', 'cuda', ...)."""
    return KERNELS.get((op, device_type), False)


def kernels() -> dict[str, list[str]]:
    """Every public fastdiff op (private ones such as ``_isa`` left out) and the devices it has kernels for."""
    if not LOADED:
        return {}
    ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdiff::")
                 and not n.startswith("fastdiff::_"))
    return {op: [d for d in _KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{op}", _KEYS[d])] for op in ops}


def isa() -> dict[str, str]:
    """The instruction set each CPU kernel family runs now, e.g. ``{"elementwise": "avx512", "solver":
    "avx512", "attention": "avx2"}``; empty without the extension."""
    if not LOADED:
        return {}
    return dict(pair.split(":", 1) for pair in torch.ops.fastdiff._isa(None).split(","))


@contextlib.contextmanager
def force_isa(level: str):
    """Within this block the CPU kernels run at most ``level`` (one of ISA_LEVELS; capped at what the CPU
    has). Process-wide: for tests and benchmarks, not for use while other threads run kernels."""
    if level not in ISA_LEVELS:
        raise ValueError(f"fastdiff: expected an ISA level in {ISA_LEVELS}, got {level!r}")
    old = isa()["elementwise"]
    torch.ops.fastdiff._isa(level)
    try:
        yield isa()
    finally:
        torch.ops.fastdiff._isa(old)
