"""The stand-ins of the allowed globals (:data:`ALLOWED_GLOBALS`): NVIDIA's persistence hook becomes an
inert :class:`PersistentObject` record (the module source it carries is never executed), tensors are
rebuilt from storages parsed byte by byte (never through ``torch.load``), ``dnnlib.util.EasyDict`` a
``dict``, ``torch.nn.ModuleDict`` and friends inert :class:`PlainObject` records, NumPy arrays are rebuilt
from their raw bytes. Every copy they make is charged to the load's budget."""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict

import torch

from fastdiff.io.safe_pickle.budget import charge
from fastdiff.io.safe_pickle.errors import MalformedPickleError, UnsafePickleError, _r

_ITEM_BYTES = 64  # what one container entry copied by a stand-in is charged


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
    from fastdiff.io.safe_pickle.torch_files import _read_torch_stream  # a torch file inside a pickle

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
