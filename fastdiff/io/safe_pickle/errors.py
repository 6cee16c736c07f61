"""The safe reader's errors (every failure is one of them) and the short repr its messages use."""

from __future__ import annotations

import pickle
import reprlib


class SafePickleError(ValueError):
    """Base of every error the safe reader raises: the file was not (fully) read, and nothing from it ran."""


class UnsafePickleError(SafePickleError, pickle.UnpicklingError):
    """The file asks for something outside the allow-list; nothing it names was imported or run."""


class MalformedPickleError(SafePickleError):
    """The file is not a valid pickle / ``torch.save`` file, or its records are inconsistent."""


class PickleLimitError(SafePickleError):
    """The file would make the reader nest, expand or allocate beyond the bounds of this module."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlong = 40


def short_repr(value) -> str:
    """A short repr for error messages (a crafted file may hold huge strings)."""
    try:
        return _short.repr(value)
    except Exception:  # a repr that itself fails (e.g. an int too large to print)
        return f"<{type(value).__name__}>"


_r = short_repr
