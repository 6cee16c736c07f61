"""fastdiff.io.edm2_pickle (over the safe_pickle reader): official EDM2 network pickles read without running
any code from them.

The test pickles are written in the official FORMAT (torch_utils.persistence): every network object is a
REDUCE of the global ``torch_utils.persistence._reconstruct_persistent_obj`` with a ``meta`` dict (type,
version, module_src, class_name, state = the module's ``__dict__`` with ``_init_args``/``_init_kwargs``),
``torch.nn.ModuleDict`` is pickled the ordinary way, tensors as torch pickles them
(``_rebuild_parameter`` / ``_rebuild_tensor_v2`` / ``torch.storage._load_from_bytes``), the top level is a
``dnnlib.util.EasyDict(ema=..., loss_fn=..., encoder=..., dataset_kwargs=...)`` with float16 weights.
To let the Python pickler name those globals, fake ``torch_utils.persistence`` / ``dnnlib.util`` modules are
installed in ``sys.modules`` only while pickling; they are gone when fastdiff reads the files.
"""

from __future__ import annotations

import contextlib
import io
import copy
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastdiff import nn as fnn
from fastdiff.io import (
    EDM2ImportError,
    MalformedPickleError,
    SafePickleError,
    UnsafePickleError,
    load_any_network,
    load_edm2_pickle,
    load_network,
    save_network,
)
from fastdiff.io import safe_pickle

from conftest import run_cli, tiny_net


def tiny(**overrides):
    """A tiny-16 network with non-zero gains, in eval mode (a training-mode forward renormalizes weights)."""
    return tiny_net(**overrides).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test

MARK_ENV = "FASTDIFF_TEST_PICKLE_PAYLOAD_RAN"


# --- writing official-format pickles -------------------------------------------------------------------


def _never_called(*args, **kwargs):
    raise AssertionError("the fake persistence hook must never be called by fastdiff")


@contextlib.contextmanager
def official_globals(reconstruct=_never_called):
    """Fake ``torch_utils.persistence`` and ``dnnlib.util`` modules, so the pickler can reference
    ``torch_utils.persistence._reconstruct_persistent_obj`` and ``dnnlib.util.EasyDict`` by name."""
    tu, tup = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    dn, dnu = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        return reconstruct(meta)

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    tup._reconstruct_persistent_obj = _reconstruct_persistent_obj
    tu.persistence = tup

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dnu.EasyDict = EasyDict
    dn.util = dnu
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    sys.modules.update({"torch_utils": tu, "torch_utils.persistence": tup, "dnnlib": dn, "dnnlib.util": dnu})
    try:
        yield types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """Pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, like NVIDIA's decorator."""

    def __init__(self, class_name, state, module_src="# training/networks_edm2.py (stand-in)\n"):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


_OFFICIAL_ATTRS = {
    "Precond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data"),
    "UNet": ("label_balance", "concat_balance"),
    "Block": ("out_channels", "flavor", "resample_mode", "num_heads", "dropout", "res_balance", "attn_balance",
              "clip_act"),
    "MPConv": ("out_channels",),
    "MPFourier": (),
}


def _module_state(module, dtype, children, args, kwargs):
    """The ``__dict__`` an official module pickles: torch's bookkeeping, tensors, children, init args."""
    state = dict(torch.nn.Module().__dict__)
    state["training"] = False
    state["_parameters"] = {
        k: torch.nn.Parameter(v.detach().to(dtype).clone() if v.is_floating_point() else v.detach().clone(),
                              requires_grad=False)
        for k, v in module._parameters.items() if v is not None
    }
    state["_buffers"] = {k: v.detach().to(dtype).clone() for k, v in module._buffers.items()}
    state["_modules"] = children
    for attr in _OFFICIAL_ATTRS.get(type(module).__name__, ()):
        state[attr] = getattr(module, attr)
    if isinstance(module, fnn.Block):
        state["resample_filter"] = [1, 1]
    state["_init_args"], state["_init_kwargs"] = args, kwargs
    return state


def mirror(module, dtype, src, block_kwargs, unet_kwargs=None, top_kwargs=None):
    """The official object tree for a fastdiff module (Persistent records, a real ModuleDict)."""
    children = {}
    for name, child in module._modules.items():
        children[name] = None if child is None else mirror(child, dtype, src, block_kwargs, unet_kwargs)
    kind = type(module).__name__
    if isinstance(module, torch.nn.ModuleDict):
        md = torch.nn.ModuleDict()
        md.__dict__["_modules"] = children  # pickled the ordinary way: NEWOBJ ModuleDict + BUILD(state)
        return md
    if kind == "Precond":
        args, kwargs = (), dict(top_kwargs)
    elif kind == "UNet":
        args, kwargs = (), dict(unet_kwargs)
    elif kind == "Block":
        args = (module.in_channels, module.out_channels, module.emb_linear.weight.shape[1])
        kwargs = dict(flavor=module.flavor, resample_mode=module.resample_mode,
                      attention=module.num_heads > 0, **block_kwargs)
    elif kind == "MPConv":
        args, kwargs = (module.in_channels, module.out_channels), dict(kernel=list(module.kernel))
    else:
        args, kwargs = (module.num_channels,), {}
    return Persistent(kind, _module_state(module, dtype, children, args, kwargs), src)


def official_tree(net, dtype=torch.float16, src="# training/networks_edm2.py (stand-in)\n"):
    top = dict(net.init_kwargs)
    own = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
    unet_kwargs = {k: top[k] for k in ("img_resolution", "img_channels", "label_dim")}
    unet_kwargs.update({k: v for k, v in top.items() if k not in own})
    block_kwargs = {k: v for k, v in top.items() if k in ("dropout", "channels_per_head", "res_balance",
                                                          "attn_balance", "clip_act")}
    return mirror(net, dtype, src, block_kwargs, unet_kwargs, top)


def find(record, path):
    """The ``state`` dict of the record at the dotted ``path`` (``''`` = the root)."""
    node = record
    for part in [p for p in path.split(".") if p]:
        node = (node.meta["state"] if isinstance(node, Persistent) else node.__dict__)["_modules"][part]
    return node.meta["state"] if isinstance(node, Persistent) else node.__dict__


def write_official(path, net, dtype=torch.float16, src="# training/networks_edm2.py (stand-in)\n", edit=None,
                   extra=None, protocol=None):
    """An official-format snapshot pickle for ``net``; ``edit(ema_record)`` may tamper with the tree."""
    with official_globals() as g:
        ema = official_tree(net, dtype, src)
        if edit is not None:
            edit(ema)
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        encoder = Persistent("StabilityVAEEncoder", dict(
            _init_args=(), _init_kwargs={}, vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
            bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale, batch_size=8, _vae=None),
            "# training/encoders.py (stand-in)\n")
        loss = Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs=dict(P_mean=-0.4, P_std=1.0),
                                           P_mean=-0.4, P_std=1.0, sigma_data=0.5),
                          "# training/training_loop.py (stand-in)\n")
        data = g.EasyDict(encoder=encoder, dataset_kwargs=g.EasyDict(
            class_name="training.dataset.ImageFolderDataset", path="datasets/img512-sd.zip", use_labels=True,
            xflip=False, cache=True, resolution=np.int64(64), max_size=1281167), loss_fn=loss)
        data["ema"] = ema
        if extra:
            data.update(extra)
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    return path


def outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.3, 4.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float() if net.label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels), net(x, sigma, labels, return_logvar=True)[1]


def rounded(net, dtype):
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for t in list(ref.parameters()) + list(ref.buffers()):
            t.copy_(t.to(dtype).float())
    fnn.clear_weight_caches(ref)
    return ref


@pytest.fixture(scope="module")
def net():
    return tiny().eval()


@pytest.fixture(scope="module")
def official(net, tmp_path_factory):
    return write_official(tmp_path_factory.mktemp("official") / "edm2-tiny-0000001-0.100.pkl", net)


# --- (1) the import reproduces the network exactly -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("labels", ["cond", "uncond"])
def test_import_reproduces_network(tmp_path, dtype, labels):
    net = (tiny(label_dim=0) if labels == "uncond" else tiny()).eval()
    path = write_official(tmp_path / "net.pkl", net, dtype=dtype)
    data = load_edm2_pickle(path)
    assert set(data) == {"encoder", "dataset_kwargs", "loss_fn", "ema"}
    got = data["ema"]
    assert isinstance(got, fnn.Precond) and not got.training
    assert got.init_kwargs == net.init_kwargs
    ref = net if dtype == torch.float32 else rounded(net, dtype)
    for a, b in zip(outputs(got), outputs(ref)):
        assert torch.equal(a, b)
    assert all(p.dtype == torch.float32 for p in got.parameters())
    # The names match one to one.
    assert list(got.state_dict()) == list(net.state_dict())


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_other_pickle_protocols(tmp_path, net, protocol):
    got = load_edm2_pickle(write_official(tmp_path / "p.pkl", net, protocol=protocol), keys=["ema"])["ema"]
    assert torch.equal(outputs(got)[0], outputs(rounded(net, torch.float16))[0])


def test_non_network_entries_are_plain_data(official):
    data = load_edm2_pickle(official)
    assert type(data["dataset_kwargs"]) is dict and data["dataset_kwargs"]["use_labels"] is True
    assert data["dataset_kwargs"]["resolution"] == 64 and isinstance(data["dataset_kwargs"]["resolution"], np.integer)
    enc = data["encoder"]
    assert enc["class_name"] == "StabilityVAEEncoder" and enc["attributes"]["vae_name"] == "stabilityai/sd-vae-ft-mse"
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    assert isinstance(enc["attributes"]["scale"], np.ndarray) and np.array_equal(enc["attributes"]["scale"], scale)
    assert data["loss_fn"] == {"class_name": "EDM2Loss", "init_args": [], "init_kwargs": {"P_mean": -0.4, "P_std": 1.0},
                               "attributes": {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}}
    only = load_edm2_pickle(official, keys=["ema"])
    assert list(only) == ["ema"]
    with pytest.raises(EDM2ImportError, match="no entry 'nope'.*'ema' \\(Precond\\)"):
        load_edm2_pickle(official, keys=["nope"])


def test_real_torch_pickles_hold_only_allowed_globals(official, monkeypatch):
    """The globals a file written by the real pickler and torch asks for (including those inside the
    embedded storage streams): the persistence hook, torch's tensor rebuilders, EasyDict, ModuleDict..."""
    seen = set()
    original = safe_pickle.SafeUnpickler.find_class

    def recording(self, module, name):
        seen.add((module, name))
        return original(self, module, name)

    monkeypatch.setattr(safe_pickle.SafeUnpickler, "find_class", recording)
    load_edm2_pickle(official)
    assert {("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch.storage", "_load_from_bytes"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
            ("collections", "OrderedDict"), ("dnnlib.util", "EasyDict"), ("torch.nn.modules.container", "ModuleDict"),
            ("torch", "HalfStorage"), ("numpy", "dtype"), ("numpy", "ndarray")} <= seen
    assert seen <= set(safe_pickle.ALLOWED_GLOBALS)


# --- (2) embedded source is never executed ------------------------------------------------------------------


def _payload(marker):
    return (
        "import os\n"
        f"open({str(marker)!r}, 'w').write('the embedded module source ran')\n"
        f"os.environ[{MARK_ENV!r}] = '1'\n"
    )


def test_module_src_is_not_executed(tmp_path, net):
    marker = tmp_path / "marker.txt"
    path = write_official(tmp_path / "evil_src.pkl", net, dtype=torch.float32, src=_payload(marker))
    data = load_edm2_pickle(path)
    assert not marker.exists() and MARK_ENV not in os.environ
    for a, b in zip(outputs(data["ema"]), outputs(net)):
        assert torch.equal(a, b)
    raw = safe_pickle.read_plain(path)
    assert raw["ema"].module_src == _payload(marker)  # kept as text for inspection only

    # Control: the ordinary loading path (pickle.load + a persistence hook that runs module_src, as the
    # official torch_utils does) would have run the payload from this very file.
    def official_reconstruct(meta):
        exec(meta["module_src"], {})  # what torch_utils.persistence does with the embedded source
        return meta["class_name"]

    with official_globals(official_reconstruct):
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists() and os.environ.pop(MARK_ENV) == "1"


# --- (3) disallowed globals are refused, never called ------------------------------------------------------


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _shell(marker):
    return f"touch {marker}"


def _evil_cases(marker):
    py = f"open({str(marker)!r}, 'w').write('x')"
    return {
        "os.system": (Evil(os.system, _shell(marker)), os.system.__module__ + ".system"),
        "builtins.eval": (Evil(eval, py), "builtins.eval"),
        "builtins.exec": (Evil(exec, py), "builtins.exec"),
        "subprocess.Popen": (Evil(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
        "getattr": (Evil(getattr, "abc", "upper"), "builtins.getattr"),
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen", "getattr"])
@pytest.mark.parametrize("where", ["top", "hook", "attribute"])
def test_malicious_global_is_refused(tmp_path, net, case, where):
    marker = tmp_path / "pwned"
    evil, name = _evil_cases(marker)[case]
    if where == "top":
        path = write_official(tmp_path / "evil.pkl", net, extra={"ema_extra": evil})
    else:
        def edit(ema):
            state = find(ema, "unet.enc.16x16_block0")
            if where == "hook":
                state["_forward_hooks"][0] = evil
            else:
                state["res_balance"] = evil

        path = write_official(tmp_path / "evil.pkl", net, edit=edit)
    with pytest.raises(UnsafePickleError, match=f"'{name}'.*not on fastdiff's allow-list"):
        load_edm2_pickle(path)
    with pytest.raises(UnsafePickleError):
        load_any_network(path)
    assert not marker.exists()


def _legacy_storage_bytes(payload_obj):
    """What ``torch.storage._load_from_bytes`` receives (a legacy torch.save stream), with ``payload_obj``
    as its main object."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        safe_pickle.torch_files._LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    return head + pickle.dumps(payload_obj, protocol=2) + pickle.dumps([], protocol=2)


def test_malicious_storage_bytes_are_refused(tmp_path):
    import torch.storage

    marker = tmp_path / "pwned"
    blob = _legacy_storage_bytes(Evil(os.system, _shell(marker)))
    path = tmp_path / "evil_storage.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil(torch.storage._load_from_bytes, blob)}))
    with pytest.raises(UnsafePickleError, match="system"):
        load_edm2_pickle(path)
    assert not marker.exists()


def test_malicious_torch_save_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for legacy in (False, True):
        path = tmp_path / f"evil{int(legacy)}.pt"
        torch.save({"ema": Evil(os.system, _shell(marker))}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsafePickleError, match="system"):
            load_any_network(path)
    assert not marker.exists()


def test_stand_ins_cannot_be_tampered_with(tmp_path):
    """A BUILD on an allowed global (to patch it for later loads) is refused; nothing is changed."""
    state = b"}X\x0c\x00\x00\x00__defaults__K\x01\x85s"  # {'__defaults__': (1,)}
    slot_state = b"N" + state + b"\x86"  # (None, {...}): the setattr path
    defaults = safe_pickle.standins._rebuild_tensor.__defaults__
    for target in (b"ctorch._utils\n_rebuild_tensor_v2\n", b"cdnnlib.util\nEasyDict\n",
                   b"ctorch.nn.modules.container\nModuleDict\n", b"ccollections\nOrderedDict\n",
                   b"cnumpy\nndarray\n"):
        for st in (state, slot_state):
            path = tmp_path / "patch.pkl"
            path.write_bytes(b"\x80\x02" + target + st + b"b." )
            with pytest.raises(SafePickleError):
                load_edm2_pickle(path)
    assert safe_pickle.standins._rebuild_tensor.__defaults__ == defaults
    with pytest.raises(UnsafePickleError):
        safe_pickle.ALLOWED_GLOBALS[("dnnlib.util", "EasyDict")].__setstate__ = None
    with pytest.raises(UnsafePickleError):
        safe_pickle.ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")].x = 1


# --- (4) structural mismatches give clear errors ------------------------------------------------------------


def _drop_param(ema):
    del find(ema, "unet.enc.16x16_block0")["_parameters"]["emb_gain"]


def _extra_param(ema):
    find(ema, "unet.out_conv")["_parameters"]["bogus"] = torch.nn.Parameter(torch.zeros(3), requires_grad=False)


def _bad_shape(ema):
    find(ema, "logvar_linear")["_parameters"]["weight"] = torch.nn.Parameter(torch.zeros(1, 7), requires_grad=False)


def _rename(ema):
    ema.meta["class_name"] = "EDMPrecond"


def _rename_child(ema):
    ema.meta["state"]["_modules"]["unet"].meta["class_name"] = "SongUNet"


def _heads(ema):
    find(ema, "unet.enc.8x8_block0")["num_heads"] = 2


def _kwarg(ema):
    ema.meta["state"]["_init_kwargs"]["fancy_new_option"] = 3


def _filter(ema):
    ema.meta["state"]["_init_kwargs"]["resample_filter"] = [1, 3, 3, 1]


def _missing_buffer(ema):
    del find(ema, "unet.emb_fourier")["_buffers"]["phases"]


def _missing_module(ema):
    del find(ema, "unet.dec")["_modules"]["16x16_block1"]


@pytest.mark.parametrize("edit, message", [
    (_drop_param, r"missing parameter unet\.enc\.16x16_block0\.emb_gain"),
    (_extra_param, r"unknown parameter unet\.out_conv\.bogus \(3,\)"),
    (_bad_shape, r"parameter logvar_linear\.weight: shape \(1, 7\) in the file, \(1, 32\) expected"),
    (_rename, r"unknown network class 'EDMPrecond'"),
    (_rename_child, r"unet: the file has a SongUNet, fastdiff expects a UNet"),
    (_heads, r"unet\.enc\.8x8_block0: attribute num_heads is 2 in the file but 1"),
    (_kwarg, r"fancy_new_option"),
    (_filter, r"resample_filter=\[1, 3, 3, 1\] is not supported"),
    (_missing_buffer, r"missing buffer unet\.emb_fourier\.phases"),
    (_missing_module, r"missing submodule unet\.dec\.16x16_block1"),
])
def test_mismatch_errors(tmp_path, net, edit, message):
    path = write_official(tmp_path / "bad.pkl", net, edit=edit)
    with pytest.raises(EDM2ImportError, match=message):
        load_edm2_pickle(path)


def test_unknown_non_network_module_and_garbage(tmp_path, net):
    with official_globals():
        blob = pickle.dumps({"ema": Persistent("StyleGAN3Generator", dict(torch.nn.Module().__dict__))})
    (tmp_path / "sg.pkl").write_bytes(blob)
    with pytest.raises(EDM2ImportError, match="unknown network class 'StyleGAN3Generator'"):
        load_any_network(tmp_path / "sg.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MalformedPickleError, match="not a valid pickle"):
        load_edm2_pickle(tmp_path / "junk.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(EDM2ImportError, match="expected a dict"):
        load_edm2_pickle(tmp_path / "list.pkl")
    with pytest.raises(EDM2ImportError, match="'loss_fn'.*not a network"):
        load_any_network(write_official(tmp_path / "ok.pkl", net), key="loss_fn")


# --- torch.save files and state dicts ------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"label_dim": 0, "channel_mult_noise": 2}])
def test_torch_save_state_dict(tmp_path, legacy, overrides):
    net = tiny(**overrides).eval()
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    got = load_any_network(path)
    for a, b in zip(outputs(got), outputs(net)):
        assert torch.equal(a, b)
    torch.save({"net": net.state_dict(), "step": 5}, path)
    assert torch.equal(outputs(load_any_network(path))[0], outputs(net)[0])


def test_torch_save_of_official_objects(tmp_path, net):
    """A torch.save'd dict holding persistent objects (like an official training state) goes through the
    same allow-list, with storages read from the zip archive."""
    with official_globals():
        tree = official_tree(net, torch.float32)
        torch.save({"net": tree, "state": {"cur_nimg": 1024}}, tmp_path / "training-state-0000001.pt")
    got = load_any_network(tmp_path / "training-state-0000001.pt")
    assert torch.equal(outputs(got)[0], outputs(net)[0])


def test_safetensors_is_delegated(tmp_path, net):
    save_network(net, tmp_path / "n.safetensors")
    got = load_any_network(tmp_path / "n.safetensors")
    assert got.preset == "tiny-16" and torch.equal(outputs(got)[0], outputs(net)[0])


# --- (5) fastdiff convert --------------------------------------------------------------------------------------


def test_convert_round_trip(tmp_path, official, net, capsys):
    from fastdiff.cli import convert as cli

    out = tmp_path / "converted.safetensors"
    assert run_cli(cli, official, out) == 0
    back = load_network(out)
    ref = rounded(net, torch.float16)
    for a, b in zip(outputs(back), outputs(ref)):
        assert torch.equal(a, b)
    extra = back.checkpoint_extra
    assert extra["converted_from"] == os.path.basename(official)
    assert extra["source_entries"]["loss_fn"]["attributes"]["P_std"] == 1.0
    assert extra["source_entries"]["encoder"]["attributes"]["scale"] == pytest.approx(
        (np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])).tolist())
    assert "wrote" in capsys.readouterr().out

    assert run_cli(cli, official, "--list") == 0
    listing = capsys.readouterr().out
    assert "ema: Precond(img_resolution=16" in listing and "loss_fn: EDM2Loss" in listing

    assert run_cli(cli, official, tmp_path / "x.safetensors", "--key", "loss_fn") == 2
    assert "not a network" in capsys.readouterr().err
    evil = write_official(tmp_path / "evil.pkl", net, extra={"boom": Evil(os.system, "true")})
    assert run_cli(cli, evil, tmp_path / "y.safetensors") == 2
    assert "allow-list" in capsys.readouterr().err and not (tmp_path / "y.safetensors").exists()


# --- (6) fastdiff generate --net official.pkl ---------------------------------------------------------------


def test_generate_from_official_pickle(tmp_path, official, net):
    from fastdiff.cli import generate as cli

    save_network(rounded(net, torch.float16), tmp_path / "ref.safetensors")
    common = ["--seeds", "0-1", "--steps", "2", "--batch", "2", "--device", "cpu", "--no-progress"]
    assert run_cli(cli, "--net", official, "--outdir", tmp_path / "a", *common) == 0
    assert run_cli(cli, "--net", tmp_path / "ref.safetensors", "--outdir", tmp_path / "b", *common) == 0
    for seed in (0, 1):
        a = (tmp_path / "a" / f"{seed:06d}.png").read_bytes()
        assert a == (tmp_path / "b" / f"{seed:06d}.png").read_bytes()


# --- (7) what a file may make the reader allocate ------------------------------------------------------------


def test_honest_files_fit_the_default_budget_with_room(official):
    """An official float16 pickle uses about 4x its size (storages, views, the float32 network): well under
    the default of 8x."""
    with safe_pickle.allocation_budget(official, os.path.getsize(official)) as budget:
        load_edm2_pickle(official)
    assert 0 < budget.used < 0.6 * budget.max_bytes


def test_max_bytes_is_an_explicit_override(tmp_path, capsys):
    """A file whose stride-0 views are small on disk but big in memory: refused by default, loaded with
    ``max_bytes=`` / ``fastdiff convert --max-bytes``; a budget below what an honest file needs refuses it."""
    from fastdiff.cli import convert as cli

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in fnn.build("tiny-16").state_dict().items()}
    torch.save({k: torch.full([1] * len(s), 0.5).expand(s) for k, s in shapes.items()}, tmp_path / "x.pt")
    with pytest.raises(safe_pickle.PickleLimitError, match=r"allocate more than .*pass max_bytes="):
        load_any_network(tmp_path / "x.pt")
    got = load_any_network(tmp_path / "x.pt", max_bytes=64 << 20)
    assert all(torch.all(t == 0.5) for t in got.state_dict().values())
    assert run_cli(cli, tmp_path / "x.pt", tmp_path / "x.safetensors") == 2
    assert "--max-bytes" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert run_cli(cli, tmp_path / "x.pt", tmp_path / "x.safetensors", "--max-bytes", "64M") == 0
    assert torch.all(load_network(tmp_path / "x.safetensors").unet.out_conv.weight == 0.5)
    with pytest.raises(safe_pickle.PickleLimitError, match="more than 100 bytes.*raise max_bytes"):
        load_edm2_pickle(write_official(tmp_path / "o.pkl", tiny()), max_bytes=100)


def test_zip_members_and_views_are_checked(tmp_path):
    import zipfile

    from _crafted import torch_zip

    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    torch_zip(tmp_path / "ok.pt", 4, data, size=(2, 2), stride=(2, 1))
    assert torch.equal(safe_pickle.load_torch_file(tmp_path / "ok.pt")["w"], torch.arange(4.0).view(2, 2))
    torch_zip(tmp_path / "deflated.pt", 4, data, compression=zipfile.ZIP_DEFLATED)
    assert torch.equal(safe_pickle.load_torch_file(tmp_path / "deflated.pt")["w"], torch.arange(4.0))
    cases = {
        "past.pt": (dict(numel=4, data=data, size=(8,)), r"reach past its storage of 4 elements"),
        "offset.pt": (dict(numel=4, data=data, size=(2, 2), stride=(3, 1)), r"reach past its storage"),
        "short.pt": (dict(numel=4, data=data[:12]), r"declares 12 bytes, its record says 16"),
        "bzip2.pt": (dict(numel=4, data=data, compression=zipfile.ZIP_BZIP2), r"compression method 12"),
    }
    for name, (kw, message) in cases.items():
        torch_zip(tmp_path / name, **kw)
        with pytest.raises(MalformedPickleError, match=message):
            safe_pickle.load_torch_file(tmp_path / name)


def test_build_is_only_for_the_stand_ins_that_take_it(tmp_path, net):
    """Official files apply state to ModuleDict records, numpy arrays and dtypes (and torch's state dicts to
    OrderedDicts): all still load. A rebuilt tensor, a parameter or a plain dict never takes state."""
    from _crafted import tensor_build

    tensor_build(tmp_path / "t.pkl")
    with pytest.raises(UnsafePickleError, match=r"BUILD\) to a Tensor"):
        load_edm2_pickle(tmp_path / "t.pkl")
    for target in (b"}", b"]", b"ctorch._utils\n_rebuild_tensor_v2\n"):
        path = tmp_path / "b.pkl"
        path.write_bytes(b"\x80\x02" + target + b"}b.")
        with pytest.raises(UnsafePickleError, match="BUILD"):
            load_edm2_pickle(path)


def test_stack_and_memo_are_capped(monkeypatch):
    """The pre-pass bounds the unpickler's stack and memo (caps lowered here so the files stay small)."""
    monkeypatch.setattr(safe_pickle.scan, "MAX_STACK", 1000)
    monkeypatch.setattr(safe_pickle.scan, "MAX_MEMO", 1000)
    flood = b"\x80\x04" + b")" * 1001 + b"."
    with pytest.raises(safe_pickle.PickleLimitError, match="stack grows past 1,000 entries"):
        safe_pickle.read_pickle(io.BytesIO(flood))
    memo = b"\x80\x04]" + b"".join(b"r" + i.to_bytes(4, "little") for i in range(1001)) + b"."
    with pytest.raises(safe_pickle.PickleLimitError, match="memoizes more than 1,000 objects"):
        safe_pickle.read_pickle(io.BytesIO(memo))
    # within the caps: fine, and the pickler's own batching of a long list stays far below them
    assert safe_pickle.read_pickle(io.BytesIO(pickle.dumps(list(range(999)), protocol=4))) == list(range(999))
    assert safe_pickle.read_pickle(io.BytesIO(b"\x80\x04" + b")" * 999 + b"0" * 998 + b".")) == ()
