"""Counting the places where the host waits for the device: ``with count_host_reads() as reads: ...``.

On a GPU every read of a device value by the host (``.item()``, ``float(t)``, ``bool(t)``, ``if t.any():``)
and every operation whose output size depends on the data (``nonzero``, boolean-mask indexing,
``unique``, ``masked_select``) blocks the host until the GPU has finished all queued work: the queue
drains and the GPU idles while Python issues the next kernels. A tensor made from Python data
(``torch.tensor([...], device=...)``, ``torch.as_tensor(0.5, device=...)``) is a blocking host-to-device
copy, which also waits for the stream.

:class:`HostReads` is a ``TorchDispatchMode`` that counts these at the dispatcher, so it sees them on the
CPU too, where they cost nothing: the CPU tests use it to check that the sampling loop would not
synchronize on a GPU. ``reads`` counts ``aten._local_scalar_dense`` (what ``.item()``, ``float()``,
``int()`` and ``bool()`` of a tensor come down to), the data-dependent-size ops, and calls of
``Tensor.tolist()`` / ``Tensor.numpy()`` (which do not reach the dispatcher: the mode wraps them,
process-wide, while active; a diagnostic for tests and benchmarks, not for production code); ``uploads``
counts ``aten.lift_fresh`` (a tensor from Python data). A value computed on the CPU on purpose (a
host-side replica of a device computation) is read with :func:`host_list`, which refuses device tensors
and is not counted.
"""

from __future__ import annotations

import collections
import threading
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReads", "count_host_reads", "host_list"]

_LOCAL = threading.local()  # .exempt: inside host_list, whose CPU reads are not device reads


def host_list(t: torch.Tensor):
    """``t.tolist()`` of a tensor that lives on the CPU by construction (never a device read: a device
    tensor is an error); not counted by :class:`HostReads`."""
    if t.device.type != "cpu":
        raise ValueError(f"host_list: expected a CPU tensor, got one on {t.device}")
    _LOCAL.exempt = getattr(_LOCAL, "exempt", 0) + 1
    try:
        return t.tolist()
    finally:
        _LOCAL.exempt -= 1

_aten = torch.ops.aten


def _ops(*names):
    out = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            out.update(getattr(packet, o) for o in packet.overloads())
    return out


# Ops whose result the host must wait for: a scalar read, or an output whose size depends on the data.
_READS = _ops("_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "argwhere")
_UPLOADS = _ops("lift_fresh")
_INDEXING = _ops("index", "index_put", "index_put_", "_index_put_impl_")


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values and uploads of Python data (see the module docstring).

    ``reads``, ``uploads``: the counts; ``by_op``: a ``Counter`` of op names; ``where``: a ``Counter`` of the
    innermost fastdiff source line of each read and upload (when ``trace=True``)."""

    def __init__(self, trace: bool = False):
        super().__init__()
        self.reads = 0
        self.uploads = 0
        self.by_op: collections.Counter = collections.Counter()
        self.where: collections.Counter = collections.Counter()
        self.trace = trace

    def __enter__(self):
        self._saved = (torch.Tensor.tolist, torch.Tensor.numpy)
        for name, orig in zip(("tolist", "numpy"), self._saved):
            setattr(torch.Tensor, name, self._wrap(orig, name))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)

    def _wrap(self, orig, name):
        def read(t, *args, **kwargs):
            if not getattr(_LOCAL, "exempt", 0):
                self.reads += 1
                self._note(f"Tensor.{name}")
            return orig(t, *args, **kwargs)

        return read

    def _note(self, func) -> None:
        self.by_op[str(func)] += 1
        if self.trace:
            frames = [f for f in traceback.extract_stack() if "/fastdiff/" in f.filename
                      and not f.filename.endswith("hostreads.py")]
            if frames:
                f = frames[-1]
                self.where[f"{f.filename.split('/fastdiff/')[-1]}:{f.lineno}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or (func in _INDEXING and _bool_index(args)):
            self.reads += 1
            self._note(func)
        elif func in _UPLOADS:
            self.uploads += 1
            self._note(func)
        return func(*args, **kwargs)


def count_host_reads(trace: bool = False) -> HostReads:
    """A :class:`HostReads` mode to use as ``with count_host_reads() as reads: ...``."""
    return HostReads(trace)
