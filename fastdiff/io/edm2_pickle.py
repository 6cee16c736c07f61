"""Import of the official EDM2 networks: an official network pickle (``.pkl``), a ``torch.save`` file or a
state dict becomes a ``fastdiff.nn`` module with the official parameter names.

The official pickles embed the Python source of their modules, which ``pickle.load`` would execute; here the
file is read by ``fastdiff.io.safe_pickle`` into inert records and the networks are rebuilt from the recorded
class names, constructor arguments and tensors (:func:`build_network`, every tensor checked), or inferred from
a bare state dict (:func:`infer_precond_kwargs`), under the reader's allocation budget. Entry points:
:func:`load_edm2_pickle` (the whole file) and :func:`load_edm2_network` (one network and the other entries).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import OrderedDict

import torch

from fastdiff.io.safe_pickle import (
    PersistentObject,
    PlainObject,
    SafePickleError,
    allocation_budget,
    charged_construction,
    read_plain,
    short_repr,
)

__all__ = [
    "load_edm2_pickle", "load_edm2_network", "build_network", "infer_precond_kwargs", "describe", "jsonable",
    "EDM2ImportError", "NETWORK_CLASSES",
]


class EDM2ImportError(SafePickleError):
    """The file is safe to read but does not describe a network fastdiff can rebuild exactly."""


@contextlib.contextmanager
def _import_errors(where):
    """Anything but the importer's own errors (a constructor rejecting a crafted value, arithmetic on
    inferred shapes...) becomes an :class:`EDM2ImportError` naming ``where``."""
    try:
        yield
    except (SafePickleError, FileNotFoundError):
        raise
    except RecursionError:
        raise EDM2ImportError(f"{where}: the pickle is nested too deeply") from None
    except Exception as exc:
        raise EDM2ImportError(f"{where}: cannot rebuild the network ({type(exc).__name__}: {short_repr(str(exc))})"
                              ) from None


def _budget(path, max_bytes):
    return allocation_budget(path, os.path.getsize(path), max_bytes)


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
    every parameter and buffer loaded from the record (exactly; float16 weights become float32).
    Its tensors are charged to the current allocation budget, if any (``fastdiff.io.safe_pickle``).

    The official release pickles its networks with NVIDIA's ``torch_utils.persistence``: every network object
    is stored as a call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the
    Python *source* of the defining module (``module_src``), the ``class_name`` and the object's ``state``
    (its ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, ``_init_args``, ``_init_kwargs`` and plain
    attributes). Loading such a file with ``pickle.load`` executes that source. Here the file is read by
    ``fastdiff.io.safe_pickle`` (an allow-list unpickler that runs nothing and bounds what a file can make it
    allocate) into inert :class:`PersistentObject` records; then:

    * the networks are rebuilt as ``fastdiff.nn`` modules from the recorded class name and constructor
      arguments, and their parameters and buffers are loaded from the recorded state tree, checking that
      every official tensor is consumed, every fastdiff tensor is supplied, shapes and plain attributes
      (heads, flavors, balances...) agree; any mismatch is an :class:`EDM2ImportError` naming the tensor;
    * a bare state dict (``torch.save(net.state_dict())``) gets its constructor arguments inferred from its
      names and shapes (:func:`infer_precond_kwargs`).

    Building the network is charged to the same allocation budget as reading the file (``max_bytes=``), so a
    small file cannot ask for a huge network either.
    """
    with _import_errors(where):
        return _build_network(obj, device, where)


def _build_network(obj, device, where):
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
        with charged_construction(), torch.device("meta"):
            net = cls(**kwargs)
    except SafePickleError:
        raise
    except Exception as exc:  # TypeError for an unknown argument, ValueError for a bad value...
        raise EDM2ImportError(f"{where}: {obj.class_name}({short_repr(kwargs)}) is not supported by fastdiff: "
                              f"{short_repr(str(exc))}") from None
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


def load_edm2_pickle(path, device="cpu", keys=None, max_bytes=None) -> dict:
    """Read an official EDM2 network pickle (``{'ema': Precond, 'loss_fn': ..., 'encoder': ...,
    'dataset_kwargs': ...}``) without running any code from it.

    Networks (the EDM2 classes) become ``fastdiff.nn`` modules in eval mode on ``device``; other persistent
    objects (the loss, the encoder) become ``{'class_name', 'init_args', 'init_kwargs', 'attributes'}`` dicts;
    ``EasyDict`` becomes ``dict``; NumPy arrays stay arrays. ``keys``: convert only these top-level entries
    (the others are left out). ``max_bytes``: what reading and building may allocate (default: a multiple
    of the file's size, ``fastdiff.io.safe_pickle``). Raises ``UnsafePickleError`` for anything outside
    the allow-list, :class:`EDM2ImportError` for a network that does not match fastdiff's, and other
    :class:`SafePickleError` subclasses for malformed or oversized files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with _budget(path, max_bytes), _import_errors(path):
        return _load_edm2_pickle(path, device, keys)


def _load_edm2_pickle(path, device, keys):
    raw = read_plain(path)
    if not isinstance(raw, dict):
        raise EDM2ImportError(f"{path}: expected a dict at the top level (like the official pickles), got "
                              f"{type(raw).__name__}")
    if keys is not None:
        missing = [k for k in keys if k not in raw]
        if missing:
            raise EDM2ImportError(f"{path}: no entry {short_repr(missing[0])}; the file has {describe(raw)}")
        raw = {k: raw[k] for k in keys}
    return {k: _convert_value(v, device, f"{path}[{short_repr(k)}]") for k, v in raw.items()}


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


def describe(data: dict, limit: int = 20) -> str:
    """``key (kind), ...`` for the (first ``limit``) top-level entries of a (raw or converted) file."""
    parts = []
    for k, v in list(data.items())[:limit]:
        if isinstance(v, PersistentObject):
            kind = v.class_name
        elif isinstance(v, torch.nn.Module):
            kind = type(v).__name__
        elif isinstance(v, dict) and "class_name" in v and "attributes" in v:
            kind = v["class_name"]
        else:
            kind = type(v).__name__
        parts.append(f"{short_repr(k)} ({short_repr(kind) if not isinstance(kind, str) else kind[:80]})")
    if len(data) > limit:
        parts.append(f"... {len(data) - limit} more")
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
    with charged_construction(), torch.device("meta"):
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


# --- one network from a pickle or torch.save file -------------------------------------------------------------


def load_edm2_network(path, device="cpu", key=None, max_bytes=None):
    """``(network, info)`` from an official EDM2 pickle or a ``torch.save`` file (see
    :func:`fastdiff.io.load_any_network`), under one allocation budget of ``max_bytes``."""
    with _budget(path, max_bytes), _import_errors(path):
        net, info = _network_and_info(path, device, key)
    if isinstance(net, torch.nn.Module):
        from fastdiff.io.network_file import check_finite_weights

        check_finite_weights(net.state_dict(), path)
    return net, info


def _network_and_info(path, device, key):
    raw = read_plain(path)
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
        where = f"{path}[{short_repr(k)}]"
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
                    info[other] = _convert_value(v, "cpu", f"{path}[{short_repr(other)}]")
                except EDM2ImportError:
                    info[other] = None
        net.source_entries = info  # e.g. the encoder record: fastdiff.data.latent.scaling_of(net)
        return net, info
    raise EDM2ImportError(f"{path}: no network under {' / '.join(map(repr, candidates))}; the file has {describe(raw)}")


def jsonable(value, depth=0):
    """A JSON-safe copy of plain data, e.g. a pickle's other entries for a network file's metadata (small
    arrays/tensors become lists; anything else is dropped)."""
    if depth > 8:
        return None
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = jsonable(v, depth + 1)
            if isinstance(k, str) and v is not None:
                out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    tolist = getattr(value, "tolist", None)
    size = getattr(value, "size", None)
    numel = size if isinstance(size, int) else getattr(value, "numel", lambda: None)()
    if callable(tolist) and isinstance(numel, int) and numel <= 64:
        return tolist()
    return None
