"""Checks of command-line values made before any work starts (one clear line instead of a traceback, or an
error found only after minutes of training or sampling)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["prepare_outdir", "positive_count"]


def prepare_outdir(path, flag: str = "--outdir") -> str:
    """Create the output folder ``path`` (and its parents) now and check that files can be written in it;
    ``ValueError`` naming ``flag`` otherwise (a file in the way, a folder that cannot be created or written).
    Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create or write the folder ({exc.strerror or exc})") from None
    return path


def positive_count(value, flag: str, allow_none: bool = True):
    """``value`` if it is ``None`` (with ``allow_none``: the default applies) or a number > 0; else a
    ``ValueError`` naming ``flag`` (``--batch 0`` must not silently mean the default)."""
    if value is None and allow_none:
        return value
    if value is None or not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value
