"""fastdiff's network file format (``fastdiff.network/1``, fastdiff.io.network_file): one writer for
``save_network``, training's EMA snapshots and post-hoc EMA; the SHA-256 digest of the tensor data; dtype
and config checks on load; and every ``--net`` (generate, metrics gen) reading the same inputs."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastdiff.io import load_any_network, load_network, save_network
from fastdiff.io.network_file import DIGEST_KEY, META_KEY, read_network_tensors, tensor_digest

from conftest import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(net):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    with torch.no_grad():
        return net(x, torch.tensor([0.3, 4.0]), labels)


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _rewrite(path, tensors, config, digest=True):
    """Write ``tensors`` and ``config`` the way an outside tool would (with or without a digest)."""
    meta = {META_KEY: json.dumps(config)}
    if digest:
        meta[DIGEST_KEY] = tensor_digest(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


@pytest.fixture(scope="module")
def net():
    return tiny_net().eval()


# --- the digest -------------------------------------------------------------------------------------------------


def test_digest_is_written_and_checked(tmp_path, net):
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    meta = _meta(path)
    assert meta[DIGEST_KEY] == tensor_digest(net.state_dict()) and len(meta[DIGEST_KEY]) == 64
    assert torch.equal(_outputs(load_network(path)), _outputs(net))
    # one flipped bit in the last tensor byte of the file: refused, naming the file
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{bad}.*does not match the SHA-256 digest"):
        load_network(bad)
    with pytest.raises(ValueError, match="SHA-256"):
        load_any_network(bad)
    with pytest.raises(ValueError, match="SHA-256"):
        read_network_tensors(bad)


def test_digest_covers_names_dtypes_and_shapes():
    a = {"x": torch.arange(6, dtype=torch.float32)}
    assert tensor_digest(a) == tensor_digest({"x": torch.arange(6, dtype=torch.float32)})
    for other in ({"y": a["x"]}, {"x": a["x"].view(torch.int32)}, {"x": a["x"].view(2, 3)},
                  {"x": a["x"].clone().index_fill_(0, torch.tensor([5]), 7.0)}):
        assert tensor_digest(other) != tensor_digest(a)
    # non-contiguous input hashes as its contiguous copy
    t = torch.arange(12.0).view(3, 4)
    assert tensor_digest({"t": t.t()}) == tensor_digest({"t": t.t().contiguous()})


def test_file_without_digest_still_loads(tmp_path, net):
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    config = json.loads(_meta(path)[META_KEY])
    old = tmp_path / "old.safetensors"
    _rewrite(old, load_file(str(path)), config, digest=False)
    assert DIGEST_KEY not in _meta(old)
    assert torch.equal(_outputs(load_network(old)), _outputs(net))


def test_snapshots_and_phema_write_the_same_config_plus_the_digest(tmp_path, net):
    """Training's snapshots go through the one writer: the config is exactly what it was (format, class,
    kwargs, preset, fastdiff_version, extra), the digest is added, and post-hoc EMA output carries one too."""
    import fastdiff
    from fastdiff.training.phema import reconstruct_phema
    from fastdiff.training.snapshots import load_snapshot_tensors, save_snapshot, snapshot_name

    run = tmp_path / "run"
    for i, nimg in enumerate((64, 128)):
        extra = {"kind": "ema", "nimg": nimg, "step": i, "batch_size": 8, "std": 0.1, "exponent": 6.94}
        save_snapshot(net, run / snapshot_name(nimg, 0.1), extra)
    first = run / snapshot_name(64, 0.1)
    meta = _meta(first)
    assert json.loads(meta[META_KEY]) == {
        "format": "fastdiff.network/1", "class": "Precond", "kwargs": net.init_kwargs, "preset": "tiny-16",
        "fastdiff_version": fastdiff.__version__,
        "extra": {"kind": "ema", "nimg": 64, "step": 0, "batch_size": 8, "std": 0.1, "exponent": 6.94}}
    assert list(json.loads(meta[META_KEY])) == ["format", "class", "kwargs", "preset", "fastdiff_version", "extra"]
    assert meta[DIGEST_KEY] == tensor_digest(net.state_dict())
    assert set(load_snapshot_tensors(first)) == set(net.state_dict())

    (out,) = reconstruct_phema(run, [0.1], tmp_path / "phema", progress=False, verbose=False)
    pmeta = _meta(out)
    config = json.loads(pmeta[META_KEY])
    assert config["extra"]["kind"] == "phema" and config["kwargs"] == net.init_kwargs
    assert pmeta[DIGEST_KEY] == tensor_digest(load_file(out))
    back = load_network(out)  # digest verified
    assert torch.allclose(_outputs(back), _outputs(net), atol=1e-5)

    raw = bytearray(first.read_bytes())
    raw[-1] ^= 0x80
    first.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{first}.*SHA-256"):
        load_snapshot_tensors(first)


# --- dtypes and config keys -----------------------------------------------------------------------------------


def test_float16_tensor_in_a_float32_file_is_converted(tmp_path, net):
    """float16 where the network declares float32: converted (exactly), not left float16."""
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    config = json.loads(_meta(path)[META_KEY])
    tensors = load_file(str(path))
    name = "unet.enc.16x16_conv.weight"
    tensors[name] = tensors[name].half()
    mixed = tmp_path / "mixed.safetensors"
    _rewrite(mixed, tensors, config)
    back = load_network(mixed)
    assert all(t.dtype == torch.float32 for t in back.state_dict().values())
    assert torch.equal(back.state_dict()[name], tensors[name].float())
    # a narrowing (float64 in the file) or an integer tensor would change values: refused, naming the tensor
    for dtype in (torch.float64, torch.int32):
        t = dict(load_file(str(path)))
        t[name] = t[name].to(dtype)
        _rewrite(mixed, t, config)
        with pytest.raises(ValueError, match=rf"{name} is {str(dtype)[6:]} in the file but the network declares "
                                             "float32; refusing"):
            load_network(mixed)


def test_unknown_config_key_names_the_key_and_the_known_ones(tmp_path, net):
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    config = json.loads(_meta(path)[META_KEY])
    config["kwargs"]["fancy_new_option"] = 3
    bad = tmp_path / "newer.safetensors"
    _rewrite(bad, load_file(str(path)), config)
    with pytest.raises(ValueError, match=r"unknown config key 'fancy_new_option' for Precond.*known keys: "
                                         r"img_resolution, .*model_channels.*dropout"):
        load_network(bad)
    # a known key with a bad value: a clear error too, not a raw TypeError
    config["kwargs"].pop("fancy_new_option")
    config["kwargs"]["channel_mult"] = "abc"
    _rewrite(bad, load_file(str(path)), config)
    with pytest.raises(ValueError, match=rf"{bad}: cannot build Precond from the stored config"):
        load_network(bad)
    config["kwargs"]["channel_mult"] = [1, 2]
    config["kwargs"]["num_blocks"] = 10**6  # a tiny file asking for a huge network: refused while building
    _rewrite(bad, load_file(str(path)), config)
    with pytest.raises(ValueError, match=rf"{bad}: the stored config asks for a network far larger"):
        load_network(bad)
    config["kwargs"] = None
    _rewrite(bad, load_file(str(path)), config)
    with pytest.raises(ValueError, match="no constructor arguments"):
        load_network(bad)


# --- every --net reads the same inputs ---------------------------------------------------------------------------


class _Pool(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def test_metrics_gen_reads_official_pickles(tmp_path, capsys):
    """``fastdiff metrics gen --net x.pkl`` (it read only .safetensors before) gives what the converted file gives."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_edm2_pickle import rounded, write_official

    from fastdiff.cli import metrics as metrics_cli
    from fastdiff.metrics import ModuleDetector, compute_feature_stats, register_detector, unregister_detector

    small = tiny_net(model_channels=8, logvar_channels=8, use_fp16=False).eval()
    pkl = write_official(tmp_path / "net.pkl", small)
    save_network(rounded(small, torch.float16), tmp_path / "net.safetensors")
    register_detector("pool", lambda weights=None, device="cpu", batch_size=64:
                      ModuleDetector(_Pool(), "pool", 12, device=device, batch_size=batch_size), overwrite=True)
    try:
        real = (torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
        compute_feature_stats([real], ModuleDetector(_Pool(), "pool", 12), num=None,
                              progress=False).to_reference("pool").save(tmp_path / "ref.npz")
        values = []
        for src in (pkl, tmp_path / "net.safetensors"):
            parser = argparse.ArgumentParser()
            metrics_cli.add_arguments(parser)
            out = tmp_path / f"{src.suffix[1:]}.json"
            args = parser.parse_args(["gen", "--ref", str(tmp_path / "ref.npz"), "--net", str(src), "--steps", "2",
                                      "--batch", "4", "--seeds", "0-3", "--device", "cpu", "--no-progress",
                                      "--out", str(out)])
            assert metrics_cli.main(args) == 0, capsys.readouterr().err
            values.append(json.loads(out.read_text())["results"]["fd_pool"])
    finally:
        unregister_detector("pool")
    assert values[0] == values[1] and values[0] > 0
