"""One training run per run directory: an exclusive lock, and start-up clean-up of what a killed run left.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<outdir>/training.lock``, held for the whole run through an
open file descriptor. The kernel drops it when the holding process exits in any way (SIGKILL included), so
a crashed run never leaves a stale lock behind: there is nothing to delete by hand, and the file itself stays
(deleting a lock file races with a process that has just opened it). The file holds the holder's pid and host,
only to name it in the error a second run gets.

Where ``fcntl`` does not exist (Windows), the lock goes through the ``filelock`` package (a dependency of
torch; ``msvcrt.locking`` there, which the OS also drops with the process), and the holder's pid and host go
to ``training.lock.holder`` beside it, because filelock truncates the lock file on every attempt to take it.
"""

from __future__ import annotations

import errno
import os
import socket

try:
    import fcntl
except ImportError:  # not POSIX (Windows): filelock instead, see RunLock._acquire_portable
    fcntl = None

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
        self._portable = None  # the filelock.FileLock held where there is no fcntl
        self._info_path = self.path if fcntl is not None else self.path + ".holder"

    @property
    def held(self) -> bool:
        return self._fd is not None or self._portable is not None

    def holder(self) -> str:
        """What the lock file says about its holder (``pid N on HOST``), or ``unknown``."""
        try:
            with open(self._info_path, encoding="utf-8", errors="replace") as f:
                text = f.read(200).split()
        except OSError:
            return "unknown"
        if len(text) >= 2 and text[0].isdigit():
            return f"pid {text[0]} on {text[1]}"
        return "unknown"

    def _busy(self) -> RunDirectoryBusy:
        return RunDirectoryBusy(
            f"run directory {self.outdir} is in use by another training run (holder: {self.holder()}; lock "
            f"{self.path}); wait for it to finish or stop it, or train into another --outdir")

    def _acquire_portable(self) -> "RunLock":
        import filelock

        lock = filelock.FileLock(self.path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise self._busy() from None
        with open(self._info_path, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        self._portable = lock
        return self

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        os.makedirs(self.outdir, exist_ok=True)
        if fcntl is None:
            return self._acquire_portable()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._busy() from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._portable is not None:
            lock, self._portable = self._portable, None
            try:
                with open(self._info_path, "w", encoding="utf-8"):
                    pass  # emptied while still held, as the flock path does
            finally:
                lock.release()
            return
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
