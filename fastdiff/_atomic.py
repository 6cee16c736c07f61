"""Atomic file writes: a file appears under its name complete or not at all, never half-written.

The data goes to a temporary file in the destination's folder, is flushed to disk, and is renamed over
the destination (``os.replace`` is atomic on POSIX and Windows); on any error the temporary is removed.

A temporary is named ``.<name>.~fdtmp-<random>.tmp`` beside its destination: a process killed mid-write
(SIGKILL, power loss) leaves it behind, and :func:`remove_orphan_temps` finds exactly these names (and no
other file) so that a tool owning a folder can clear them when it starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import IO, Callable, Iterator


TEMP_MARK = "~fdtmp-"
_TEMP_NAME = re.compile(r"^\..+\." + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+\.tmp$")


def _temp_beside(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{TEMP_MARK}", suffix=".tmp", dir=folder)


def is_orphan_temp(name: str) -> bool:
    """Whether a file name is one of this module's temporaries (``.<name>.~fdtmp-<random>.tmp``)."""
    return bool(_TEMP_NAME.match(os.path.basename(name)))


def remove_orphan_temps(folder: str | os.PathLike) -> list[str]:
    """Delete this module's temporaries (:func:`is_orphan_temp`) directly in ``folder``: what a killed writer
    left behind. Call it only where no other process may be writing into ``folder`` at the moment (e.g. under
    the run directory's lock). Returns the removed paths; a missing folder is no error."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if is_orphan_temp(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
    return sorted(removed)


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
