"""Atomic file writes: a file appears under its name complete or not at all, never half-written.

The data goes to a temporary file in the destination's folder, is flushed to disk, and is renamed over
the destination (``os.replace`` is atomic on POSIX and Windows); on any error the temporary is removed.

A temporary is named ``.<name>.~fdtmp-<random>.tmp`` beside its destination: a process killed mid-write
(SIGKILL, power loss) leaves it behind, and :func:`remove_orphan_temps` finds exactly these names (and no
other file) so that a tool owning a folder can clear them when it starts.

The file (or folder, :func:`temp_dir_beside`) gets the mode a plain ``open()`` (``mkdir``) would give it,
``0o666`` (``0o777``) less the umask, not the private ``0o600`` of ``tempfile``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import IO, Callable, Iterator


TEMP_MARK = "~fdtmp-"
_TEMP_NAME = re.compile(r"^\..+\." + re.escape(TEMP_MARK) + r"[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{TEMP_MARK}", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it 0600)
    except OSError:
        pass
    return fd, tmp


def temp_file_beside(path: str | os.PathLike) -> str:
    """A new empty temporary file beside ``path`` (named as :func:`is_orphan_temp` recognizes, with a plain
    file's mode), for a writer that renames it over ``path`` itself at the end."""
    fd, tmp = _temp_beside(os.fspath(path))
    os.close(fd)
    return tmp


def temp_dir_beside(path: str | os.PathLike) -> str:
    """A new empty temporary folder beside ``path`` (named as :func:`is_orphan_temp` recognizes, with the mode
    ``mkdir`` would give it), to be filled and renamed over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.{TEMP_MARK}", suffix=".tmp", dir=folder)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def is_orphan_temp(name: str) -> bool:
    """Whether a file name is one of this module's temporaries (``.<name>.~fdtmp-<random>.tmp``)."""
    return bool(_TEMP_NAME.match(os.path.basename(name)))


def remove_orphan_temps(folder: str | os.PathLike, of: str | None = None, dirs: bool = False) -> list[str]:
    """Delete this module's temporaries (:func:`is_orphan_temp`) directly in ``folder``: what a killed writer
    left behind. Call it only where no other process may be writing into ``folder`` at the moment (e.g. under
    the run directory's lock), or with ``of``: only the temporaries of the destination named ``of`` (a file
    or folder in ``folder`` that no other process writes). ``dirs``: temporary folders too
    (:func:`temp_dir_beside`). Returns the removed paths; a missing folder is no error."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not is_orphan_temp(entry.name):
            continue
        if of is not None and not entry.name.startswith(f".{of}.{TEMP_MARK}"):
            continue
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
        elif dirs and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
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


def prepare_outdir(path, flag: str = "--outdir", create: bool = True) -> str:
    """Check that the output folder ``path`` can be made and written: ``ValueError`` naming ``flag`` otherwise
    (a file in the way, a folder that cannot be created or written). ``create``: leave the folder (and its
    parents) made; else remove again what the check made, so that a command refused later leaves nothing
    behind. Returns ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    made = []  # the folders this check creates, outermost first
    head = os.path.abspath(path)
    while not os.path.exists(head) and os.path.dirname(head) != head:
        made.insert(0, head)
        head = os.path.dirname(head)
    try:
        for attempt in range(5):  # under torchrun another rank's check may remove the folder in between
            try:
                os.makedirs(path, exist_ok=True)
                with tempfile.TemporaryFile(dir=path):
                    pass
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot create or write the folder ({exc.strerror or exc})") from None
    finally:
        if not create:
            for folder in reversed(made):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
    return path
