"""Safe import of the official EDM2 network files (``.pkl``), of ``torch.save`` files and of state dicts.

The official release pickles its networks with NVIDIA's ``torch_utils.persistence``: every network object
is stored as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the
Python *source* of the defining module (``module_src``), the ``class_name`` and the object's ``state``
(its ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs`` and plain
attributes). Loading such a file with ``pickle.load`` executes that source, and a pickle can call any
importable function besides. Nothing here does either:

* :class:`SafeUnpickler` resolves globals only from an explicit allow-list (:data:`ALLOWED_GLOBALS`), each
  mapped to a stand-in written here: the persistence hook becomes an inert :class:`PersistentObject`
  record (``module_src`` is kept as a string and never run), tensors are rebuilt from storages that are
  parsed here byte by byte (never through ``torch.load``), ``dnnlib.util.EasyDict`` becomes a ``dict``,
  ``torch.nn.ModuleDict`` an inert record, NumPy arrays are rebuilt from their raw bytes. Any other global,
  and so any call of anything else, raises :class:`UnsafePickleError` naming it before it could run.
* The networks are then rebuilt as ``fastdiff.nn`` modules from the recorded class name and constructor
  arguments, and their parameters and buffers are loaded from the recorded state tree, checking that
  every official tensor is consumed, every fastdiff tensor is supplied, shapes and plain attributes
  (heads, flavors, balances...) agree; any mismatch is an :class:`EDM2ImportError` naming the tensor.

Entry points: :func:`load_edm2_pickle` (the whole file as a dict), :func:`load_any_network` (one network
from a ``.pkl``, a ``torch.save`` file or a fastdiff ``.safetensors`` file).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import torch

__all__ = [
    "load_edm2_pickle", "load_any_network", "load_network_and_info", "load_torch_file", "read_pickle", "build_network",
    "infer_precond_kwargs", "PersistentObject", "PlainObject", "UnsafePickleError", "EDM2ImportError",
    "ALLOWED_GLOBALS", "NETWORK_CLASSES",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asks for something outside the allow-list; nothing it names was imported or run."""


class EDM2ImportError(ValueError):
    """The file is safe to read but does not describe a network fastdiff can rebuild exactly."""


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
        return f"PersistentObject({self.class_name!r}, init_kwargs={self.init_kwargs!r})"


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


class _EasyDict(dict, metaclass=_Sealed):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict whose attributes are its items)."""

    def __setstate__(self, state):
        if state is None:
            return
        if not isinstance(state, dict):
            raise UnsafePickleError("unexpected state for dnnlib.util.EasyDict")
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


# --- tensors -----------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _Storage:
    """A storage read from the file: a flat tensor (``None`` during the first pass over a legacy file)."""

    __slots__ = ("dtype", "numel", "flat")

    def __init__(self, dtype, numel, flat=None):
        self.dtype, self.numel, self.flat = dtype, numel, flat

    def __setstate__(self, state):
        raise UnsafePickleError("unexpected state assignment (BUILD) on a storage")


def _flat_from_bytes(raw, dtype, numel, what):
    size = torch.empty(0, dtype=dtype).element_size()
    if len(raw) != numel * size:
        raise EDM2ImportError(f"{what}: expected {numel} x {size} bytes of {dtype}, found {len(raw)}")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _check_ints(value, what, allow_empty=True):
    if not isinstance(value, (tuple, list)) or (not allow_empty and not value):
        raise UnsafePickleError(f"malformed tensor record: {what} is {type(value).__name__}")
    for v in value:
        if type(v) is not int or v < 0:
            raise UnsafePickleError(f"malformed tensor record: {what} contains {v!r}")
    return tuple(value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"malformed tensor record: expected a storage, got {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise UnsafePickleError(f"malformed tensor record: storage offset {offset!r}")
    size, stride = _check_ints(size, "size"), _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise UnsafePickleError(f"malformed tensor record: size {size} and stride {stride} differ in length")
    if backward_hooks:
        raise UnsafePickleError("refusing a tensor with backward hooks")
    if storage.flat is None:  # first pass over a legacy file: the data comes later
        return torch.empty(0, dtype=storage.dtype)
    if all(s > 0 for s in size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.flat.numel():
            raise EDM2ImportError(
                f"malformed tensor: size {size}, stride {stride}, offset {offset} reach past its storage of "
                f"{storage.flat.numel()} elements"
            )
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
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
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


class _NpArray:
    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        import numpy as np

        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[1], _NpDtype)):
            raise UnsafePickleError("malformed numpy array state")
        shape, dtype, fortran, raw = state
        shape = _check_ints(shape, "numpy shape")
        if not isinstance(raw, (bytes, bytearray)):
            raise UnsafePickleError("refusing a numpy array that is not raw numeric data")
        dt = dtype.resolve()
        arr = np.frombuffer(bytes(raw), dtype=dt).copy()
        if arr.size != math.prod(shape):
            raise EDM2ImportError(f"malformed numpy array: {arr.size} values for shape {shape}")
        self.array = arr.reshape(shape, order="F" if fortran else "C")


def _np_dtype(spec, align=False, copy=True):
    import numpy as np

    if not isinstance(spec, str):
        raise UnsafePickleError(f"refusing numpy dtype {spec!r}")
    try:
        kind = np.dtype(spec).kind
    except TypeError:
        raise UnsafePickleError(f"unknown numpy dtype {spec!r}") from None
    if kind not in "biufc":
        raise UnsafePickleError(f"refusing numpy dtype {spec!r}: only numeric data is accepted")
    return _NpDtype(spec)


def _np_reconstruct(subtype, shape, typecode):
    if not (isinstance(subtype, _Marker) and subtype.value == "ndarray"):
        raise UnsafePickleError(f"refusing numpy array subtype {subtype!r}")
    return _NpArray()


def _np_frombuffer(buf, dtype, shape, order="C"):
    """``numpy.core.numeric._frombuffer``: how protocol-5 pickles store arrays."""
    import numpy as np

    if isinstance(buf, pickle.PickleBuffer):
        buf = bytes(buf.raw())
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, _NpDtype) or order not in ("C", "F"):
        raise UnsafePickleError("refusing a numpy array that is not raw numeric data")
    shape = _check_ints(shape, "numpy shape")
    arr = np.frombuffer(bytes(buf), dtype=dtype.resolve()).copy()
    if arr.size != math.prod(shape):
        raise EDM2ImportError(f"malformed numpy array: {arr.size} values for shape {shape}")
    out = _NpArray()
    out.array = arr.reshape(shape, order=order)
    return out


def _np_scalar(dtype, raw=None):
    import numpy as np

    if not isinstance(dtype, _NpDtype) or not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError("refusing a numpy scalar that is not raw numeric data")
    dt = dtype.resolve()
    if len(raw) != dt.itemsize:
        raise EDM2ImportError(f"malformed numpy scalar: {len(raw)} bytes for {dt}")
    return np.frombuffer(bytes(raw), dtype=dt)[0]


# --- the persistence hook ------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict):
        raise UnsafePickleError(f"malformed persistent object: meta is {type(meta).__name__}, expected a dict")
    missing = [k for k in ("type", "class_name", "state") if k not in meta]
    if missing:
        raise UnsafePickleError(f"malformed persistent object: meta lacks {missing}")
    if meta["type"] != "class":
        raise UnsafePickleError(f"unsupported persistent object type {meta['type']!r}")
    class_name, state = meta["class_name"], meta["state"]
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise UnsafePickleError("malformed persistent object: class_name must be a str and state a dict")
    src = meta.get("module_src")
    if src is not None and not isinstance(src, str):
        raise UnsafePickleError("malformed persistent object: module_src is not a string")
    args = state.get("_init_args", state.get("init_args")) or ()
    kwargs = state.get("_init_kwargs", state.get("init_kwargs")) or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise UnsafePickleError(f"malformed persistent object {class_name}: init args/kwargs of the wrong type")
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
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
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


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only from :data:`ALLOWED_GLOBALS`.

    ``storages``: ``persistent_load`` for ``torch.save`` files (``key -> _Storage``), else ``None`` (a
    persistent id is then an error).
    """

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
            f"refusing to load {self._source}: it references the global '{module}.{name}', which is not on "
            "fastdiff's allow-list for EDM2 network files (nothing from the file was imported or executed)"
        )

    def persistent_load(self, pid):
        if self._storages is None:
            raise UnsafePickleError(f"refusing to load {self._source}: unexpected persistent id {pid!r}")
        return self._storages(pid)


def read_pickle(file, source="<pickle>"):
    """One pickled object from the binary ``file`` through :class:`SafeUnpickler` (inert records, no code)."""
    try:
        return SafeUnpickler(file, source).load()
    except (UnsafePickleError, EDM2ImportError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise EDM2ImportError(f"{source}: not a valid pickle ({type(exc).__name__}: {exc})") from None


# --- torch.save files (zip and legacy) -------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _storage_pid(pid, source):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _Marker)):
        raise UnsafePickleError(f"refusing to load {source}: unexpected persistent id {pid!r}")
    key, numel = pid[2], pid[4]
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise UnsafePickleError(f"refusing to load {source}: malformed storage id {pid!r}")
    if len(pid) > 5 and pid[5] is not None:
        raise EDM2ImportError(f"{source}: storage views (pre-1.0 torch files) are not supported")
    return key, pid[1].value, numel


def _read_torch_zip(path_or_file, source):
    with zipfile.ZipFile(path_or_file) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise EDM2ImportError(f"{source}: a zip file, but not a torch.save file (no single */data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
            raise EDM2ImportError(f"{source}: big-endian torch files are not supported")
        cache = {}

        def storages(pid):
            key, dtype, numel = _storage_pid(pid, source)
            if key not in cache:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise EDM2ImportError(f"{source}: storage {key} is missing from the archive")
                cache[key] = _Storage(dtype, numel, _flat_from_bytes(zf.read(name), dtype, numel, source))
            return cache[key]

        with zf.open(pkls[0]) as f:
            return _load_checked(SafeUnpickler(io.BytesIO(f.read()), source, storages), source)


def _load_checked(unpickler, source):
    try:
        return unpickler.load()
    except (UnsafePickleError, EDM2ImportError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise EDM2ImportError(f"{source}: not a valid pickle ({type(exc).__name__}: {exc})") from None


def _read_torch_stream(f, source):
    """A ``torch.save`` file (zip or legacy format) from the seekable binary stream ``f``."""
    start = f.tell()
    if f.read(4) == b"PK\x03\x04":
        f.seek(start)
        return _read_torch_zip(f, source)
    f.seek(start)
    magic = read_pickle(f, source)
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise EDM2ImportError(f"{source}: not a torch.save file")
    read_pickle(f, source)  # protocol version
    sys_info = read_pickle(f, source)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise EDM2ImportError(f"{source}: big-endian torch files are not supported")
    # The storages' bytes follow the main pickle, whose storage ids give their dtypes: a first pass records
    # the ids (with empty tensors), then the data is read, then a second pass builds the real tensors.
    main_at = f.tell()
    found = {}

    def record(pid):
        key, dtype, numel = _storage_pid(pid, source)
        found.setdefault(key, _Storage(dtype, numel))
        return found[key]

    _load_checked(SafeUnpickler(f, source, record), source)
    keys = read_pickle(f, source)
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(found):
        raise EDM2ImportError(f"{source}: the storage list does not match the storages used")
    for key in keys:
        st = found[key]
        head = f.read(8)
        if len(head) != 8:
            raise EDM2ImportError(f"{source}: truncated storage data")
        (numel,) = struct.unpack("<q", head)
        if numel != st.numel:
            raise EDM2ImportError(f"{source}: storage {key} has {numel} elements, its id says {st.numel}")
        nbytes = numel * torch.empty(0, dtype=st.dtype).element_size()
        st.flat = _flat_from_bytes(f.read(nbytes), st.dtype, numel, source)
    f.seek(main_at)
    return _load_checked(SafeUnpickler(f, source, lambda pid: found[_storage_pid(pid, source)[0]]), source)


def load_torch_file(path):
    """The object in a ``torch.save`` file, read through the allow-list (no ``torch.load``); persistent
    objects stay :class:`PersistentObject` records."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _read_torch_stream(f, path)


def _read_any(path):
    """The raw (inert) object tree of a plain pickle or a torch.save file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):
            return _read_torch_zip(f, path)
        if not head.startswith(b"\x80"):
            raise EDM2ImportError(f"{path}: not a pickle or torch.save file")
        obj = read_pickle(f, path)
        if type(obj) is int and obj == _LEGACY_MAGIC:
            f.seek(0)
            return _read_torch_stream(f, path)
        return obj


# --- network reconstruction -------------------------------------------------------------------------------

NETWORK_CLASSES = ("Precond", "UNet", "Block", "MPConv", "MPFourier")

# The official constructors' positional order (training/networks_edm2.py), to name positional init args.
_OFFICIAL_ARGS = {
    "Precond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels"),
    "UNet": ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult", "channel_mult_noise",
             "channel_mult_emb", "num_blocks", "attn_resolutions", "label_balance", "concat_balance"),
    "Block": ("in_channels", "out_channels", "emb_channels", "flavor", "resample_mode", "resample_filter",
              "attention", "channels_per_head", "dropout", "res_balance", "attn_balance", "clip_act"),
    "MPConv": ("in_channels", "out_channels", "kernel"),
    "MPFourier": ("num_channels", "bandwidth"),
}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _to_plain(obj, _active=None):
    """Containers, numbers, strings, tensors and arrays as they are; stand-ins as plain data;
    persistent objects as they are (the caller decides)."""
    if _active is None:
        _active = set()
    if isinstance(obj, (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype)):
        return obj
    if isinstance(obj, _NpArray):
        return obj.array
    if isinstance(obj, _NpDtype):
        return obj.resolve()
    if type(obj).__module__ == "numpy":  # numpy scalars and arrays made by the stand-ins
        return obj
    if id(obj) in _active:
        raise EDM2ImportError("the pickle holds a cyclic structure")
    _active.add(id(obj))
    try:
        if isinstance(obj, PersistentObject):
            return PersistentObject(obj.class_name, obj.version, obj.module_src, _to_plain(obj.init_args, _active),
                                    _to_plain(obj.init_kwargs, _active), _to_plain(obj.state, _active))
        if isinstance(obj, PlainObject):
            new = PlainObject(obj.class_path)
            new.state = _to_plain(obj.state, _active)
            return new
        if isinstance(obj, OrderedDict):
            return OrderedDict((_to_plain(k, _active), _to_plain(v, _active)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {_to_plain(k, _active): _to_plain(v, _active) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)):
            return type(obj)(_to_plain(v, _active) for v in obj)
        if isinstance(obj, (_Marker, _Callable, _Storage)) or isinstance(obj, type):
            raise UnsafePickleError(f"the pickle stores {obj!r} as a value, which fastdiff does not accept")
        raise EDM2ImportError(f"unexpected object of type {type(obj).__name__} in the pickle")
    finally:
        _active.discard(id(obj))


def _plain_tree(path):
    try:
        return _to_plain(_read_any(path))
    except RecursionError:
        raise EDM2ImportError(f"{path}: the pickle is nested too deeply") from None


def _normalize_kwargs(class_name, args, kwargs, where):
    names = _OFFICIAL_ARGS[class_name]
    if len(args) > len(names):
        raise EDM2ImportError(f"{where}: {class_name} got {len(args)} positional arguments, expected <= {len(names)}")
    out = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in out:
            raise EDM2ImportError(f"{where}: {class_name} got argument {k!r} twice")
        out[k] = v
    # fastdiff resamples with the [1, 1] filter only (the official default); any multiple of it is the same.
    f = out.pop("resample_filter", None)
    if f is not None:
        ok = isinstance(f, (list, tuple)) and len(f) == 2 and f[0] == f[1] and f[0] > 0
        if not ok:
            raise EDM2ImportError(f"{where}: resample_filter={f!r} is not supported (fastdiff resamples with [1, 1])")
    if class_name == "MPConv" and "kernel" in out:
        out["kernel"] = tuple(out["kernel"])
    return out


def _attrs_of(state):
    return {k: v for k, v in state.items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))}


def _collect(obj, module, prefix, tensors, errors):
    """Walk the recorded state of ``obj`` alongside the fastdiff ``module``; gather tensors by name."""
    where = prefix[:-1] or "<root>"
    if isinstance(obj, PersistentObject):
        kind = obj.class_name
    elif isinstance(obj, PlainObject):
        kind = obj.class_path.rsplit(".", 1)[1]
    else:
        errors.append(f"{where}: expected a module, found {type(obj).__name__}")
        return
    if kind != type(module).__name__:
        errors.append(f"{where}: the file has a {kind}, fastdiff expects a {type(module).__name__}")
        return
    state = obj.state
    for hooks in _HOOK_DICTS:
        if state.get(hooks):
            errors.append(f"{where}: the module carries {hooks}, which fastdiff does not import")
    # Plain attributes both sides know (heads, flavor, balances, ...) must agree.
    ours = _attrs_of(vars(module))
    for k, v in _attrs_of(state).items():
        if k in ours and ours[k] != v:
            errors.append(f"{where}: attribute {k} is {v!r} in the file but {ours[k]!r} in the rebuilt network")
    for group, theirs_key in (("parameter", "_parameters"), ("buffer", "_buffers")):
        theirs = state.get(theirs_key) or {}
        if not isinstance(theirs, dict):
            errors.append(f"{where}: malformed {theirs_key}")
            continue
        mine = module._parameters if group == "parameter" else module._buffers
        for name, t in theirs.items():
            full = prefix + name
            if t is None:
                if mine.get(name) is not None:
                    errors.append(f"missing {group} {full} (None in the file)")
                continue
            if not isinstance(t, torch.Tensor):
                errors.append(f"{group} {full} is a {type(t).__name__}, not a tensor")
            elif name not in mine or mine[name] is None:
                errors.append(f"unknown {group} {full} {tuple(t.shape)} (fastdiff's {kind} has no such {group})")
            elif tuple(t.shape) != tuple(mine[name].shape):
                errors.append(f"{group} {full}: shape {tuple(t.shape)} in the file, {tuple(mine[name].shape)} expected")
            else:
                tensors[full] = t
        for name, t in mine.items():
            if t is not None and name not in theirs:
                errors.append(f"missing {group} {prefix + name} (expected shape {tuple(t.shape)})")
    theirs = state.get("_modules") or {}
    if not isinstance(theirs, dict):
        errors.append(f"{where}: malformed _modules")
        return
    mine = module._modules
    for name, child in theirs.items():
        if child is None:
            if mine.get(name) is not None:
                errors.append(f"missing submodule {prefix + name} (None in the file)")
        elif name not in mine or mine[name] is None:
            errors.append(f"unknown submodule {prefix + name} ({getattr(child, 'class_name', None) or child!r})")
        else:
            _collect(child, mine[name], f"{prefix}{name}.", tensors, errors)
    for name, child in mine.items():
        if child is not None and name not in theirs:
            errors.append(f"missing submodule {prefix + name} ({type(child).__name__})")


def build_network(obj, device="cpu", where="network"):
    """The fastdiff module (``Precond``, ``UNet``, ...) for the recorded persistent object ``obj``, with
    every parameter and buffer loaded from the record (exactly; float16 weights become float32)."""
    from fastdiff import nn as fnn

    if not isinstance(obj, PersistentObject):
        raise EDM2ImportError(f"{where}: not a network object ({type(obj).__name__})")
    if obj.class_name not in NETWORK_CLASSES:
        raise EDM2ImportError(
            f"{where}: unknown network class {obj.class_name!r}; fastdiff imports the official EDM2 classes "
            f"{', '.join(NETWORK_CLASSES)} (training/networks_edm2.py)"
        )
    kwargs = _normalize_kwargs(obj.class_name, obj.init_args, obj.init_kwargs, where)
    if obj.class_name in ("Precond", "UNet"):
        for k in ("channel_mult", "attn_resolutions"):
            if isinstance(kwargs.get(k), tuple):
                kwargs[k] = list(kwargs[k])
    cls = getattr(fnn, obj.class_name)
    try:
        with torch.device("meta"):
            net = cls(**kwargs)
    except TypeError as exc:
        raise EDM2ImportError(f"{where}: {obj.class_name}({kwargs}) is not supported by fastdiff: {exc}") from None
    tensors, errors = {}, []
    _collect(obj, net, "", tensors, errors)
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise EDM2ImportError(f"{where}: the {obj.class_name} in the file does not match fastdiff's:\n  {shown}")
    expected = net.state_dict()
    state = {}
    for name, ref in expected.items():
        t = tensors[name].detach()
        state[name] = t.to(dtype=ref.dtype).clone() if t.is_floating_point() else t.clone()
    net.load_state_dict(state, strict=True, assign=True)
    net = net.to(device)
    if hasattr(net, "preset"):
        net.preset = None
    return net.eval()


def load_edm2_pickle(path, device="cpu", keys=None) -> dict:
    """Read an official EDM2 network pickle (``{'ema': Precond, 'loss_fn': ..., 'encoder': ...,
    'dataset_kwargs': ...}``) without running any code from it.

    Networks (the EDM2 classes) become ``fastdiff.nn`` modules in eval mode on ``device``; other persistent
    objects (the loss, the encoder) become ``{'class_name', 'init_args', 'init_kwargs', 'attributes'}`` dicts;
    ``EasyDict`` becomes ``dict``; NumPy arrays stay arrays. ``keys``: convert only these top-level entries
    (the others are left out). Raises :class:`UnsafePickleError` for anything outside the allow-list and
    :class:`EDM2ImportError` for a network that does not match fastdiff's.
    """
    path = os.fspath(path)
    raw = _plain_tree(path)
    if not isinstance(raw, dict):
        raise EDM2ImportError(f"{path}: expected a dict at the top level (like the official pickles), got "
                              f"{type(raw).__name__}")
    if keys is not None:
        missing = [k for k in keys if k not in raw]
        if missing:
            raise EDM2ImportError(f"{path}: no entry {missing[0]!r}; the file has {describe(raw)}")
        raw = {k: raw[k] for k in keys}
    return {k: _convert_value(v, device, f"{path}[{k!r}]") for k, v in raw.items()}


def _looks_like_module(obj):
    return obj.class_name in NETWORK_CLASSES or "_parameters" in obj.state or "_modules" in obj.state


def _convert_value(value, device, where):
    if isinstance(value, PersistentObject):
        if value.class_name in NETWORK_CLASSES:
            return build_network(value, device, where)
        if _looks_like_module(value):
            raise EDM2ImportError(
                f"{where}: unknown network class {value.class_name!r}; fastdiff imports the official EDM2 "
                f"classes {', '.join(NETWORK_CLASSES)}"
            )
        return {
            "class_name": value.class_name,
            "init_args": list(value.init_args),
            "init_kwargs": _plainify(value.init_kwargs, device, where),
            "attributes": {k: _plainify(v, device, where) for k, v in value.state.items()
                           if k not in ("_init_args", "_init_kwargs", "init_args", "init_kwargs")},
        }
    return _plainify(value, device, where)


def _plainify(value, device, where):
    if isinstance(value, PersistentObject):
        return _convert_value(value, device, where)
    if isinstance(value, PlainObject):
        raise EDM2ImportError(f"{where}: a bare {value.class_path} outside a network is not supported")
    if isinstance(value, OrderedDict):
        return OrderedDict((k, _plainify(v, device, where)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _plainify(v, device, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plainify(v, device, where) for v in value)
    return value


def describe(data: dict) -> str:
    """``key (kind), ...`` for the top-level entries of a (raw or converted) file."""
    parts = []
    for k, v in data.items():
        if isinstance(v, PersistentObject):
            kind = v.class_name
        elif isinstance(v, torch.nn.Module):
            kind = type(v).__name__
        elif isinstance(v, dict) and "class_name" in v and "attributes" in v:
            kind = v["class_name"]
        else:
            kind = type(v).__name__
        parts.append(f"{k!r} ({kind})")
    return ", ".join(parts) or "no entries"


# --- state dicts without a config (torch.save'd .pt files) -------------------------------------------------


def infer_precond_kwargs(state: dict) -> dict:
    """Official-style ``Precond`` constructor arguments read off a state dict's names and shapes.

    Not recorded in a state dict, so the official defaults are assumed: ``channels_per_head=64``,
    ``sigma_data=0.5``, ``use_fp16=True``, the balances and ``clip_act``.
    """
    import re

    def shape(name):
        if name not in state:
            raise EDM2ImportError(f"state dict: missing {name}, is this an EDM2 Precond state dict?")
        return tuple(state[name].shape)

    convs = [m for k in state if (m := re.fullmatch(r"unet\.enc\.(\d+)x\1_conv\.weight", k))]
    if len(convs) != 1:
        raise EDM2ImportError("state dict: no unet.enc.RxR_conv.weight, is this an EDM2 Precond state dict?")
    res = int(convs[0].group(1))
    c0, cin = shape(convs[0].group(0))[:2]
    levels, r = [], res
    while f"unet.enc.{r}x{r}_block0.conv_res1.weight" in state:
        levels.append(shape(f"unet.enc.{r}x{r}_block0.conv_res1.weight")[0])
        r //= 2
    if not levels or levels[0] != c0:
        raise EDM2ImportError("state dict: cannot find the encoder blocks (unet.enc.RxR_block0...)")
    num_blocks = sum(1 for k in state if re.fullmatch(rf"unet\.enc\.{res}x{res}_block\d+\.conv_res1\.weight", k))
    attn = sorted({int(m.group(1)) for k in state
                   if (m := re.fullmatch(r"unet\.(?:enc|dec)\.(\d+)x\1_block\d+\.attn_qkv\.weight", k))}, reverse=True)
    cnoise = shape("unet.emb_fourier.freqs")[0]
    cemb = shape("unet.emb_noise.weight")[0]
    mc = math.gcd(*levels, cnoise, cemb)
    kwargs = dict(img_resolution=res, img_channels=cin - 1,
                  label_dim=shape("unet.emb_label.weight")[1] if "unet.emb_label.weight" in state else 0,
                  logvar_channels=shape("logvar_fourier.freqs")[0], model_channels=mc,
                  channel_mult=[c // mc for c in levels], num_blocks=num_blocks, attn_resolutions=attn)
    if cnoise != levels[0]:
        kwargs["channel_mult_noise"] = cnoise // mc
    if cemb != max(levels):
        kwargs["channel_mult_emb"] = cemb // mc
    return kwargs


def _network_from_state_dict(state, device, where):
    from fastdiff import nn as fnn

    state = {k: v for k, v in state.items()}
    if any(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    kwargs = infer_precond_kwargs(state)
    with torch.device("meta"):
        net = fnn.Precond(**kwargs)
    expected = net.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if unknown or missing or bad:
        raise EDM2ImportError(f"{where}: state dict does not match Precond({kwargs}): unknown {unknown[:10]}, "
                              f"missing {missing[:10]}, wrong shapes {bad[:10]}")
    net.load_state_dict({k: state[k].detach().to(v.dtype).clone() for k, v in expected.items()},
                        strict=True, assign=True)
    net.preset = None
    return net.to(device).eval()


def _is_state_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in obj.items())


# --- one network from any file --------------------------------------------------------------------------------


def load_any_network(path, device="cpu", key=None):
    """One network from ``path``, whatever its format (sniffed from the content):

    * a fastdiff network file (``.safetensors``) -> :func:`fastdiff.io.load_network`;
    * an official EDM2 pickle -> entry ``key`` (default ``'ema'``) via the safe importer;
    * a ``torch.save`` file holding a ``Precond`` state dict (config inferred from names and shapes,
      see :func:`infer_precond_kwargs`), or a dict with such a state dict or a network under ``key``
      (default: ``'ema'``, ``'net'``, ``'state_dict'``, ``'model'``, the first present).
    """
    return load_network_and_info(path, device, key)[0]


def load_network_and_info(path, device="cpu", key=None):
    """``(network, info)``: :func:`load_any_network`'s network, and the file's other top-level entries as
    plain data (other networks as ``{'class_name': ...}`` only); ``info`` is ``{}`` for fastdiff files. The
    network keeps ``info`` as ``net.source_entries`` (so an img512 network knows its encoder record)."""
    from fastdiff.io.checkpoint import load_network

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"\x80") or head == b"PK\x03\x04"):
        return load_network(path, device=device), {}
    raw = _plain_tree(path)
    if isinstance(raw, PersistentObject):
        return build_network(raw, device, path), {}
    if _is_state_dict(raw):
        return _network_from_state_dict(raw, device, path), {}
    if not isinstance(raw, dict):
        raise EDM2ImportError(f"{path}: holds a {type(raw).__name__}, not a network or a dict of networks")
    candidates = [key] if key is not None else ["ema", "net", "state_dict", "model"]
    for k in candidates:
        if k not in raw:
            continue
        where = f"{path}[{k!r}]"
        value = raw[k]
        if isinstance(value, PersistentObject) and not _looks_like_module(value):
            raise EDM2ImportError(f"{where} is a {value.class_name} object, not a network")
        if isinstance(value, PersistentObject):
            net = build_network(value, device, where)
        elif _is_state_dict(value):
            net = _network_from_state_dict(value, device, where)
        else:
            raise EDM2ImportError(f"{where} is a {type(value).__name__}, not a network")
        info = {}
        for other, v in raw.items():
            if other == k:
                continue
            if isinstance(v, PersistentObject) and _looks_like_module(v):
                info[other] = {"class_name": v.class_name}  # another network: not converted
            elif _is_state_dict(v):
                info[other] = {"state_dict": len(v)}
            else:
                try:
                    info[other] = _convert_value(v, "cpu", f"{path}[{other!r}]")
                except EDM2ImportError:
                    info[other] = None
        net.source_entries = info  # e.g. the encoder record: fastdiff.data.latent.scaling_of(net)
        return net, info
    raise EDM2ImportError(f"{path}: no network under {' / '.join(map(repr, candidates))}; the file has {describe(raw)}")
