"""``torch.save`` files (zip and legacy format) and plain pickles read from disk through the restricted
unpickler: storages parsed from their bytes, zip members inflated in bounded chunks, never ``torch.load``."""

from __future__ import annotations

import io
import os
import struct
import zipfile

from fastdiff.io.safe_pickle.budget import allocation_budget, charge
from fastdiff.io.safe_pickle.errors import MalformedPickleError, UnsafePickleError, _r
from fastdiff.io.safe_pickle.standins import _element_size, _flat_from_bytes, _Marker, _Storage
from fastdiff.io.safe_pickle.unpickler import _guarded, _load_one, plain_tree

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


def read_plain(path, max_bytes=None):
    """:func:`read_file` then :func:`plain_tree`: the file's content as plain data and inert records."""
    path = os.fspath(path)
    with allocation_budget(path, os.path.getsize(path) if os.path.isfile(path) else 0, max_bytes):
        return plain_tree(read_file(path), path)
