"""The VAE stage (fastdiff.vae, fastdiff.data.latent) on a tiny randomly initialized AutoencoderKL saved to a
temporary folder (nothing is downloaded): loading from folders and single files, the round trip, EDM2's
latent normalization against formulas re-derived here, determinism per seed, ``fastdiff dataset encode``
(labels, resume after SIGKILL), training on latent datasets, and ``fastdiff generate --vae``."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")

from fastdiff.data.latent import (OFFICIAL_SCALING, LatentScaling, encode_dataset, latent_name,  # noqa: E402
                                  sample_latents, scaling_of)
from fastdiff.vae import VAE, VAEError, load_vae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)


def _tiny_autoencoder(seed=0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**TINY)
    with torch.no_grad():  # a little larger weights than the default init, so the outputs vary visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    _tiny_autoencoder().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vae(vae_dir):
    return load_vae(vae_dir, batch_size=3)


def _images(n=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# --- the official encoder's formulas, re-derived ---------------------------------------------------------


def _official_constants():
    raw_mean = np.array([5.81, 3.25, 0.12, -2.15], dtype=np.float32)
    raw_std = np.array([4.17, 4.62, 3.71, 3.28], dtype=np.float32)
    scale = np.float32(0.5) / raw_std          # final_std / raw_std
    bias = np.float32(0.0) - raw_mean * scale  # final_mean - raw_mean * scale
    return scale, bias


def test_normalization_matches_the_official_formulas():
    scale, bias = _official_constants()
    assert np.array_equal(np.float32(OFFICIAL_SCALING.scale), scale)
    assert np.array_equal(np.float32(OFFICIAL_SCALING.bias), bias)
    assert OFFICIAL_SCALING.scale[0] == pytest.approx(0.5 / 4.17) and OFFICIAL_SCALING.bias[3] == pytest.approx(
        2.15 * 0.5 / 3.28)
    # A latent drawn from stored mean/std: (mean + n * std) * scale + bias, n from the generator.
    g = torch.Generator().manual_seed(3)
    mean_std = torch.cat([torch.randn(2, 4, 5, 5, generator=g) * 3, torch.rand(2, 4, 5, 5, generator=g) + 0.1], 1)
    got = sample_latents(mean_std, torch.Generator().manual_seed(11))
    n = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(11))
    s, b = torch.from_numpy(scale).reshape(1, 4, 1, 1), torch.from_numpy(bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(got, (mean_std[:, :4] + n * mean_std[:, 4:]) * s + b, rtol=1e-6, atol=1e-6)
    # Decoding inverts it.
    torch.testing.assert_close(OFFICIAL_SCALING.denormalize(got), mean_std[:, :4] + n * mean_std[:, 4:],
                               rtol=1e-5, atol=1e-5)
    # Other constants, and records as the importer parses them.
    other = LatentScaling.from_stats(raw_mean=[1, 2, 3, 4], raw_std=[2, 2, 2, 2], final_std=1.0)
    assert other.scale == (0.5,) * 4 and other.bias == (-0.5, -1.0, -1.5, -2.0)
    rec = {"class_name": "training.encoders.StabilityVAEEncoder", "init_kwargs": {"raw_std": [2, 2, 2, 2],
           "raw_mean": [1, 2, 3, 4], "final_std": 1.0}, "attributes": {}}
    assert LatentScaling.from_encoder_record(rec) == other
    rec["attributes"] = {"scale": scale, "bias": bias}  # stored attributes win
    assert LatentScaling.from_encoder_record(rec) == OFFICIAL_SCALING
    assert LatentScaling.from_encoder_record({"class_name": "training.encoders.StandardRGBEncoder"}) is None
    assert LatentScaling.from_encoder_record(OFFICIAL_SCALING.record()) == OFFICIAL_SCALING
    with pytest.raises(ValueError, match="unknown encoder class"):
        LatentScaling.from_encoder_record({"class_name": "evil.Encoder"})
    with pytest.raises(ValueError, match="1..64 numbers"):
        LatentScaling(scale=[1.0] * 1000, bias=[0.0] * 1000)
    with pytest.raises(ValueError, match="finite"):
        LatentScaling(scale=[float("nan")] * 4, bias=[0.0] * 4)
    with pytest.raises(ValueError, match=r"mean/std \[N, 8, H, W\]"):
        sample_latents(torch.zeros(1, 4, 2, 2))


def test_sampling_is_deterministic_per_seed():
    mean_std = torch.cat([torch.zeros(3, 4, 4, 4), torch.ones(3, 4, 4, 4)], 1)
    a = sample_latents(mean_std, torch.Generator().manual_seed(5))
    b = sample_latents(mean_std, torch.Generator().manual_seed(5))
    c = sample_latents(mean_std, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_an_imported_img512_pickle_knows_its_latent_scaling(tmp_path):
    """The official pickles' encoder record (as the importer parses it) gives the official constants."""
    from test_edm2_pickle import tiny, write_official
    from fastdiff.io.any_network import load_network_and_info

    pkl = write_official(tmp_path / "net.pkl", tiny(img_channels=4))
    net, info = load_network_and_info(pkl)
    assert scaling_of(net) == OFFICIAL_SCALING
    assert LatentScaling.from_encoder_record(info["encoder"]) == OFFICIAL_SCALING
    # ... and so does its conversion to a fastdiff file (the record is kept as JSON).
    from fastdiff.cli import convert
    from fastdiff.io import load_network

    assert _cli(convert, [pkl, tmp_path / "net.safetensors"]) == 0
    assert scaling_of(load_network(tmp_path / "net.safetensors")) == OFFICIAL_SCALING
    # A record whose channels are not the network's does not describe it (a 3-channel pixel network).
    pixels, _ = load_network_and_info(write_official(tmp_path / "pixels.pkl", tiny()))
    assert pixels.source_entries["encoder"] is not None and scaling_of(pixels) is None


# --- the VAE ----------------------------------------------------------------------------------------------------


def _ldm_state_dict(model):
    """The tiny VAE's weights renamed to the original LDM checkpoint naming (the sd-vae-ft-mse-original layout)."""
    n_up = len(model.config.up_block_types)
    out = {}
    for key, value in model.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample", k)
        k = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k)
        if "mid_block.attentions.0" in k:
            k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("group_norm", "norm")
            k = k.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if value.ndim == 2:
                value = value[:, :, None, None]  # 1x1 convolutions in the original code
        out[k] = value.contiguous()
    return out


def test_load_from_folders_and_single_files(tmp_path, vae_dir, vae, one_thread):
    from safetensors.torch import save_file

    x = _images(2)
    ref = vae.encode(x)
    pipeline = tmp_path / "sd-pipeline"
    _tiny_autoencoder().save_pretrained(pipeline / "vae")  # a Stable Diffusion pipeline folder
    model = _tiny_autoencoder()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "diffusers.safetensors")
    save_file(_ldm_state_dict(model), tmp_path / "ldm.safetensors")
    cfg = os.path.join(vae_dir, "config.json")
    for where, kw in [(pipeline, {}), (tmp_path / "diffusers.safetensors", {"config": cfg}),
                      (tmp_path / "ldm.safetensors", {"config": cfg})]:
        assert torch.equal(load_vae(where, **kw).encode(x), ref), where
    # The Stable Diffusion config is the default for single files: the tiny weights do not fit it.
    with pytest.raises(VAEError, match="do not fit"):
        load_vae(tmp_path / "diffusers.safetensors")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_vae("stabilityai/sd-vae-ft-mse")
    (tmp_path / "vae.ckpt").write_bytes(b"\x80\x04N.")
    with pytest.raises(VAEError, match="can run code"):
        load_vae(tmp_path / "vae.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="no config.json"):
        load_vae(tmp_path / "empty")


def test_round_trip_follows_the_official_encoder(vae, one_thread):
    x = _images(5)
    mean_std = vae.encode(x)
    assert vae.factor == 2 and mean_std.shape == (5, 8, 16, 16) and mean_std.dtype == torch.float32
    assert (mean_std[:, 4:] > 0).all()
    # The official encoder: pixels / 255 into the VAE, [posterior mean, posterior std].
    with torch.no_grad():
        dist = vae.model.encode(x.float() / 255).latent_dist
    torch.testing.assert_close(mean_std, torch.cat([dist.mean, dist.std], 1), rtol=1e-5, atol=1e-6)
    latents = vae.sample_latents(mean_std, torch.Generator().manual_seed(0))
    assert latents.shape == (5, 4, 16, 16)
    pixels = vae.decode(latents)
    assert pixels.shape == (5, 3, 32, 32) and pixels.dtype == torch.uint8
    # The official decoder: undo the scaling, VAE decoder, clamp(0, 1) * 255 truncated.
    scale, bias = (torch.from_numpy(c).reshape(1, 4, 1, 1) for c in _official_constants())
    with torch.no_grad():
        out = vae.model.decode((latents - bias) / scale).sample
    expected = out.clamp(0, 1).mul(255).to(torch.uint8)
    assert (pixels.int() - expected.int()).abs().max() <= 1  # float rounding at a truncation edge at most
    assert (pixels == expected).float().mean() > 0.99
    # Batching does not change the result (batch_size 3 vs one at a time, up to float rounding).
    one = VAE(vae.model, batch_size=1).encode(x)
    torch.testing.assert_close(one, mean_std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        vae.encode(x.float())
    with pytest.raises(ValueError, match="multiple of 2"):
        vae.encode(_images(1, size=31))
    with pytest.raises(ValueError, match=r"latents \[N, 4"):
        vae.decode(torch.zeros(1, 8, 4, 4))


# --- dataset encode -----------------------------------------------------------------------------------------------


def _image_folder(root, n=10, size=32):
    rng = np.random.default_rng(1)
    table = []
    for i in range(n):
        name = f"00000/img{i:08d}.png"
        (root / "00000").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        table.append([name, i % 4])
    (root / "dataset.json").write_text(json.dumps({"labels": table}))
    return table


def _zip_contents(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_encode_dataset_writes_the_official_layout_with_labels(tmp_path, vae, one_thread):
    from fastdiff.data import open_dataset

    table = _image_folder(tmp_path / "img")
    n = encode_dataset(tmp_path / "img", tmp_path / "lat.zip", vae, batch=3, chunk=4, progress=False)
    assert n == 10 and not (tmp_path / "lat.zip.partial").exists()
    files = _zip_contents(tmp_path / "lat.zip")
    assert sorted(files) == sorted([latent_name(i) for i in range(10)] + ["dataset.json"])
    assert latent_name(1234) == "00001/img-mean-std-00001234.npy"
    labels = json.loads(files["dataset.json"])["labels"]
    assert labels == [[latent_name(i), lab] for i, (_, lab) in enumerate(table)]
    src = open_dataset(str(tmp_path / "img"))
    x = torch.stack([src[i][0] for i in range(10)])
    stored = np.stack([np.load(io.BytesIO(files[latent_name(i)])) for i in range(10)])
    assert stored.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(stored), vae.encode(x), rtol=1e-5, atol=1e-5)
    ds = open_dataset(str(tmp_path / "lat.zip"))
    assert ds.is_latent and ds.num_channels == 8 and ds.resolution == 16 and ds.label_dim == 4
    # A folder destination holds the same files.
    encode_dataset(tmp_path / "img", tmp_path / "lat-dir", vae, batch=3, chunk=4, progress=False)
    assert (tmp_path / "lat-dir" / latent_name(7)).read_bytes() == files[latent_name(7)]
    with pytest.raises(FileExistsError):
        encode_dataset(tmp_path / "img", tmp_path / "lat.zip", vae, progress=False)


def test_encode_an_unlabelled_dataset(tmp_path, vae_dir, one_thread, capsys):
    """``dataset convert`` of a folder without classes writes ``{"labels": null}``; encoding it keeps that."""
    from fastdiff.cli import main
    from fastdiff.data import open_dataset

    rng = np.random.default_rng(2)
    (tmp_path / "src").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    assert main(["dataset", "convert", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "x.zip"),
                 "--no-progress"]) == 0
    assert main(["dataset", "encode", "--data", str(tmp_path / "x.zip"), "--vae", vae_dir, "--dest",
                 str(tmp_path / "lat.zip"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert json.loads(_zip_contents(tmp_path / "lat.zip")["dataset.json"]) == {"labels": None}
    lat = open_dataset(str(tmp_path / "lat.zip"))
    assert lat.is_latent and not lat.has_labels and len(lat) == 3 and lat.num_channels == 8


def _encode_cmd(src, dest, vae_dir, delay):
    # The CLI, with each VAE batch slowed down so that the run can be killed in the middle.
    code = ("import sys, time; import fastdiff.vae as v; enc = v.VAE.encode\n"
            f"v.VAE.encode = lambda self, x: (time.sleep({delay}), enc(self, x))[1]\n"
            "from fastdiff.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "dataset", "encode", "--data", str(src), "--vae", vae_dir, "--dest",
            str(dest), "--batch", "2", "--chunk", "2", "--device", "cpu", "--no-progress"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return env


def test_dataset_encode_resumes_after_sigkill(tmp_path, vae_dir, vae, one_thread, capsys):
    _image_folder(tmp_path / "img", n=10)
    dest = tmp_path / "lat.zip"
    work = tmp_path / "lat.zip.partial"
    proc = subprocess.Popen(_encode_cmd(tmp_path / "img", dest, vae_dir, 1.0), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300  # a guard against a hang, not a speed check (imports are slow under load)
        while not (work / "chunk-000001.zip").exists():  # two chunks of five written
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no chunk written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not dest.exists()
    (work / ".chunk-000002.zip.~fdtmp-abc123.tmp").write_bytes(b"PK")  # as a kill mid-write leaves one
    done_before = len(list(work.glob("chunk-*.zip")))
    assert 2 <= done_before < 5 and json.loads((work / "progress.json").read_text())["chunks_done"] <= done_before
    from fastdiff.cli import main

    assert main(_encode_cmd(tmp_path / "img", dest, vae_dir, 0)[3:]) == 0  # the same command, in this process
    out, err = capsys.readouterr()
    assert f"resuming at image {2 * done_before} of 10" in err and "wrote 10" in out
    assert not work.exists()
    # The same bytes as an uninterrupted run (one thread, the same batches).
    encode_dataset(tmp_path / "img", tmp_path / "full.zip", VAE(vae.model, batch_size=2), batch=2, chunk=2,
                   progress=False)
    assert _zip_contents(dest) == _zip_contents(tmp_path / "full.zip")
    # An unfinished encode with other settings is not continued.
    (tmp_path / "again.zip.partial").mkdir()
    record = {"format": "fastdiff.encode/1", "chunk": 3}
    (tmp_path / "again.zip.partial" / "progress.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="other settings .*chunk"):
        encode_dataset(tmp_path / "img", tmp_path / "again.zip", vae, batch=2, chunk=2, progress=False)


# --- training on a latent dataset ----------------------------------------------------------------------------


def _latent_folder(root, n=12, res=8):
    rng = np.random.default_rng(0)
    stored = []
    for i in range(n):
        arr = np.concatenate([rng.normal(0, 3, (4, res, res)), rng.uniform(0.1, 1.0, (4, res, res))]).astype(np.float32)
        (root / latent_name(i)).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / latent_name(i), arr)
        stored.append(arr)
    (root / "dataset.json").write_text(json.dumps({"labels": [[latent_name(i), i % 10] for i in range(n)]}))
    return torch.from_numpy(np.stack(stored))


def _train_latents(folder, outdir, duration):
    from _standin import StandinLoss, StandinPrecond

    from fastdiff.data import open_dataset
    from fastdiff.training import TrainConfig, training_loop

    class Recorder(StandinLoss):
        seen = []

        def __call__(self, net, images, labels=None, generator=None):
            self.seen.append(images.detach().clone())
            return super().__call__(net, images, labels, generator)

    torch.manual_seed(0)
    net = StandinPrecond(img_resolution=8, img_channels=4, label_dim=10)
    loss = Recorder()
    loss.seen = []
    cfg = TrainConfig(batch=4, duration=duration, status=12, snapshot=12, checkpoint=12, lr_decay=0, rampup_mimg=0,
                      seed=1, workers=0, progress=False, ema_stds=(0.1,))
    # As fastdiff train opens it: the network's 4 channels accept the stored 8 (mean/std).
    training_loop(net, loss, open_dataset(str(folder), resolution=8, channels=4), str(outdir), cfg)
    return torch.cat(loss.seen)


def test_training_draws_a_fresh_seeded_latent_each_time_an_image_is_used(tmp_path, one_thread):
    from fastdiff.data import InfiniteSampler
    from fastdiff.training.loop import _seed_of
    from fastdiff.training.snapshots import list_snapshots

    stored = _latent_folder(tmp_path / "lat")
    seen = _train_latents(tmp_path / "lat", tmp_path / "full", duration=24)
    assert seen.shape == (24, 4, 8, 8)
    order = [InfiniteSampler(12, 4, seed=1).global_index(g) for g in range(24)]
    # Step 0's micro-batch: EDM2's normalization of mean + n * std, n seeded by (seed, step, offset).
    first = sample_latents(stored[order[:4]], torch.Generator().manual_seed(_seed_of(1, 0, 0, 4)))
    torch.testing.assert_close(seen[:4], first, rtol=0, atol=0)
    # Each image is used twice in 24 draws, with a different latent each time.
    for i in range(12):
        uses = [g for g in range(24) if order[g] == i]
        assert len(uses) == 2 and not torch.allclose(seen[uses[0]], seen[uses[1]])
    # Resumed at 12 images: the same latents as the uninterrupted run.
    _train_latents(tmp_path / "lat", tmp_path / "split", duration=12)
    resumed = _train_latents(tmp_path / "lat", tmp_path / "split", duration=24)
    torch.testing.assert_close(resumed, seen[12:], rtol=0, atol=0)
    # The snapshots record the latent scaling, for decoding later.
    snap = list_snapshots(str(tmp_path / "full"))[-1]
    assert LatentScaling.from_encoder_record(snap.config["extra"]["encoder"]) == OFFICIAL_SCALING
    from fastdiff.training.phema import reconstruct_phema  # ... and post-hoc EMA keeps the record
    from fastdiff.training.snapshots import read_snapshot_meta

    (path,) = reconstruct_phema(str(tmp_path / "full"), [0.08], str(tmp_path / "phema"), progress=False, verbose=False)
    assert read_snapshot_meta(path)["extra"]["encoder"] == OFFICIAL_SCALING.record()


# --- generate --vae ------------------------------------------------------------------------------------------------


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def latent_net(tmp_path_factory):
    from fastdiff import nn as fnn
    from fastdiff.io import save_network

    torch.manual_seed(0)
    net = fnn.build("tiny-16", img_channels=4, model_channels=16)  # 4x16x16 latents = 32x32 pixels here
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    path = tmp_path_factory.mktemp("net") / "latent-net.safetensors"
    save_network(net, path, extra={"encoder": OFFICIAL_SCALING.record()})
    return str(path)


def test_generate_decodes_latents_to_pngs(tmp_path, latent_net, vae_dir, vae, one_thread, capsys):
    from fastdiff.cli import generate

    base = ["--net", latent_net, "--seeds", "0-4", "--steps", "2", "--batch", "2", "--device", "cpu", "--no-progress"]
    # Without --vae: .npy latents, and a note saying so.
    assert _cli(generate, base + ["--outdir", tmp_path / "lat"]) == 0
    assert "writing .npy latents" in capsys.readouterr().err
    latents = torch.stack([torch.from_numpy(np.load(tmp_path / "lat" / f"{s:06d}.npy")) for s in range(5)])
    assert latents.shape == (5, 4, 16, 16) and latents.dtype == torch.float32 and latents.std() > 0.1
    assert _cli(generate, base + ["--grid", tmp_path / "g.png"]) == 2
    assert "give --vae" in capsys.readouterr().err
    # With --vae: PNGs decoded in VAE batches of 3, and the grid.
    assert _cli(generate, base + ["--outdir", tmp_path / "png", "--grid", tmp_path / "grid.png", "--vae", vae_dir,
                                  "--vae-batch", "3", "--vae-device", "cpu"]) == 0
    pngs = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "png" / f"{s:06d}.png"))).permute(2, 0, 1)
                        for s in range(5)])
    assert pngs.shape == (5, 3, 32, 32) and pngs.float().std() > 1
    assert (pngs.int() - vae.decode(latents).int()).abs().max() <= 1  # the same seeds' latents, decoded
    assert Image.open(tmp_path / "grid.png").size == (3 * 32, 2 * 32)
    assert not list((tmp_path / "png").glob("*.npy"))
    assert _cli(generate, base + ["--outdir", tmp_path / "m", "--vae", tmp_path / "no-such-vae"]) == 2
    assert "never downloads" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the VAE's device is checked like --device
        assert _cli(generate, base + ["--outdir", tmp_path / "c", "--vae", vae_dir, "--vae-device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    # A pixel network with --vae is an error naming the channels.
    from fastdiff import nn as fnn
    from fastdiff.io import save_network

    save_network(fnn.build("tiny-16"), tmp_path / "pixels.safetensors")
    argv = ["--net", tmp_path / "pixels.safetensors", "--seeds", "0", "--steps", "1", "--outdir", tmp_path / "x",
            "--vae", vae_dir, "--device", "cpu", "--no-progress"]
    assert _cli(generate, argv) == 2
    assert "3 channels, not the 4 latent" in capsys.readouterr().err


def test_metrics_gen_decodes_with_the_vae(tmp_path, latent_net, vae_dir, vae, one_thread, capsys):
    from test_demo import Pool

    from fastdiff.cli import metrics
    from fastdiff.io import load_network
    from fastdiff.metrics import (ModuleDetector, calc_from_generator, compute_feature_stats, register_detector,
                                  unregister_detector)
    from fastdiff.sampling import generate_images

    register_detector("pool", lambda weights=None, device="cpu", batch_size=64: ModuleDetector(
        Pool(), "pool", 12, device=device, batch_size=batch_size), overwrite=True)
    try:
        real = (torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
        det = ModuleDetector(Pool(), "pool", 12)
        compute_feature_stats([real], det, num=None, progress=False).to_reference("pool").save(tmp_path / "ref.npz")
        argv = ["gen", "--ref", tmp_path / "ref.npz", "--net", latent_net, "--steps", "2", "--batch", "4",
                "--device", "cpu", "--no-progress", "--seeds", "0-5"]
        assert _cli(metrics, argv) == 1
        assert "give --vae" in capsys.readouterr().err
        assert _cli(metrics, argv + ["--vae", vae_dir, "--out", tmp_path / "m.json"]) == 0
        record = json.loads((tmp_path / "m.json").read_text())
        assert record["vae"] == vae_dir and record["results"]["fd_pool"] > 0
        net = load_network(latent_net)
        direct = calc_from_generator((b for _, b in generate_images(net, range(6), steps=2, batch=4,
                                                                    decoder=vae.decode)),
                                     str(tmp_path / "ref.npz"), num=6, progress=False)
        assert direct["fd_pool"] == pytest.approx(record["results"]["fd_pool"], rel=1e-4)
    finally:
        unregister_detector("pool")


@pytest.fixture(scope="module")
def encoded_whole(vae, tmp_path_factory):
    """The uninterrupted encode the killed ones are compared with (one thread, as the subprocesses run)."""
    root = tmp_path_factory.mktemp("whole")
    _image_folder(root / "img", n=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_dataset(root / "img", root / "full.zip", VAE(vae.model, batch_size=2), batch=2, chunk=2,
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("where", ["chunk", "join", "cleanup"])
def test_dataset_encode_resumes_from_each_kill_point(tmp_path, vae_dir, encoded_whole, one_thread, capsys,
                                                     where):
    """SIGKILL while a chunk gets its name, while the joined dataset does, and after that but before the work
    folder is removed: the same command then completes, leaves no temporary or work folder, and gives the
    uninterrupted run's bytes."""
    from _killpoints import kill_at_call, kill_at_replace, run_killed

    from fastdiff._atomic import is_orphan_temp
    from fastdiff.cli import main

    dest = tmp_path / "lat.zip"
    argv = ["dataset", "encode", "--data", str(encoded_whole / "img"), "--vae", vae_dir, "--dest", str(dest),
            "--batch", "2", "--chunk", "2", "--device", "cpu", "--workers", "0", "--no-progress"]
    patch = {"chunk": kill_at_replace("chunk-000001.zip"), "join": kill_at_replace("lat.zip"),
             "cleanup": kill_at_call("fastdiff.data.latent", "_remove_work")}[where]
    run_killed(argv, patch)
    assert dest.exists() == (where == "cleanup") and (tmp_path / "lat.zip.partial").is_dir()
    assert main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["lat.zip"]
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if is_orphan_temp(f)]
    assert _zip_contents(dest) == _zip_contents(encoded_whole / "full.zip")
    # A finished encode rerun is refused, as before.
    assert main(argv) == 1 and "exists" in capsys.readouterr().err


# --- crafted VAE folders: refused with one line, before anything large is allocated ------------------------------


def _vae_copy(vae_dir, dest, config=None, tensors=None):
    """A copy of the tiny VAE folder with its config.json and / or weights changed."""
    from safetensors.torch import load_file, save_file

    import shutil

    shutil.copytree(vae_dir, dest)
    if isinstance(config, str):
        (dest / "config.json").write_text(config)
    elif config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        cfg.update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        weights = dest / "diffusion_pytorch_model.safetensors"
        save_file(tensors(load_file(weights)), weights)
    return str(dest)


def test_a_vae_with_missing_or_nonfinite_weights_is_refused(tmp_path, vae_dir, capsys):
    def half(state):
        return {k: v for i, (k, v) in enumerate(sorted(state.items())) if i % 2 == 0}

    def poisoned(state):
        state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
        return state

    def extra(state):
        return dict(state, **{"encoder.surprise.weight": torch.zeros(2)})

    with pytest.raises(VAEError, match=r"tensors \d+ missing \(encoder\.") as info:
        load_vae(_vae_copy(vae_dir, tmp_path / "half", tensors=half))
    assert "and " in str(info.value) and "more" in str(info.value)
    with pytest.raises(VAEError, match=r"1 unexpected \(encoder.surprise.weight\)"):
        load_vae(_vae_copy(vae_dir, tmp_path / "extra", tensors=extra))
    with pytest.raises(VAEError, match="decoder.conv_out.weight holds 1 of .* not finite"):
        load_vae(_vae_copy(vae_dir, tmp_path / "nan", tensors=poisoned))
    # dataset encode says so and writes nothing.
    from fastdiff.cli import main

    _image_folder(tmp_path / "img", n=2)
    assert main(["dataset", "encode", "--data", str(tmp_path / "img"), "--vae", str(tmp_path / "half"), "--dest",
                 str(tmp_path / "lat.zip"), "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err and not (tmp_path / "lat.zip").exists()


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "UNet2DConditionModel"}, "_class_name is 'UNet2DConditionModel', not 'AutoencoderKL'"),
    ({"norm_num_groups": 0}, "norm_num_groups must be a positive integer, got 0"),
    ({"norm_num_groups": 3}, r"norm_num_groups \(3\) must divide every block_out_channels"),
    ({"block_out_channels": []}, "block_out_channels must be a non-empty list of positive integers"),
    ({"block_out_channels": None}, "block_out_channels must be a non-empty list"),
    ({"latent_channels": -4}, "latent_channels must be a positive integer"),
    ({"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types must list one block per"),
    # A config far larger than the weights: compared by shape before anything is built for real.
    ({"block_out_channels": [4096, 8192]}, (r"encoder.conv_in.weight is \[8, 3, 3, 3\] in the file, the config "
                                          r"makes \[4096, 3, 3, 3\]")),
    ('{"a": ' * 100000 + "1" + "}" * 100000, "nested too deeply"),
])
def test_a_bad_vae_config_is_one_clear_error(tmp_path, vae_dir, config, message):
    folder = _vae_copy(vae_dir, tmp_path / "vae", config=config)
    with pytest.raises(VAEError, match=message):
        load_vae(folder)


def test_single_files_are_checked_against_the_config_first(tmp_path, vae):
    from safetensors.torch import save_file

    big = dict(TINY, block_out_channels=[4096, 8192])
    ldm = tmp_path / "ldm.safetensors"
    save_file(_ldm_state_dict(vae.model), ldm)
    with pytest.raises(VAEError, match="makes .* parameters, but the file holds only"):
        load_vae(ldm, config=big)
    flat = tmp_path / "diffusers-names.safetensors"
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()}, flat)
    with pytest.raises(VAEError, match=r"is \[8, 3, 3, 3\] in the file, the config makes \[4096, 3, 3, 3\]"):
        load_vae(flat, config=big)
    with pytest.raises(VAEError, match="norm_num_groups must be a positive integer"):
        load_vae(flat, config=dict(TINY, norm_num_groups=0))
    assert load_vae(flat, config=dict(TINY)).latent_channels == 4
