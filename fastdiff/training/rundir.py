"""One training run per run directory: an exclusive lock, and start-up clean-up of what a killed run left.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<outdir>/training.lock``, held for the whole run through an
open file descriptor. The kernel drops it when the holding process exits in any way (SIGKILL included), so
a crashed run never leaves a stale lock behind: there is nothing to delete by hand, and the file itself stays
(deleting a lock file races with a process that has just opened it). The file holds the holder's pid and host,
only to name it in the error a second run gets.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

__all__ = ["RunDirectoryBusy", "RunLock", "LOCK_NAME"]

LOCK_NAME = "training.lock"


class RunDirectoryBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """``with RunLock(outdir): ...`` (or ``acquire()`` / ``release()``): this process owns ``outdir``."""

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = os.fspath(outdir)
        self.path = os.path.join(self.outdir, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """What the lock file says about its holder (``pid N on HOST``), or ``unknown``."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(200).split()
        except OSError:
            return "unknown"
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} on {text[1]}"
        return "unknown"

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        os.makedirs(self.outdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryBusy(
                    f"run directory {self.outdir} is in use by another training run (holder: {self.holder()}; lock "
                    f"{self.path}); wait for it to finish or stop it, or train into another --outdir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
