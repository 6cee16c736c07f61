"""Arrays from other frameworks: NumPy, CuPy and any DLPack producer, in and out of fastdiff's functional API.

``wrap(fn)`` returns a version of ``fn`` that accepts foreign arrays wherever it takes tensors and returns the
caller's kind of array, zero-copy where the memory allows it (see :func:`wrap`)::

    y = interop.ops.mp_silu(np.random.randn(4, 8).astype(np.float32))   # -> numpy.ndarray

``fastdiff.interop.ops`` mirrors ``fastdiff.ops`` with every function wrapped (``wrap_module`` does the same
for any module); ``cfg_combine`` / ``autoguidance_combine`` are the functional guidance combinations;
``frechet_distance`` wraps ``fastdiff.metrics.frechet_distance``.
"""

from __future__ import annotations

import functools
import sys
import types
import warnings
from typing import Any, Callable

import torch

from fastdiff import ops as _ops
from fastdiff.sampling.guidance import Guided

__all__ = ["wrap", "wrap_module", "to_torch", "from_torch", "array_kind", "ops", "cfg_combine",
           "autoguidance_combine", "frechet_distance"]

# Argument types that need no conversion: the hot path only tests membership in this set.
_NATIVE = frozenset({torch.Tensor, torch.nn.Parameter, float, int, bool, complex, str, bytes, type(None),
                     torch.dtype, torch.device, torch.Generator, slice})


def array_kind(obj: Any) -> str | None:
    """``'numpy'``, ``'cupy'``, ``'dlpack:<package>'`` for a foreign array, else None (tensors, numbers)."""
    if isinstance(obj, torch.Tensor):
        return None
    cls = type(obj)
    root = cls.__module__.split(".", 1)[0]
    if root == "numpy":
        return "numpy" if cls.__name__ == "ndarray" or _is_ndarray(obj) else None
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return "cupy" if root == "cupy" else f"dlpack:{root}"
    if "numpy" in sys.modules and _is_ndarray(obj):  # an ndarray subclass from another package
        return "numpy"
    return None


def _is_ndarray(obj) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray)


def to_torch(obj: Any, kind: str | None = None) -> torch.Tensor:
    """A foreign array as a torch tensor, sharing memory where possible (see :func:`wrap`)."""
    kind = kind or array_kind(obj)
    if kind == "numpy":
        import numpy as np

        if obj.dtype.byteorder not in ("=", "|") or any(s < 0 for s in obj.strides):
            obj = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("="))
        if not obj.flags.writeable:
            with warnings.catch_warnings():  # torch warns about read-only memory; the ops only read it
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(obj)
        return torch.from_numpy(obj)
    if kind is not None:
        return torch.from_dlpack(obj)
    if isinstance(obj, torch.Tensor):
        return obj
    raise TypeError(f"cannot convert {type(obj).__name__} to a torch tensor")


def from_torch(t: torch.Tensor, kind: str | None) -> Any:
    """A torch tensor as ``kind`` of array (``'numpy'``, ``'cupy'``, ``'dlpack:<package>'``, None = torch)."""
    if kind is None:
        return t
    t = t.detach()
    if kind == "numpy":
        if t.dtype == torch.bfloat16:
            t = t.float()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.resolve_conj().resolve_neg().numpy()
    if kind == "cupy":
        import cupy

        if t.device.type != "cuda":
            return cupy.asarray(from_torch(t, "numpy"))
        if t.dtype == torch.bfloat16:
            t = t.float()
        return cupy.from_dlpack(t)
    package = sys.modules.get(kind.split(":", 1)[1]) if kind.startswith("dlpack:") else None
    convert = getattr(package, "from_dlpack", None)
    return convert(t) if convert is not None else t


def _convert_in(obj, kinds: list):
    if type(obj) in _NATIVE:
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(_convert_in(o, kinds) for o in obj)
    kind = array_kind(obj)
    if kind is None:
        return obj
    if kinds and kinds[0] != kind:
        raise TypeError(f"mixed array kinds in one call: {kinds[0]} and {kind}")
    kinds.append(kind)
    return to_torch(obj, kind)


def _convert_out(obj, kind: str):
    if isinstance(obj, torch.Tensor):
        return from_torch(obj, kind)
    if isinstance(obj, tuple):
        items = [_convert_out(o, kind) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_convert_out(o, kind) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_out(v, kind) for k, v in obj.items()}
    return obj


def wrap(fn: Callable) -> Callable:
    """``fn`` accepting NumPy / CuPy / DLPack arrays and returning the caller's kind of array.

    Conversions are zero-copy where the memory allows it:

    - NumPy in: ``torch.from_numpy`` (shares memory; read-only arrays too, since the ops do not write
      their inputs -- except the in-place ops such as ``weight_norm_``, which then update the caller's
      array, as they would a tensor). Arrays torch cannot view (negative strides, non-native byte
      order) are copied. NumPy out: ``tensor.numpy()`` (shares memory) after moving the result to the
      CPU if needed; bfloat16 results become float32 (NumPy has no bfloat16).
    - CuPy in: ``torch.from_dlpack`` (same GPU memory, stream-synchronised by the DLPack protocol).
      CuPy out: ``cupy.from_dlpack``.
    - Other objects with ``__dlpack__`` / ``__dlpack_device__`` (JAX, MLX, dpctl, ...): in through
      ``torch.from_dlpack``; out through the producer package's ``from_dlpack`` when it has one, else
      as torch tensors.

    Results are converted recursively through tuples, lists and dicts; numbers and None pass through.
    The kind of the first foreign array decides the output kind; mixing NumPy and CuPy arrays in one
    call is an error. Plain torch calls stay fast: the wrapper checks each argument's type against a
    set of native types once and calls ``fn`` directly when nothing is foreign.
    """
    if getattr(fn, "__fastdiff_interop__", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        native = _NATIVE
        for a in args:
            if type(a) not in native:
                break
        else:
            for v in kwargs.values():
                if type(v) not in native:
                    break
            else:
                return fn(*args, **kwargs)  # the torch path: one set lookup per argument
        kinds: list = []
        args = tuple(_convert_in(a, kinds) for a in args)
        kwargs = {k: _convert_in(v, kinds) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return _convert_out(out, kinds[0]) if kinds else out

    wrapper.__fastdiff_interop__ = True
    return wrapper


def wrap_module(module: types.ModuleType, names=None, name: str | None = None) -> types.ModuleType:
    """A module object mirroring ``module``: each public function (``names``, default ``__all__``)
    wrapped with :func:`wrap`; everything else (constants, submodules, context managers) as it is."""
    names = list(names if names is not None else getattr(module, "__all__", [n for n in dir(module) if n[0] != "_"]))
    mirror = types.ModuleType(name or f"fastdiff.interop.{module.__name__.rsplit('.', 1)[-1]}",
                              f"{module.__name__} with NumPy / CuPy / DLPack arrays accepted (fastdiff.interop.wrap).")
    for n in names:
        obj = getattr(module, n)
        wrapped = isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) and n != "use_reference"
        setattr(mirror, n, wrap(obj) if wrapped else obj)
    mirror.__all__ = names
    return mirror


ops = wrap_module(_ops, name="fastdiff.interop.ops")


@wrap
def cfg_combine(d_uncond, d_cond, w):
    """Classifier-free guidance on denoised predictions: ``D = D_u + w (D_c - D_u)`` (``w`` a number or
    a per-sample ``[N]`` array); a number ``w = 1`` gives (a copy of) ``D_c`` exactly."""
    if not isinstance(w, torch.Tensor) and w == 1:
        return d_cond.clone()
    return Guided(d_cond, d_uncond, w).combine()


@wrap
def autoguidance_combine(d_guide, d_main, w):
    """Autoguidance on denoised predictions: ``D = D_guide + w (D_main - D_guide)``; a number ``w = 1``
    gives (a copy of) ``D_main`` exactly."""
    if not isinstance(w, torch.Tensor) and w == 1:
        return d_main.clone()
    return Guided(d_main, d_guide, w).combine()


def __getattr__(name: str):
    if name == "frechet_distance":  # imported on first use: fastdiff.metrics is a heavier import
        from fastdiff.metrics import frechet_distance as fd

        wrapped = wrap(fd)
        globals()[name] = wrapped
        return wrapped
    raise AttributeError(f"module 'fastdiff.interop' has no attribute {name!r}")
