"""Atomic file writes: a file appears under its name complete or not at all, never half-written.

The data goes to a temporary file in the destination's folder, is flushed to disk, and is renamed over
the destination (``os.replace`` is atomic on POSIX and Windows); on any error the temporary is removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Callable, Iterator


def _temp_beside(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` (e.g. a library's save-to-path function), then move the file to ``path``."""
    path = os.fspath(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_open(path, "w") as f: ...``: a file object whose content replaces ``path`` on success."""
    path = os.fspath(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb") -> None:
    """``write(f)`` on an open file object (e.g. ``img.save(f, format="PNG")``), atomically."""
    with atomic_open(path, mode) as f:
        write(f)
