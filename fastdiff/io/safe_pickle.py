"""Restricted unpickling: pickles and ``torch.save`` files read as inert data, with no code from the file run
and a bound on what the file can make the reader allocate.

A pickle is a program for a stack machine that may import and call anything; ``torch.load`` and
``pickle.load`` run it. Here:

* Globals resolve only from an explicit allow-list (:data:`ALLOWED_GLOBALS`), each mapped to a stand-in
  written in this module: NVIDIA's persistence hook (``torch_utils.persistence``, which would execute the
  module source embedded in the file) becomes an inert :class:`PersistentObject` record, tensors are rebuilt
  from storages parsed here byte by byte (never through ``torch.load``), ``dnnlib.util.EasyDict`` becomes a
  ``dict``, ``torch.nn.ModuleDict`` and friends inert :class:`PlainObject` records, NumPy arrays are rebuilt
  from their raw bytes. Any other global raises :class:`UnsafePickleError` naming it before it could run.
* Object state (the BUILD opcode) is applied only to the stand-ins that take it (ModuleDict records,
  EasyDict, NumPy arrays and dtypes); tensors, storages, and everything else never take state.
* Before a pickle is run, a pass over its opcode stream (``pickletools.genops``) checks that every opcode
  and its argument is complete (so no declared length is ever allocated before it is known to be in the
  file) and that containers nest at most :data:`MAX_DEPTH` deep (CPython hashes nested tuples recursively
  in C, so a deep dict key would crash the process before any Python check ran).
* Everything a file makes the reader allocate beyond the file itself (tensor views, inflated zip members,
  storages, copies made by the stand-ins, the network built from it) is charged to one budget per load,
  by default :data:`DEFAULT_BYTES_FACTOR` times the file's size (``max_bytes=`` raises it for a trusted
  file); a tensor view may not reach past its storage; the tree of objects a file expands to (shared
  references counted each time they are used) is bounded by its number of opcodes.

Every failure is one of this module's errors (:class:`SafePickleError` and its subclasses), never another
exception from deep inside. The EDM2-specific part (rebuilding networks) is ``fastdiff.io.edm2_pickle``.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from collections import OrderedDict

import torch

__all__ = [
    "SafePickleError", "UnsafePickleError", "MalformedPickleError", "PickleLimitError",
    "SafeUnpickler", "read_pickle", "read_file", "read_plain", "load_torch_file", "plain_tree",
    "allocation_budget", "charge", "charged_construction", "short_repr", "PersistentObject", "PlainObject",
    "ALLOWED_GLOBALS",
    "MAX_DEPTH", "MAX_STACK", "MAX_MEMO", "DEFAULT_BYTES_FACTOR", "DEFAULT_BYTES_SLACK",
]


class SafePickleError(ValueError):
    """Base of every error the safe reader raises: the file was not (fully) read, and nothing from it ran."""


class UnsafePickleError(SafePickleError, pickle.UnpicklingError):
    """The file asks for something outside the allow-list; nothing it names was imported or run."""


class MalformedPickleError(SafePickleError):
    """The file is not a valid pickle / ``torch.save`` file, or its records are inconsistent."""


class PickleLimitError(SafePickleError):
    """The file would make the reader nest, expand or allocate beyond the bounds of this module."""


MAX_DEPTH = 300
"""Deepest container nesting a file may have (counted conservatively over the opcode stream; the official
EDM2 pickles stay well below 100)."""

MAX_STACK = 1_000_000
"""Most values the unpickler's stack may hold at once (the standard pickler batches containers by 1000)."""

MAX_MEMO = 1_000_000
"""Most memo entries a pickle may create (an EDM2 network pickle has tens of thousands)."""

DEFAULT_BYTES_FACTOR = 8
"""Default budget: what one load may allocate because the file says so, as a multiple of the file's size."""

DEFAULT_BYTES_SLACK = 1 << 20
"""Added to the default budget, so tiny files are not refused over a few kilobytes of bookkeeping."""

_ITEM_BYTES = 64  # what one container entry copied by a stand-in is charged
_EXPAND_FACTOR, _EXPAND_SLACK = 2, 10_000  # plain_tree: nodes allowed per opcode read, plus a constant

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


# --- the budget of one load --------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("source", "max_bytes", "used", "opcodes", "explicit")

    def __init__(self, source, max_bytes, explicit):
        self.source, self.max_bytes, self.explicit = source, int(max_bytes), explicit
        self.used = 0
        self.opcodes = 0

    def charge(self, nbytes, what):
        self.used += int(nbytes)
        if self.used > self.max_bytes:
            how = ("raise max_bytes / --max-bytes" if self.explicit else
                   f"the default is {DEFAULT_BYTES_FACTOR}x the file's size; pass max_bytes= (fastdiff convert "
                   "--max-bytes) if the file is trusted")
            raise PickleLimitError(
                f"{self.source}: {what} would make the reader allocate more than {self.max_bytes:,} bytes in all "
                f"({how})"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("fastdiff_pickle_budget", default=None)


@contextlib.contextmanager
def allocation_budget(source, file_bytes: int, max_bytes: int | None = None):
    """The allocation budget of one load of ``source`` (``file_bytes`` long): ``max_bytes`` bytes, by default
    ``DEFAULT_BYTES_FACTOR * file_bytes + DEFAULT_BYTES_SLACK``. Inside an enclosing budget, that one is used."""
    outer = _BUDGET.get()
    if outer is not None:
        yield outer
        return
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    limit = max_bytes if max_bytes is not None else DEFAULT_BYTES_FACTOR * int(file_bytes) + DEFAULT_BYTES_SLACK
    token = _BUDGET.set(_Budget(source, limit, max_bytes is not None))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def charge(nbytes, what: str) -> None:
    """Charge ``nbytes`` about to be allocated for ``what`` to the current load's budget (if any)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(nbytes, what)


_MODULE_BYTES = 2048  # what building one submodule is charged (Python objects, even for meta tensors)


@contextlib.contextmanager
def charged_construction():
    """While a network described by a file is built (on the meta device, say): every parameter, buffer and
    submodule registered is charged to the current allocation budget (parameters and buffers at the bytes
    they will hold), so a tiny file cannot make fastdiff build an unbounded network. The hooks are
    process-wide but charge only the thread that opened the budget (it lives in a context variable)."""
    from torch.nn.modules import module as M

    def tensor(_module, name, t):
        if t is not None:
            charge(t.numel() * t.element_size(), f"network tensor {name} of shape {tuple(t.shape)}")

    def submodule(_module, name, _child):
        charge(_MODULE_BYTES, f"network module {name}")

    handles = [M.register_module_parameter_registration_hook(tensor),
               M.register_module_buffer_registration_hook(tensor),
               M.register_module_module_registration_hook(submodule)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- the opcode pre-pass --------------------------------------------------------------------------------------

_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _scan(f, source, max_depth=MAX_DEPTH) -> int:
    """Check one pickle in the seekable binary stream ``f`` (from its current position) without building
    anything: every opcode and argument complete, and container nesting at most ``max_depth``.

    Depth is tracked over a model of the unpickler's stack: each value carries a depth (0 for a scalar),
    a new object one more than the deepest it consumes, an in-place update (APPEND, SETITEM, BUILD...) raises
    its container's depth. A memo entry keeps the depth its value had when it was memoized: exact for the
    immutable values (tuples, frozensets) whose hashing recurses; a mutable container memoized and grown
    later is understated, but it is not hashable, and whatever it holds was bounded when built (deep mutable
    nesting is caught by :func:`plain_tree` instead). The stack and the memo are capped at
    :data:`MAX_STACK` and :data:`MAX_MEMO` entries. Returns the number of opcodes."""
    stack, marks, memo = [], [], {}
    count = 0
    mark = pickletools.markobject

    def too_deep():
        return PickleLimitError(f"{source}: the pickle is nested too deeply (more than {max_depth} levels)")

    try:
        for op, arg, _pos in pickletools.genops(f):
            count += 1
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
                continue
            floor = marks[-1] if marks else 0
            if name in _PUTS or name == "MEMOIZE":
                if len(stack) <= floor:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on an empty stack)")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                if len(memo) > MAX_MEMO:
                    raise PickleLimitError(f"{source}: the pickle memoizes more than {MAX_MEMO:,} objects")
                continue
            if name in _GETS:
                if arg not in memo:
                    raise MalformedPickleError(f"{source}: not a valid pickle (memo entry {_r(arg)} is missing)")
                stack.append(memo[arg])
                continue
            if name == "DUP":
                if len(stack) <= floor:
                    raise MalformedPickleError(f"{source}: not a valid pickle (DUP on an empty stack)")
                stack.append(stack[-1])
                continue
            if name == "POP":
                if len(stack) > floor:
                    stack.pop()
                elif marks:
                    marks.pop()
                else:
                    raise MalformedPickleError(f"{source}: not a valid pickle (POP on an empty stack)")
                continue
            before = op.stack_before
            if mark in before:
                if not marks:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} without a MARK)")
                m = marks.pop()
                below = before.index(mark)
                if m - below < (marks[-1] if marks else 0):
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on an empty stack)")
                consumed = stack[m - below:]
                del stack[m - below:]
            else:
                n = len(before)
                if len(stack) - floor < n:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on a short stack)")
                consumed = stack[len(stack) - n:] if n else []
                if n:
                    del stack[len(stack) - n:]
            if name in _IN_PLACE:
                depth = max(consumed[0], 1 + max(consumed[1:])) if len(consumed) > 1 else consumed[0]
            elif op.stack_after:
                depth = 1 + max(consumed) if consumed else 0
            else:
                continue
            if depth > max_depth:
                raise too_deep()
            stack.append(depth)
            if len(stack) > MAX_STACK:
                raise PickleLimitError(f"{source}: the pickle's stack grows past {MAX_STACK:,} entries")
    except SafePickleError:
        raise
    except Exception as exc:  # genops: truncated arguments, unknown opcodes, missing STOP
        raise MalformedPickleError(f"{source}: not a valid pickle ({_r(str(exc))})") from None
    budget = _BUDGET.get()
    if budget is not None:
        budget.opcodes += count
    return count


# --- inert records -------------------------------------------------------------------------------------


class PersistentObject:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would have built, as plain data.

    ``module_src`` is the embedded Python source, kept as a string for inspection and never executed.
    """

    __slots__ = ("class_name", "version", "module_src", "init_args", "init_kwargs", "state")

    def __init__(self, class_name, version, module_src, init_args, init_kwargs, state):
        self.class_name = class_name
        self.version = version
        self.module_src = module_src
        self.init_args = init_args
        self.init_kwargs = init_kwargs
        self.state = state

    def __setstate__(self, state):
        raise UnsafePickleError("unexpected state assignment (BUILD) on a persistent object")

    def __repr__(self):
        return f"PersistentObject({self.class_name!r}, init_kwargs={_r(self.init_kwargs)})"


class PlainObject:
    """An object pickled the ordinary way (e.g. ``torch.nn.ModuleDict``): its class path and its state."""

    __slots__ = ("class_path", "state")

    def __init__(self, class_path):
        self.class_path = class_path
        self.state = None

    def __setstate__(self, state):
        if self.state is not None or not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for {self.class_path}: expected a single dict")
        self.state = state

    def __repr__(self):
        return f"PlainObject({self.class_path!r})"


class _Sealed(type):
    """Metaclass of the stand-in classes: a pickle cannot modify them (BUILD on a class object)."""

    def __setattr__(cls, name, value):
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {cls.__name__}")

    def __delattr__(cls, name):
        raise UnsafePickleError(f"refusing to delete attribute {name!r} of {cls.__name__}")


def _charge_items(value, what):
    n = len(value) if isinstance(value, (dict, list, tuple, set, frozenset, str, bytes, bytearray)) else 1
    charge(n * _ITEM_BYTES, what)


class _EasyDict(dict, metaclass=_Sealed):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict whose attributes are its items)."""

    def __init__(self, *args, **kwargs):
        for a in args:
            _charge_items(a, "dnnlib.util.EasyDict")
        super().__init__(*args, **kwargs)

    def __setstate__(self, state):
        if state is None:
            return
        if not isinstance(state, dict):
            raise UnsafePickleError("unexpected state for dnnlib.util.EasyDict")
        _charge_items(state, "dnnlib.util.EasyDict")
        self.update(state)


def _plain_class(class_path: str):
    """A sealed class whose instances (created by NEWOBJ) record ``class_path`` and their state."""

    def __new__(cls, *args):
        if args:
            raise UnsafePickleError(f"unexpected constructor arguments for {class_path}")
        return PlainObject(class_path)

    return _Sealed(class_path.rsplit(".", 1)[1] + "StandIn", (), {"__new__": __new__, "__slots__": ()})


class _Callable:
    """An allowed global: a named, immutable wrapper around one of the functions below."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name, fn):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {self._name}")

    def __setstate__(self, state):
        raise UnsafePickleError(f"unexpected state assignment (BUILD) on {self._name}")

    def __repr__(self):
        return f"<allowed {self._name}>"


class _Marker:
    """An allowed global that is data, not a callable (a storage type, ``numpy.ndarray``)."""

    __slots__ = ("_name", "value")

    def __init__(self, name, value=None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "value", value)

    def __call__(self, *args):
        raise UnsafePickleError(f"the pickle calls {self._name}, which fastdiff only accepts as a type marker")

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"refusing to set attribute {name!r} on {self._name}")

    def __setstate__(self, state):
        raise UnsafePickleError(f"unexpected state assignment (BUILD) on {self._name}")

    def __repr__(self):
        return f"<marker {self._name}>"


def _counted(cls):
    """``set`` / ``frozenset`` / ``OrderedDict`` called by the pickle: the copy is charged to the budget."""

    def make(*args):
        if len(args) > 1:
            raise UnsafePickleError(f"refusing {cls.__name__} with {len(args)} arguments")
        for a in args:
            _charge_items(a, cls.__name__)
        return cls(*args)

    return make


# --- tensors -----------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


def _element_size(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class _Storage:
    """A storage read from the file: a flat tensor (``None`` during the first pass over a legacy file)."""

    __slots__ = ("dtype", "numel", "flat")

    def __init__(self, dtype, numel, flat=None):
        self.dtype, self.numel, self.flat = dtype, numel, flat

    def __setstate__(self, state):
        raise UnsafePickleError("unexpected state assignment (BUILD) on a storage")


def _flat_from_bytes(raw, dtype, numel, what):
    size = _element_size(dtype)
    if len(raw) != numel * size:
        raise MalformedPickleError(f"{what}: expected {numel} x {size} bytes of {dtype}, found {len(raw)}")
    charge(len(raw), f"a storage of {len(raw):,} bytes")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.bool:  # bytes other than 0 and 1 are not valid bools: normalize them
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).ne(0)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _check_ints(value, what, allow_empty=True):
    if not isinstance(value, (tuple, list)) or (not allow_empty and not value):
        raise UnsafePickleError(f"malformed tensor record: {what} is {type(value).__name__}")
    for v in value:
        if type(v) is not int or v < 0:
            raise UnsafePickleError(f"malformed tensor record: {what} contains {_r(v)}")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"malformed tensor record: expected a storage, got {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise UnsafePickleError(f"malformed tensor record: storage offset {_r(offset)}")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise UnsafePickleError(f"malformed tensor record: size {_r(size)} and stride {_r(stride)} differ in length")
    if backward_hooks:
        raise UnsafePickleError("refusing a tensor with backward hooks")
    if storage.flat is None:  # first pass over a legacy file: the data comes later
        return torch.empty(0, dtype=storage.dtype)
    n = storage.flat.numel()
    numel = math.prod(size)
    last = offset + sum((k - 1) * s for k, s in zip(size, stride)) if numel else offset - 1
    if offset > n or last >= n:
        raise MalformedPickleError(
            f"malformed tensor: size {_r(size)}, stride {_r(stride)}, offset {offset} reach past its storage of "
            f"{n} elements"
        )
    # What the view costs once materialized (a copy, a dtype conversion): stride-0 or overlapping views
    # are small in the file but not in memory.
    charge(numel * storage.flat.element_size(), f"a tensor of size {_r(size)}")
    t = torch.as_strided(storage.flat, size, stride, offset)
    if requires_grad and t.is_floating_point():
        t.requires_grad_(True)
    return t


def _rebuild_tensor_v1(storage, offset, size, stride):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError(f"malformed parameter record: data is {type(data).__name__}")
    if backward_hooks:
        raise UnsafePickleError("refusing a parameter with backward hooks")
    if state:
        raise UnsafePickleError("refusing a parameter with extra Python state")
    grad = bool(requires_grad) and data.is_floating_point()
    return torch.nn.Parameter(data.detach(), requires_grad=grad)


def _load_from_bytes(blob):
    """``torch.storage._load_from_bytes``: a storage written by ``torch.save`` (legacy or zip format) into
    ``blob``, parsed here instead of by ``torch.load``."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafePickleError(f"malformed storage record: expected bytes, got {type(blob).__name__}")
    obj = _read_torch_stream(io.BytesIO(bytes(blob)), "<embedded storage>")
    if not isinstance(obj, _Storage):
        raise UnsafePickleError(f"malformed storage record: it holds a {type(obj).__name__}, not a storage")
    return obj


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes`` (a latin-1 string); nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {_r(encoding)})")
    charge(len(text), "a latin-1 string")
    return text.encode("latin1")


# --- numpy ---------------------------------------------------------------------------------------------------


class _NpDtype:
    __slots__ = ("spec", "order")

    def __init__(self, spec):
        self.spec, self.order = spec, "="

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError("malformed numpy dtype state")
        self.order = state[1]

    def resolve(self):
        import numpy as np

        dt = np.dtype(self.spec)
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


def _np_array(raw, dtype, shape, order):
    import numpy as np

    dt = dtype.resolve()
    if len(raw) % dt.itemsize or len(raw) // dt.itemsize != math.prod(shape):
        raise MalformedPickleError(f"malformed numpy array: {len(raw)} bytes of {dt} for shape {_r(shape)}")
    charge(len(raw), f"a numpy array of {len(raw):,} bytes")
    return np.frombuffer(bytes(raw), dtype=dt).copy().reshape(shape, order=order)


class _NpArray:
    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None:
            raise UnsafePickleError("numpy array state assigned twice")
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[1], _NpDtype)):
            raise UnsafePickleError("malformed numpy array state")
        shape, dtype, fortran, raw = state
        shape = _check_ints(shape, "numpy shape")
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("refusing a numpy array that is not raw numeric data")
        self.array = _np_array(raw, dtype, shape, "F" if fortran else "C")


def _np_dtype(spec, align=False, copy=True):
    import numpy as np

    if not isinstance(spec, str):
        raise UnsafePickleError(f"refusing numpy dtype {_r(spec)}")
    try:
        kind = np.dtype(spec).kind
    except TypeError:
        raise UnsafePickleError(f"unknown numpy dtype {_r(spec)}") from None
    if kind not in "biufc":
        raise UnsafePickleError(f"refusing numpy dtype {_r(spec)}: only numeric data is accepted")
    return _NpDtype(spec)


def _np_reconstruct(subtype, shape, typecode):
    if not (isinstance(subtype, _Marker) and subtype.value == "ndarray"):
        raise UnsafePickleError(f"refusing numpy array subtype {_r(subtype)}")
    return _NpArray()


def _np_frombuffer(buf, dtype, shape, order="C"):
    """``numpy.core.numeric._frombuffer``: how protocol-5 pickles store arrays."""
    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf.raw())
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, _NpDtype) or order not in ("C", "F"):
        raise UnsafePickleError("refusing a numpy array that is not raw numeric data")
    out = _NpArray()
    out.array = _np_array(buf, dtype, _check_ints(shape, "numpy shape"), order)
    return out


def _np_scalar(dtype, raw=None):
    import numpy as np

    if not isinstance(dtype, _NpDtype) or not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError("refusing a numpy scalar that is not raw numeric data")
    dt = dtype.resolve()
    if len(raw) != dt.itemsize:
        raise MalformedPickleError(f"malformed numpy scalar: {len(raw)} bytes for {dt}")
    charge(dt.itemsize, "a numpy scalar")
    return np.frombuffer(bytes(raw), dtype=dt)[0]


# --- the persistence hook ------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict):
        raise UnsafePickleError(f"malformed persistent object: meta is {type(meta).__name__}, expected a dict")
    missing = [k for k in ("type", "class_name", "state") if k not in meta]
    if missing:
        raise UnsafePickleError(f"malformed persistent object: meta lacks {missing}")
    if meta["type"] != "class":
        raise UnsafePickleError(f"unsupported persistent object type {_r(meta['type'])}")
    class_name, state = meta["class_name"], meta["state"]
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UnsafePickleError("malformed persistent object: class_name must be a str and state a dict")
    src = meta.get("module_src")
    if src is not None and not isinstance(src, str):
        raise UnsafePickleError("malformed persistent object: module_src is not a string")
    args = state.get("_init_args", state.get("init_args")) or ()
    kwargs = state.get("_init_kwargs", state.get("init_kwargs")) or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise UnsafePickleError(f"malformed persistent object {_r(class_name)}: init args/kwargs of the wrong type")
    charge((len(args) + len(kwargs) + 1) * _ITEM_BYTES, "a persistent object")
    return PersistentObject(class_name, meta.get("version"), src, tuple(args), dict(kwargs), state)


# --- the allow-list ------------------------------------------------------------------------------------------


def _allowed_globals() -> dict:
    table = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Callable(
            "torch_utils.persistence._reconstruct_persistent_obj", _reconstruct_persistent_obj),
        ("torch._utils", "_rebuild_tensor_v2"): _Callable("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
        ("torch._utils", "_rebuild_tensor"): _Callable("torch._utils._rebuild_tensor", _rebuild_tensor_v1),
        ("torch._utils", "_rebuild_parameter"): _Callable("torch._utils._rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Callable(
            "torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
        ("torch.storage", "_load_from_bytes"): _Callable("torch.storage._load_from_bytes", _load_from_bytes),
        ("_codecs", "encode"): _Callable("_codecs.encode", _latin1_bytes),
        ("collections", "OrderedDict"): _Callable("collections.OrderedDict", _counted(OrderedDict)),
        ("builtins", "set"): _Callable("builtins.set", _counted(set)),
        ("builtins", "frozenset"): _Callable("builtins.frozenset", _counted(frozenset)),
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("numpy", "dtype"): _Callable("numpy.dtype", _np_dtype),
        ("numpy", "ndarray"): _Marker("numpy.ndarray", "ndarray"),
    }
    for container in ("ModuleDict", "ModuleList", "Sequential"):
        table[("torch.nn.modules.container", container)] = _plain_class(f"torch.nn.modules.container.{container}")
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = _Callable(f"{mod}._reconstruct", _np_reconstruct)
        table[(mod, "scalar")] = _Callable(f"{mod}.scalar", _np_scalar)
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = _Callable(f"{mod}._frombuffer", _np_frombuffer)
    for name, dtype in _STORAGE_DTYPES.items():
        mod = "torch.storage" if name == "UntypedStorage" else "torch"
        table[(mod, name)] = _Marker(f"{mod}.{name}", dtype)
    for name in _DTYPE_NAMES:  # torch.dtype objects pickle as the globals torch.float16 etc.
        table[("torch", name)] = getattr(torch, name)
    return table


ALLOWED_GLOBALS: dict = _allowed_globals()
"""``(module, name) -> stand-in``: everything a file may reference. Nothing else is ever imported."""

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
    _scan(f, source)
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


# --- torch.save files (zip and legacy) -------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _storage_pid(pid, source):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Marker)):
        raise UnsafePickleError(f"refusing to load {source}: unexpected persistent id {_r(pid)}")
    key, numel = pid[2], pid[4]
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise UnsafePickleError(f"refusing to load {source}: malformed storage id {_r(pid)}")
    if len(pid) > 5 and pid[5] is not None:
        raise MalformedPickleError(f"{source}: storage views (pre-1.0 torch files) are not supported")
    return key, pid[1].value, numel


def _read_member(zf, info, source, expected=None):
    """A zip member's bytes: its declared size is checked (against ``expected`` and the budget) before
    anything is read or inflated, and it is inflated in chunks, never past that size."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise MalformedPickleError(f"{source}: {_r(info.filename)} uses zip compression method "
                                   f"{info.compress_type}; only stored or deflated members are read")
    if expected is not None and info.file_size != expected:
        raise MalformedPickleError(f"{source}: {_r(info.filename)} declares {info.file_size:,} bytes, its record "
                                   f"says {expected:,}")
    charge(info.file_size, f"zip member {_r(info.filename)} ({info.file_size:,} bytes inflated)")
    out = bytearray()
    with zf.open(info) as fh:
        while len(out) < info.file_size:
            chunk = fh.read(min(1 << 22, info.file_size - len(out)))
            if not chunk:
                break
            out += chunk
    if len(out) != info.file_size:
        raise MalformedPickleError(f"{source}: {_r(info.filename)} holds {len(out):,} bytes, it declares "
                                   f"{info.file_size:,}")
    return bytes(out)


def _read_torch_zip(f, source):
    def run():
        with zipfile.ZipFile(f) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise MalformedPickleError(f"{source}: a zip file, but not a torch.save file (no single */data.pkl)")
            prefix = pkls[0][: -len("data.pkl")]
            order = infos.get(f"{prefix}byteorder")
            if order is not None:
                if order.file_size > 16 or _read_member(zf, order, source).strip() not in (b"little", b""):
                    raise MalformedPickleError(f"{source}: big-endian torch files are not supported")
            cache = {}

            def storages(pid):
                key, dtype, numel = _storage_pid(pid, source)
                if key not in cache:
                    info = infos.get(f"{prefix}data/{key}")
                    if info is None:
                        raise MalformedPickleError(f"{source}: storage {_r(key)} is missing from the archive")
                    raw = _read_member(zf, info, source, expected=numel * _element_size(dtype))
                    cache[key] = _Storage(dtype, numel, _flat_from_bytes(raw, dtype, numel, source))
                return cache[key]

            return _load_one(io.BytesIO(_read_member(zf, infos[pkls[0]], source)), source, storages)

    return _guarded(run, source)


def _read_torch_stream(f, source):
    """A ``torch.save`` file (zip or legacy format) from the in-memory binary stream ``f``."""
    start = f.tell()
    if f.read(4) == b"PK\x03\x04":
        f.seek(start)
        return _read_torch_zip(f, source)
    f.seek(start)
    magic = _load_one(f, source)
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise MalformedPickleError(f"{source}: not a torch.save file")
    _load_one(f, source)  # protocol version
    sys_info = _load_one(f, source)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise MalformedPickleError(f"{source}: big-endian torch files are not supported")
    # The storages' bytes follow the main pickle, whose storage ids give their dtypes: a first pass records
    # the ids (with empty tensors), then the data is read, then a second pass builds the real tensors.
    main_at = f.tell()
    found = {}

    def record(pid):
        key, dtype, numel = _storage_pid(pid, source)
        found.setdefault(key, _Storage(dtype, numel))
        return found[key]

    _load_one(f, source, record)
    keys = _load_one(f, source)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or sorted(keys) != sorted(found):
        raise MalformedPickleError(f"{source}: the storage list does not match the storages used")
    here = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(here)
    for key in keys:
        st = found[key]
        head = f.read(8)
        if len(head) != 8:
            raise MalformedPickleError(f"{source}: truncated storage data")
        (numel,) = struct.unpack("<q", head)
        if numel != st.numel:
            raise MalformedPickleError(f"{source}: storage {_r(key)} has {numel} elements, its id says {st.numel}")
        nbytes = numel * _element_size(st.dtype)
        if nbytes > end - f.tell():
            raise MalformedPickleError(f"{source}: storage {_r(key)} declares {nbytes:,} bytes, the file has "
                                       f"{end - f.tell():,} left")
        st.flat = _flat_from_bytes(f.read(nbytes), st.dtype, numel, source)
    f.seek(main_at)
    return _load_one(f, source, lambda pid: found[_storage_pid(pid, source)[0]])


def _file_bytes(path) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        return f.read()


def load_torch_file(path, max_bytes=None):
    """The object in a ``torch.save`` file, read through the allow-list (no ``torch.load``); persistent
    objects stay :class:`PersistentObject` records."""
    path = os.fspath(path)
    data = _file_bytes(path)
    with allocation_budget(path, len(data), max_bytes):
        return _read_torch_stream(io.BytesIO(data), path)


def read_file(path):
    """The raw (inert) object tree of a plain pickle or a ``torch.save`` file (zip or legacy), read under the
    current allocation budget (:func:`allocation_budget`; one is opened for the file when there is none)."""
    path = os.fspath(path)
    data = _file_bytes(path)
    with allocation_budget(path, len(data)):
        f = io.BytesIO(data)
        if data.startswith(b"PK\x03\x04"):
            return _read_torch_zip(f, path)
        if not data.startswith(b"\x80"):
            raise MalformedPickleError(f"{path}: not a pickle or torch.save file")
        obj = _load_one(f, path)
        if type(obj) is int and obj == _LEGACY_MAGIC:
            f.seek(0)
            return _read_torch_stream(f, path)
        return obj


# --- plain data ------------------------------------------------------------------------------------------------


def plain_tree(obj, source="<pickle>"):
    """``obj`` with the stand-ins replaced by plain data: containers, numbers, strings, tensors and arrays as
    they are, :class:`PersistentObject` / :class:`PlainObject` records rebuilt around plain contents.

    Shared references are expanded (each use is a separate copy); the expanded tree may hold at most
    ``2 x (opcodes read) + 10000`` nodes, so a small file of nested shared references cannot expand without
    bound; a cycle is an error."""
    budget = _BUDGET.get()
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


def read_plain(path, max_bytes=None):
    """:func:`read_file` then :func:`plain_tree`: the file's content as plain data and inert records."""
    path = os.fspath(path)
    with allocation_budget(path, os.path.getsize(path) if os.path.isfile(path) else 0, max_bytes):
        return plain_tree(read_file(path), path)
