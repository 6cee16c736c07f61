"""fastdiff's network file format (``fastdiff.network/1``): one ``.safetensors`` file holding the weights (and
buffers) and, in its metadata, a JSON config (class name, constructor arguments, preset name, ``extra``) to
rebuild the network, plus a SHA-256 digest of the tensor data, checked on every read.

This module is the one writer and reader of the format: :func:`save_network`, :func:`write_network_file` (a
state dict and a config, as EMA snapshots are written), :func:`read_network_config`,
:func:`read_network_tensors` and :func:`load_network`. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os

import torch

from fastdiff._atomic import atomic_write

__all__ = ["save_network", "load_network", "read_network_config", "read_network_tensors", "write_network_file",
           "network_config", "tensor_digest", "check_finite_weights", "FORMAT", "META_KEY", "DIGEST_KEY",
           "atomic_write", "ALLOW_NONFINITE_ENV"]

FORMAT = "fastdiff.network/1"
META_KEY = "fastdiff"
DIGEST_KEY = "fastdiff.sha256"


def network_config(net: torch.nn.Module) -> dict:
    """The config stored with ``net``: ``{"format", "class", "kwargs", "preset", "fastdiff_version"}``
    (``kwargs`` is ``net.init_kwargs``, ``None`` for a module without constructor arguments on record)."""
    import fastdiff

    return {
        "format": FORMAT,
        "class": type(net).__name__,
        "kwargs": getattr(net, "init_kwargs", None),
        "preset": getattr(net, "preset", None),
        "fastdiff_version": fastdiff.__version__,
    }


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the tensors in name order: for each, its name, dtype and shape, then its bytes
    (contiguous, native order), so a flipped byte, a renamed tensor or a changed dtype changes the digest."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        h.update(json.dumps([name, str(t.dtype).replace("torch.", ""), list(tensors[name].shape)]).encode())
        h.update(b"\0")
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def write_network_file(tensors: dict[str, torch.Tensor], path, config: dict) -> None:
    """Write ``tensors`` with the JSON ``config`` (see :func:`network_config`) and their digest to ``path``,
    atomically.

    Metadata keys: ``"fastdiff"`` holds the JSON config ``{"format", "class", "kwargs", "preset",
    "fastdiff_version"[, "extra"]}``; ``"fastdiff.sha256"`` the hex SHA-256 of the tensors (see
    :func:`tensor_digest`), checked on every read (files written before the digest existed have none and still
    load). Writes go to a temporary file in the same folder that is then renamed over the target, so a crash
    never leaves a half-written file behind.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(config), DIGEST_KEY: tensor_digest(tensors)}

    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata(tmp)

    atomic_write(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` entries in sorted order.
    safetensors writes them in the order of a randomly seeded hash map, so that identical networks would give
    files that differ byte-wise; sorted, identical runs write identical files. The tensors' entries and data
    stay as they are (the header keeps its length, or is padded again to a multiple of 8)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
        ordered.update(header)
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # the same entries: the same length, in practice
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
            return
        f.seek(8 + n)
        data = f.read()
        text += b" " * (-len(text) % 8)
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()


def save_network(net: torch.nn.Module, path, extra: dict | None = None) -> None:
    """Write ``net`` (a ``fastdiff.nn.Precond``) to ``path`` as a single safetensors file.

    ``extra``: optional JSON-serializable information stored alongside (e.g. training step, EMA std).
    """
    config = network_config(net)
    if config["kwargs"] is None:
        raise TypeError(
            f"save_network: expected a fastdiff.nn.Precond (with init_kwargs), got {type(net).__name__}"
        )
    if extra is not None:
        config["extra"] = extra
    write_network_file(net.state_dict(), path, config)


def _metadata(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_network: no such file: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        hint = ""
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80" or head == b"PK":
            hint = " (it looks like a pickle / torch.save file; official EDM2 .pkl files need the pickle importer)"
        raise ValueError(f"load_network: {path} is not a safetensors file{hint}: {exc}") from None


def read_network_config(path) -> dict:
    """The JSON config stored in a fastdiff network file; a clear ``ValueError`` for any other file."""
    path = os.fspath(path)
    meta = _metadata(path)
    if META_KEY not in meta:
        raise ValueError(
            f"load_network: {path} is a safetensors file but not a fastdiff network file (no '{META_KEY}' "
            "config in its metadata); write one with fastdiff.io.save_network"
        )
    try:
        config = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_network: {path} has a corrupt fastdiff config: {exc}") from None
    except RecursionError:
        raise ValueError(f"load_network: {path}: the fastdiff config is JSON nested too deeply to be one") from None
    if not isinstance(config, dict) or not str(config.get("format", "")).startswith("fastdiff.network/"):
        got = config.get("format") if isinstance(config, dict) else config
        raise ValueError(f"load_network: {path}: unknown format {got!r}, expected {FORMAT}")
    return config


def read_network_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of a fastdiff network file, checked against the digest in its metadata (when it has one)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    meta = _metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors' own error types (truncated file, bad header...)
        raise ValueError(f"load_network: {path}: cannot read the tensors ({exc})") from None
    stored = meta.get(DIGEST_KEY)
    if stored is not None and tensor_digest(tensors) != stored:
        raise ValueError(
            f"load_network: {path}: the tensor data does not match the SHA-256 digest stored in the file "
            "(the file is corrupt or was modified after it was written)"
        )
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors


def _known_kwargs(cls) -> list[str]:
    """The constructor arguments ``cls`` accepts (``Precond`` passes the rest on to ``UNet``)."""
    from fastdiff import nn as fnn

    def named(c):
        return [p.name for p in inspect.signature(c.__init__).parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    known = named(cls)
    # Precond passes what it does not take to UNet, and UNet to every Block (which sets the rest itself).
    chain = {fnn.Precond: [fnn.UNet, fnn.Block], fnn.UNet: [fnn.Block]}.get(cls, [])
    set_by_unet = ("in_channels", "out_channels", "emb_channels", "flavor", "resample_mode", "attention")
    for inner in chain:
        known += [k for k in named(inner) if k not in known and not (inner is fnn.Block and k in set_by_unet)]
    return known


_EXACT_WIDENINGS = {(torch.float16, torch.float32), (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
                    (torch.bfloat16, torch.float64), (torch.float32, torch.float64)}


def _match_dtypes(path, state: dict, expected: dict) -> dict:
    """``state`` in the dtypes the rebuilt network declares. A tensor stored in a narrower float type than
    declared (float16 in a float32 network) is converted: the widening is exact, and leaving it float16 would
    silently change the network's arithmetic. Anything else (a narrowing, an integer/float mix) is refused,
    since converting would change the stored values."""
    out = {}
    for name, t in state.items():
        ref = expected.get(name)
        if ref is None or t.dtype == ref.dtype:
            out[name] = t
            continue
        exact = (t.dtype, ref.dtype) in _EXACT_WIDENINGS
        if not exact:
            raise ValueError(
                f"load_network: {path}: tensor {name} is {str(t.dtype).replace('torch.', '')} in the file but "
                f"the network declares {str(ref.dtype).replace('torch.', '')}; refusing a conversion that could "
                "change its values (only exact widenings such as float16 -> float32 are applied)"
            )
        out[name] = t.to(ref.dtype)
    return out


ALLOW_NONFINITE_ENV = "FASTDIFF_ALLOW_NONFINITE"


def check_finite_weights(tensors, path, allow_nonfinite: bool | None = None) -> None:
    """``ValueError`` naming the first tensor (in the order given) that holds NaN or Inf: a diverged network
    samples nothing but NaN, and every score of it would be meaningless. ``allow_nonfinite`` (default: the
    environment variable ``FASTDIFF_ALLOW_NONFINITE=1``, for every command line) lets them through, for
    debugging."""
    if allow_nonfinite is None:
        allow_nonfinite = os.environ.get(ALLOW_NONFINITE_ENV, "") not in ("", "0")
    if allow_nonfinite:
        return
    for name, t in (tensors.items() if isinstance(tensors, dict) else tensors):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"load_network: {path}: tensor {name} holds {bad} of {t.numel()} values that are not "
                             f"finite (NaN or Inf: the network diverged); set {ALLOW_NONFINITE_ENV}=1 to load it "
                             "anyway, for debugging")


_COUNTS = {"img_resolution": 1, "img_channels": 1, "model_channels": 1, "num_blocks": 1, "logvar_channels": 1,
           "label_dim": 0}  # constructor argument -> its least value


def check_network_kwargs(kwargs: dict, where: str, cls_name: str = "the network") -> None:
    """The sizes a stored config gives the network, checked before it is built: a ``model_channels`` of -32
    is one clear line, not an error from deep inside torch."""
    where = f"{where}: cannot build {cls_name} from the stored config:"

    def count(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and least <= v < 2**31

    for key, least in _COUNTS.items():
        if key in kwargs and not count(kwargs[key], least):
            raise ValueError(f"load_network: {where} {key} must be an integer >= {least}, got "
                             f"{kwargs[key]!r:.60}")
    for key, empty_ok in (("channel_mult", False), ("attn_resolutions", True)):
        v = kwargs.get(key)
        if key in kwargs and not (isinstance(v, (list, tuple)) and (v or empty_ok) and all(count(c, 1) for c in v)):
            raise ValueError(f"load_network: {where} {key} must be a {'' if empty_ok else 'non-empty '}list of "
                             f"positive integers, got {v!r:.60}")
    for key in ("dropout", "sigma_data"):
        v = kwargs.get(key)
        if key in kwargs and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not (0 <= v < 1 if key == "dropout" else v > 0)):
            raise ValueError(f"load_network: {where} {key} must be a number in "
                             f"{'[0, 1)' if key == 'dropout' else '(0, inf)'}, got {v!r:.60}")


def load_network(path, device="cpu", allow_nonfinite: bool | None = None):
    """Rebuild the network saved by ``save_network`` and load its weights (strict) onto ``device``.

    Returns a ``fastdiff.nn.Precond`` in eval mode; ``net.preset`` and ``net.checkpoint_extra`` are set
    from the file. Float16/bfloat16 tensors where the network declares float32 are converted (exactly);
    other dtype mismatches, an unknown config key, a digest mismatch, weights holding NaN or Inf (unless
    ``allow_nonfinite``, see :func:`check_finite_weights`) are ``ValueError`` naming the file.
    """
    from fastdiff import nn as fnn

    path = os.fspath(path)
    config = read_network_config(path)
    cls_name = config.get("class")
    cls = getattr(fnn, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"load_network: {path}: unknown network class {cls_name!r}")
    kwargs = config.get("kwargs")
    if not isinstance(kwargs, dict):
        raise ValueError(f"load_network: {path}: the config has no constructor arguments ('kwargs') for {cls_name}")
    known = _known_kwargs(cls)
    unknown = [k for k in kwargs if k not in known]
    if unknown:
        raise ValueError(
            f"load_network: {path}: unknown config key {unknown[0]!r} for {cls_name} (written by a newer or "
            f"modified fastdiff?); known keys: {', '.join(known)}"
        )
    check_network_kwargs(kwargs, path, cls_name)
    from fastdiff.io.safe_pickle import PickleLimitError, allocation_budget, charged_construction

    try:  # a config asking for a network far larger than the file's tensors is refused while it is built
        with allocation_budget(path, os.path.getsize(path)), charged_construction(), torch.device("meta"):
            net = cls(**kwargs)
    except PickleLimitError:
        raise ValueError(f"load_network: {path}: the stored config asks for a network far larger than the "
                         "tensors in the file") from None
    except (TypeError, ValueError, ArithmeticError, RuntimeError, LookupError) as exc:
        raise ValueError(f"load_network: {path}: cannot build {cls_name} from the stored config: {exc}") from None
    state = read_network_tensors(path)
    state = _match_dtypes(path, state, net.state_dict())
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"load_network: {path}: the weights do not match the stored config: {exc}") from None
    check_finite_weights(net.state_dict(), path, allow_nonfinite)
    net.preset = config.get("preset")
    net.checkpoint_extra = config.get("extra")
    return net.to(device).eval()
