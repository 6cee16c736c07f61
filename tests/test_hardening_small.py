"""Small hardening fixes: float64 gains keep their precision in the MP ops, in-place weight normalization
refuses integer tensors, labels of absent files are reported, network files are byte-reproducible."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err

from fastdiff import ops
from fastdiff.ops import reference as R


def test_a_python_float_gain_keeps_float64_precision():
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(6, 8, 3, 3, dtype=torch.float64)
    for ctx in (ops.use_reference(False), ops.use_reference(True)):
        with ctx:
            assert rel_err(ops.mp_conv(x, w, 0.1), R.mp_conv(x, w, 0.1)) < 1e-14
            assert rel_err(ops.mp_weight(w, 0.1), R.mp_weight(w, 0.1)) < 1e-14
            x2, w2 = x[:, :, 0, 0], w[:, :, 0, 0]
            assert rel_err(ops.mp_linear(x2, w2, 0.3), R.mp_conv(x2, w2, 0.3)) < 1e-14
    # float32 weights: the gain as float32, as before
    assert ops.mp_conv(x.float(), w.float(), 0.1).dtype == torch.float32


def test_weight_norm_in_place_refuses_integer_tensors():
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
        w = torch.arange(12).reshape(3, 4).to(dtype)
        before = w.clone()
        for ctx in (ops.use_reference(False), ops.use_reference(True)):
            with ctx, pytest.raises(RuntimeError, match="'w' to be a floating-point tensor"):
                ops.weight_norm_(w)
        with pytest.raises(RuntimeError, match="floating-point"):
            R.weight_norm_(w)
        assert torch.equal(w, before)


def test_network_files_are_byte_reproducible(tmp_path):
    """The safetensors metadata (config, digest) in sorted order: identical runs write identical bytes."""
    import fastdiff.nn as fnn
    from fastdiff.io import load_network, save_network

    torch.manual_seed(0)
    net = fnn.build("tiny-16", model_channels=4, logvar_channels=4)
    extra = {"z": 1, "a": [1, 2], "m": {"y": 0, "b": 1}}
    files = []
    for i in range(12):  # safetensors orders the metadata by a randomly seeded hash: 2^-11 to pass by chance
        save_network(net, tmp_path / f"{i}.safetensors", extra=extra)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    n = int.from_bytes(files[0][:8], "little")
    header = json.loads(files[0][8:8 + n])
    assert next(iter(header)) == "__metadata__" and list(header["__metadata__"]) == sorted(header["__metadata__"])
    loaded = load_network(tmp_path / "0.safetensors")
    assert loaded.checkpoint_extra == extra
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_labels_of_absent_files_are_reported_once(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from fastdiff.data import open_dataset
    from fastdiff.data.convert import convert_dataset

    src = tmp_path / "src"
    src.mkdir()
    table = []
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
        table.append([f"{i}.png", i])
    table += [["gone-1.png", 0], ["gone-2.png", 1]]
    (src / "dataset.json").write_text(json.dumps({"labels": table}))
    with pytest.warns(UserWarning, match=r"labels 2 file\(s\) that are not in the dataset \(e.g. 'gone-1.png'\)"
                      ) as caught:
        assert convert_dataset(str(src), str(tmp_path / "x.zip"), progress=False) == 3
    assert len([w for w in caught if "not in the dataset" in str(w.message)]) == 1
    # A dataset read with max_size uses a prefix of its files: the labels of the rest are expected, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_dataset(str(tmp_path / "x.zip"), max_size=2)) == 2


DEEP_JSON = '{"labels": ' + "[" * 100000 + "]" * 100000 + "}"


@pytest.mark.parametrize("key, value, message", [
    ("model_channels", -32, ("cannot build Precond from the stored config: model_channels must be an integer >= 1, "
                             "got -32")),
    ("channel_mult", [], "channel_mult must be a non-empty list of positive integers"),
    ("label_dim", -3, "label_dim must be an integer >= 0"),
    ("attn_resolutions", [-8], "attn_resolutions must be a list of positive integers"),
    ("dropout", 2, r"dropout must be a number in \[0, 1\)"),
    ("deep", None, "nested too deeply"),
])
def test_a_bad_network_config_is_one_clear_error(tmp_path, key, value, message):
    import fastdiff.nn as fnn
    from fastdiff.io import load_network, save_network
    from fastdiff.io.network_file import META_KEY, read_network_config, read_network_tensors, write_network_file

    save_network(fnn.build("tiny-16", model_channels=4, logvar_channels=4), tmp_path / "n.safetensors")
    tensors = read_network_tensors(tmp_path / "n.safetensors")
    if key == "deep":
        from safetensors.torch import save_file

        save_file(tensors, tmp_path / "m.safetensors", metadata={META_KEY: "[" * 100000 + "]" * 100000})
    else:
        config = read_network_config(tmp_path / "n.safetensors")
        config["kwargs"][key] = value
        write_network_file(tensors, tmp_path / "m.safetensors", config)
    with pytest.raises(ValueError, match=message):
        load_network(tmp_path / "m.safetensors")


def test_a_deeply_nested_dataset_json_is_one_clear_error(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from fastdiff.data import DatasetError, open_dataset
    from fastdiff.data.convert import convert_dataset

    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "dataset.json").write_text(DEEP_JSON)
    with pytest.raises(DatasetError, match="nested too deeply"):
        open_dataset(str(tmp_path / "src"))
    with pytest.raises(DatasetError, match="nested too deeply"):
        convert_dataset(str(tmp_path / "src"), str(tmp_path / "x.zip"), progress=False)
