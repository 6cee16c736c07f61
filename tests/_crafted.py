"""Crafted network files (for tests/test_crafted_files.py and tests/test_pickle_fuzz.py): each is a small
file that makes a naive loader crash, allocate without bound, or read uninitialized memory.

``CASES`` maps a name to ``(writer, error_regex)``: ``writer(path)`` writes the file, and fastdiff's reader
must refuse it with one of its own errors whose message matches ``error_regex``. Only the standard library,
numpy and torch are used, so the file can be imported by a bare ``python`` subprocess.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import torch

DEEP = 1_000_000  # nesting of the deep-tuple cases (CPython's tuple hash recurses in C)

FLOAT_STORAGE = torch.FloatStorage  # pickled by reference: the global torch.FloatStorage


def deep_dict_key(path):
    """``{((((...),),),): None}``, the key a tuple nested a million deep."""
    path.write_bytes(b"\x80\x02}" + b")" + b"\x85" * DEEP + b"Ns.")


def deep_frozenset(path):
    """``frozenset({((((...),),),)})`` with the FROZENSET opcode (protocol 4)."""
    path.write_bytes(b"\x80\x04(" + b")" + b"\x85" * DEEP + b"\x91.")


def deep_set(path):
    """A set holding the deep tuple (EMPTY_SET + ADDITEMS)."""
    path.write_bytes(b"\x80\x04\x8f(" + b")" + b"\x85" * DEEP + b"\x90.")


class _Reduce:
    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def tensor_build(path):
    """A rebuilt (empty) tensor with pickled state: BUILD would call ``Tensor.__setstate__`` -> ``set_``,
    growing its storage to 4096 uninitialized elements."""
    import warnings

    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what the official files pickle
        warnings.simplefilter("ignore")
        storage = torch.empty(0).storage()
    state = (torch.empty(0), 0, (4096,), (1,))
    t = _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, (0,), (1,), False, OrderedDict()), state)
    with open(path, "wb") as f:
        pickle.dump({"ema": {"weight": t}}, f, protocol=2)


def _torch_save(obj, path, legacy=False):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def stride0_state_dict(path):
    """A tiny-net state dict whose every tensor is a stride-0 view of a one-element storage, at 16x the
    preset's width: a few kilobytes on disk, ~90 MB once the network is built."""
    from fastdiff import nn as fnn

    with torch.device("meta"):
        net = fnn.build("tiny-16", model_channels=128)
    state = {k: torch.ones(1).expand(v.shape) if v.ndim else torch.ones([]) for k, v in net.state_dict().items()}
    _torch_save(state, path)


def overlapping_view(path):
    """One 100M-element tensor (400 MB) that is an overlapping view (stride 1, 1) of 20,000 floats."""
    base = torch.zeros(20_000)
    _torch_save({"w": base.as_strided((10_000, 10_000), (1, 1))}, path)


def zip_bomb(path):
    """A torch.save zip archive whose storage member deflates 48 KB into 48 MB of zeros."""
    numel = 12 << 20
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _zip_pickle(numel))
        zf.writestr("archive/byteorder", "little")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            chunk = bytes(1 << 20)
            for _ in range(numel * 4 >> 20):
                out.write(chunk)


class _PidPickler(pickle.Pickler):
    """Pickles ``_STORAGE`` placeholders as torch.save's persistent storage ids."""

    def __init__(self, f, pids, **kw):
        super().__init__(f, **kw)
        self.pids = pids

    def persistent_id(self, obj):
        return self.pids.get(id(obj))


def _zip_pickle(numel, size=None, stride=None):
    st = object()
    f = io.BytesIO()
    size = (numel,) if size is None else tuple(size)
    stride = (1,) * len(size) if stride is None else tuple(stride)
    t = _Reduce(torch._utils._rebuild_tensor_v2, (st, 0, size, stride, False, OrderedDict()))
    _PidPickler(f, {id(st): ("storage", FLOAT_STORAGE, "0", "cpu", numel)}, protocol=2).dump({"w": t})
    return f.getvalue()


def torch_zip(path, numel, data, size=None, stride=None, compression=zipfile.ZIP_STORED):
    """A torch.save-style zip archive: one float32 storage of ``numel`` elements holding ``data`` (bytes,
    whatever its length), and ``{"w": tensor}`` viewing it with ``size`` / ``stride``."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", _zip_pickle(numel, size, stride))
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", data, compress_type=compression)


def legacy_huge_storage(path):
    """A legacy torch.save stream whose storage claims 10^11 float32 elements (400 GB)."""
    numel = 10**11
    st = object()
    f = io.BytesIO()
    for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                              "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(x, f, protocol=2)
    t = _Reduce(torch._utils._rebuild_tensor_v2, (st, 0, (numel,), (1,), False, OrderedDict()))
    _PidPickler(f, {id(st): ("storage", FLOAT_STORAGE, "0", "cpu", numel)}, protocol=2).dump({"w": t})
    pickle.dump(["0"], f, protocol=2)
    f.write(struct.pack("<q", numel) + bytes(64))
    path.write_bytes(f.getvalue())


def binbytes8(path):
    """BINBYTES8 claiming 10^11 bytes, followed by 16."""
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 10**11) + bytes(16) + b".")


def binunicode8(path):
    path.write_bytes(b"\x80\x04\x8d" + struct.pack("<Q", 10**12) + b"a" * 16 + b".")


def bytearray8(path):
    path.write_bytes(b"\x80\x05\x96" + struct.pack("<Q", 10**11) + bytes(16) + b".")


def repeated_copies(path):
    """One 256 KB latin-1 string encoded to bytes 400 times (``_codecs.encode`` through the memo): 100 MB."""
    import codecs

    big = "x" * (256 << 10)
    items = [_Reduce(codecs.encode, (big, "latin1")) for _ in range(400)]
    with open(path, "wb") as f:
        pickle.dump({"ema": items}, f, protocol=2)


def shared_references(path):
    """Twenty levels of lists holding ten references to the level below: 10^20 nodes once expanded."""
    node = []
    for _ in range(20):
        node = [node] * 10
    with open(path, "wb") as f:
        pickle.dump({"ema": node}, f, protocol=4)


def network_bomb(path):
    """An official-format Precond record asking for a million blocks per level (nothing else in the file)."""
    meta = dict(type="class", version=6, module_src="", class_name="Precond",
                state=dict(_init_args=(), _init_kwargs=dict(img_resolution=64, img_channels=4, label_dim=0,
                                                            num_blocks=10**6, model_channels=256)))
    obj = _Reduce(_persistence_hook(), (meta,))
    with open(path, "wb") as f:
        pickle.dump({"ema": obj}, f, protocol=2)
    sys.modules.pop("torch_utils.persistence", None)
    sys.modules.pop("torch_utils", None)


def _persistence_hook():
    import types

    tu, tup = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    tup._reconstruct_persistent_obj = _reconstruct_persistent_obj
    tu.persistence = tup
    sys.modules.update({"torch_utils": tu, "torch_utils.persistence": tup})
    return _reconstruct_persistent_obj


def os_system(path):
    """The classic: a REDUCE of os.system (would create MARKER_FILE next to the file)."""
    marker = os.path.join(os.path.dirname(path), "MARKER_FILE")
    with open(path, "wb") as f:
        pickle.dump({"ema": _Reduce(os.system, (f"touch {marker}",))}, f, protocol=2)


_LIMIT = r"allocate more than|nested too deeply|expand to more than"
CASES = {
    "deep_dict_key": (deep_dict_key, r"nested too deeply"),
    "deep_frozenset": (deep_frozenset, r"nested too deeply"),
    "deep_set": (deep_set, r"nested too deeply"),
    "tensor_build": (tensor_build, r"BUILD.*never tensors"),
    "stride0_state_dict": (stride0_state_dict, r"allocate more than"),
    "overlapping_view": (overlapping_view, r"allocate more than"),
    "zip_bomb": (zip_bomb, r"allocate more than"),
    "legacy_huge_storage": (legacy_huge_storage, r"declares 400,000,000,000 bytes"),
    "binbytes8": (binbytes8, r"not a valid pickle.*bytes8"),
    "binunicode8": (binunicode8, r"not a valid pickle.*unicodestring8"),
    "bytearray8": (bytearray8, r"not a valid pickle.*bytearray8"),
    "repeated_copies": (repeated_copies, r"allocate more than"),
    "shared_references": (shared_references, r"expand to more than"),
    "network_bomb": (network_bomb, r"allocate more than"),
    "os_system": (os_system, r"'(posix|nt|os)\.system'.*allow-list"),
}
