"""The restricted unpickler: globals only from the allow-list, object state (BUILD) only on the stand-ins
that take it, every failure one of the reader's errors; and :func:`plain_tree`, the stand-ins turned into
plain data with the expansion of shared references bounded."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict

import torch

from fastdiff.io.safe_pickle.budget import allocation_budget, current_budget
from fastdiff.io.safe_pickle.errors import (
    MalformedPickleError, PickleLimitError, SafePickleError, UnsafePickleError, _r,
)
from fastdiff.io.safe_pickle.scan import scan_opcodes
from fastdiff.io.safe_pickle.standins import (
    ALLOWED_GLOBALS, PersistentObject, PlainObject, _Callable, _EasyDict, _Marker, _NpArray, _NpDtype, _Storage,
)

_EXPAND_FACTOR, _EXPAND_SLACK = 2, 10_000  # plain_tree: nodes allowed per opcode read, plus a constant

_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 spellings

# The only objects pickled state (BUILD) may be applied to: stand-ins with their own checked __setstate__.
_BUILDABLE = (PlainObject, _EasyDict, _NpDtype, _NpArray)


class SafeUnpickler(pickle._Unpickler):
    """An unpickler that resolves globals only from :data:`ALLOWED_GLOBALS` and applies state (BUILD) only
    to the stand-ins that take it.

    Built on the pure-Python unpickler, whose opcodes can be overridden (BUILD here) and whose memo is a dict
    (a crafted memo index costs nothing). Use it through :func:`read_pickle`, which checks the opcode stream
    first. ``storages``: ``persistent_load`` for ``torch.save`` files (``key -> _Storage``), else ``None`` (a
    persistent id is then an error).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source="<pickle>", storages=None):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module, name):
        module = _MODULE_ALIASES.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            pass
        raise UnsafePickleError(
            f"refusing to load {self._source}: it references the global '{_r(module)[1:-1]}.{_r(name)[1:-1]}', "
            "which is not on fastdiff's allow-list for network files (nothing from the file was imported or executed)"
        )

    def persistent_load(self, pid):
        if self._storages is None:
            raise UnsafePickleError(f"refusing to load {self._source}: unexpected persistent id {_r(pid)}")
        return self._storages(pid)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) in _BUILDABLE:
            inst.__setstate__(state)
        elif type(inst) is OrderedDict:
            # torch's state dicts carry their `_metadata` as instance state: checked, then dropped.
            if isinstance(state, tuple) and len(state) == 2 and not state[1]:
                state = state[0]
            if state is not None and not (isinstance(state, dict) and all(type(k) is str for k in state)):
                raise UnsafePickleError(f"refusing to load {self._source}: malformed state for an OrderedDict")
        else:
            raise UnsafePickleError(
                f"refusing to load {self._source}: it assigns pickled state (BUILD) to a {type(inst).__name__}; "
                "only fastdiff's stand-ins for ModuleDict, EasyDict and NumPy objects take state (never tensors "
                "or storages)"
            )

    dispatch[pickle.BUILD[0]] = load_build


def _guarded(run, source):
    """``run()``, with every failure turned into one of this module's errors."""
    try:
        return run()
    except SafePickleError:
        raise
    except RecursionError:
        raise PickleLimitError(f"{source}: the pickle is nested too deeply") from None
    except MemoryError:
        raise PickleLimitError(f"{source}: the file asks for more memory than is available") from None
    except Exception as exc:
        raise MalformedPickleError(f"{source}: not a valid pickle ({type(exc).__name__}: {_r(str(exc))})") from None


def _load_one(f, source, storages=None):
    start = f.tell()
    scan_opcodes(f, source)
    f.seek(start)
    return _guarded(lambda: SafeUnpickler(f, source, storages).load(), source)


def read_pickle(file, source="<pickle>", max_bytes=None):
    """One pickled object from the seekable binary ``file`` (an in-memory stream: ``io.BytesIO``), checked by
    the opcode pre-pass and read through :class:`SafeUnpickler` (inert records, no code), under an
    allocation budget sized by what is left in ``file`` (unless one is already open)."""
    here = file.tell()
    size = file.seek(0, io.SEEK_END) - here
    file.seek(here)
    with allocation_budget(source, size, max_bytes):
        return _load_one(file, source)


# --- plain data ------------------------------------------------------------------------------------------------


def plain_tree(obj, source="<pickle>"):
    """``obj`` with the stand-ins replaced by plain data: containers, numbers, strings, tensors and arrays as
    they are, :class:`PersistentObject` / :class:`PlainObject` records rebuilt around plain contents.

    Shared references are expanded (each use is a separate copy); the expanded tree may hold at most
    ``2 x (opcodes read) + 10000`` nodes, so a small file of nested shared references cannot expand without
    bound; a cycle is an error."""
    budget = current_budget()
    limit = _EXPAND_FACTOR * budget.opcodes + _EXPAND_SLACK if budget is not None else None
    count = [0]
    active = set()
    leaves = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype)

    def walk(obj):
        count[0] += 1
        if limit is not None and count[0] > limit:
            raise PickleLimitError(f"{source}: the pickle's shared references expand to more than {limit:,} objects")
        if isinstance(obj, leaves):
            return obj
        if isinstance(obj, _NpArray):
            if obj.array is None:
                raise MalformedPickleError(f"{source}: a numpy array without data")
            return obj.array
        if isinstance(obj, _NpDtype):
            return obj.resolve()
        if type(obj).__module__ == "numpy":  # numpy scalars and arrays made by the stand-ins
            return obj
        if id(obj) in active:
            raise MalformedPickleError(f"{source}: the pickle holds a cyclic structure")
        active.add(id(obj))
        try:
            if isinstance(obj, PersistentObject):
                return PersistentObject(obj.class_name, obj.version, obj.module_src, walk(obj.init_args),
                                        walk(obj.init_kwargs), walk(obj.state))
            if isinstance(obj, PlainObject):
                new = PlainObject(obj.class_path)
                new.state = walk(obj.state)
                return new
            if isinstance(obj, OrderedDict):
                return OrderedDict((walk(k), walk(v)) for k, v in obj.items())
            if isinstance(obj, dict):
                return {walk(k): walk(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple, set, frozenset)):
                return type(obj)(walk(v) for v in obj)
            if isinstance(obj, (_Marker, _Callable, _Storage)) or isinstance(obj, type):
                raise UnsafePickleError(f"the pickle stores {obj!r} as a value, which fastdiff does not accept")
            raise MalformedPickleError(f"{source}: unexpected object of type {type(obj).__name__} in the pickle")
        finally:
            active.discard(id(obj))

    return _guarded(lambda: walk(obj), source)
