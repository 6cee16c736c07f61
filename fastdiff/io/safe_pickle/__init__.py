"""Restricted unpickling: pickles and ``torch.save`` files read as inert data, with no code from the file run
and a bound on what the file can make the reader allocate. The parts: the allocation budget of a load
(``budget``), the opcode pre-pass (``scan``), the stand-ins of the allowed globals (``standins``), the
unpickler and :func:`plain_tree` (``unpickler``), and the readers of files from disk (``torch_files``).
Every failure is a :class:`SafePickleError`; the EDM2 part (rebuilding networks) is ``fastdiff.io.edm2_pickle``.
"""

from fastdiff.io.safe_pickle.budget import (
    DEFAULT_BYTES_FACTOR, DEFAULT_BYTES_SLACK, allocation_budget, charge, charged_construction,
)
from fastdiff.io.safe_pickle.errors import (
    MalformedPickleError, PickleLimitError, SafePickleError, UnsafePickleError, short_repr,
)
from fastdiff.io.safe_pickle.scan import MAX_DEPTH, MAX_MEMO, MAX_STACK
from fastdiff.io.safe_pickle.standins import ALLOWED_GLOBALS, PersistentObject, PlainObject
from fastdiff.io.safe_pickle.torch_files import load_torch_file, read_file, read_plain
from fastdiff.io.safe_pickle.unpickler import SafeUnpickler, plain_tree, read_pickle

__all__ = [
    "SafePickleError", "UnsafePickleError", "MalformedPickleError", "PickleLimitError",
    "SafeUnpickler", "read_pickle", "read_file", "read_plain", "load_torch_file", "plain_tree",
    "allocation_budget", "charge", "charged_construction", "short_repr", "PersistentObject", "PlainObject",
    "ALLOWED_GLOBALS",
    "MAX_DEPTH", "MAX_STACK", "MAX_MEMO", "DEFAULT_BYTES_FACTOR", "DEFAULT_BYTES_SLACK",
]
