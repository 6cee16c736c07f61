"""Checks of command-line values made before any work starts (one clear line instead of a traceback, or an
error found only after minutes of training or sampling)."""

from __future__ import annotations

from fastdiff._atomic import prepare_outdir  # noqa: F401  (re-exported: the commands' --outdir check)

__all__ = ["prepare_outdir", "positive_count"]


def positive_count(value, flag: str, allow_none: bool = True):
    """``value`` if it is ``None`` (with ``allow_none``: the default applies) or a number > 0; else a
    ``ValueError`` naming ``flag`` (``--batch 0`` must not silently mean the default)."""
    if value is None and allow_none:
        return value
    if value is None or not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value
