"""Command-line mistakes a new user makes end in one clear line, before any work, not in a traceback or a
silent default: output folders that cannot be folders, sizes of 0, images of mixed sizes for the metrics,
a negative guidance weight."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import run_cli

Image = pytest.importorskip("PIL.Image")

DATA = "builtin:shapes?n=8&seed=2"


def _train_argv(outdir, *extra):
    return ["--preset", "_standin:tiny", "--data", DATA, "--outdir", outdir, "--duration", 16, "--batch", 8,
            "--workers", 0, "--no-progress", "--device", "cpu", *extra]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("bad", ["file", "under-file", "proc"])
def test_output_folders_are_checked_before_any_work(tmp_path, a_file, capsys, monkeypatch, bad):
    from fastdiff.cli import generate, phema, train

    outdir = {"file": a_file, "under-file": a_file / "sub", "proc": "/proc/nope"}[bad]
    if bad == "proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    # No sampling / training / reconstruction may start: each would fail the test.
    def no_work(*a, **k):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr("fastdiff.cli.generate.run", no_work)
    monkeypatch.setattr("fastdiff.training.loop.training_loop", no_work)
    monkeypatch.setattr("fastdiff.cli.phema.reconstruct_phema", no_work)
    assert run_cli(generate, "--net", str(a_file), "--outdir", outdir, "--seeds", "0-1", "--device", "cpu") == 2
    assert run_cli(train, *_train_argv(outdir)) == 1
    assert run_cli(phema, "--indir", str(tmp_path), "--outstd", "0.1", "--outdir", outdir) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 3 and all("error: --outdir" in ln for ln in lines), err
    assert "Traceback" not in err
    want = "is a file, not a folder" if bad == "file" else "cannot create or write the folder"
    assert all(want in ln for ln in lines), err


@pytest.mark.parametrize("flag", ["--batch", "--duration"])
def test_train_refuses_zero_sizes(tmp_path, capsys, flag):
    from fastdiff.cli import train

    argv = _train_argv(tmp_path / "run")
    argv[argv.index(flag) + 1] = 0
    assert run_cli(train, *argv) == 1
    assert f"{flag} must be > 0, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_generate_refuses_a_negative_guidance_weight(tmp_path, capsys):
    from fastdiff.cli import generate

    assert run_cli(generate, "--net", "missing.safetensors", "--outdir", tmp_path, "--guidance-method", "cfg",
                   "--guidance", "-1") == 2
    assert "--guidance must be >= 0" in capsys.readouterr().err


# --- metrics calc: every image of one resolution, the reference's ------------------------------------------------


class _Pool(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def pool_detector():
    from fastdiff.metrics import ModuleDetector, register_detector, unregister_detector

    def factory(weights=None, device="cpu", batch_size=64):
        return ModuleDetector(_Pool(), "pool", 12, device=device, batch_size=batch_size)

    register_detector("pool", factory, overwrite=True)
    yield factory
    unregister_detector("pool")


def _pngs(folder, n, size, prefix="img"):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(size)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{prefix}{i:03d}.png"))


@pytest.mark.parametrize("workers", [0, 2])
def test_metrics_calc_refuses_images_of_other_sizes(tmp_path, pool_detector, capsys, workers):
    from fastdiff.cli import metrics
    from fastdiff.metrics import load_reference

    _pngs(tmp_path / "real", 6, (16, 16))
    common = ["--detector", "pool", "--num", "all", "--batch", "4", "--workers", workers, "--no-progress"]
    assert run_cli(metrics, "ref", "--data", tmp_path / "real", "--dest", tmp_path / "ref.npz", *common) == 0
    assert load_reference(tmp_path / "ref.npz").resolution == (16, 16)
    capsys.readouterr()
    # Mixed sizes in one folder (a grid and a plot beside the samples): named, one line, whatever the batching.
    _pngs(tmp_path / "mixed", 5, (16, 16))
    _pngs(tmp_path / "mixed", 1, (20, 36), prefix="plot")
    assert run_cli(metrics, "calc", "--images", tmp_path / "mixed", "--ref", tmp_path / "ref.npz", *common) == 1
    err = capsys.readouterr().err
    assert "'plot000.png' is 36x20" in err and "16x16" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    # All of one size, but not the reference's.
    _pngs(tmp_path / "small", 6, (8, 8))
    assert run_cli(metrics, "calc", "--images", tmp_path / "small", "--ref", tmp_path / "ref.npz", *common) == 1
    err = capsys.readouterr().err
    assert "is 8x8, the reference statistics' images 16x16" in err and "Traceback" not in err
    # An unreadable image from a worker: one line naming it.
    (tmp_path / "real" / "zz-broken.png").write_bytes(b"not a png")
    assert run_cli(metrics, "calc", "--images", tmp_path / "real", "--ref", tmp_path / "ref.npz", *common) == 1
    err = capsys.readouterr().err
    assert "zz-broken.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_output_folder_check_leaves_nothing_behind(tmp_path):
    from fastdiff.cli.common import prepare_outdir

    assert prepare_outdir(tmp_path / "a" / "b", create=False) == str(tmp_path / "a" / "b")
    assert os.listdir(tmp_path) == []
    prepare_outdir(tmp_path / "a" / "b")
    assert os.listdir(tmp_path / "a" / "b") == []


def test_phema_killed_mid_write_reruns_to_the_same_files(tmp_path, one_thread):
    """SIGKILL just before the second reconstruction gets its name: the rerun removes its temporary and writes
    the files an uninterrupted run writes, byte for byte."""
    from _killpoints import kill_at_replace, run_killed

    import fastdiff.nn as fnn
    from fastdiff._atomic import is_orphan_temp
    from fastdiff.cli import main
    from fastdiff.training.snapshots import save_snapshot, snapshot_name

    torch.manual_seed(0)
    net = fnn.build("tiny-16", model_channels=4, logvar_channels=4)
    for t, nimg in enumerate((64, 128)):
        for std in (0.05, 0.10):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            save_snapshot(net, tmp_path / "run" / snapshot_name(nimg, std),
                          dict(kind="ema", nimg=nimg, std=std, exponent=0.0, step=t, batch_size=64))
    argv = ["phema", "--indir", str(tmp_path / "run"), "--outstd", "0.06,0.08", "--no-progress"]
    assert main(argv + ["--outdir", str(tmp_path / "whole")]) == 0
    run_killed(argv + ["--outdir", str(tmp_path / "out")], kill_at_replace("phema-*", nth=2))
    assert len([f for f in os.listdir(tmp_path / "out") if is_orphan_temp(f)]) == 1
    assert main(argv + ["--outdir", str(tmp_path / "out")]) == 0
    names = sorted(os.listdir(tmp_path / "whole"))
    assert len(names) == 2 and sorted(os.listdir(tmp_path / "out")) == names
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
