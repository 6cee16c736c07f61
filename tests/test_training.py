"""The training loop on a tiny stand-in network: schedule, accumulation, non-finite gradients, mixed precision,
snapshots + post-hoc EMA, checkpoints, exact resume, and resume after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _standin import StandinLoss, StandinPrecond, tiny
from fastdiff.data import open_dataset
from fastdiff.training import TrainConfig, learning_rate_schedule, parse_nimg, training_loop
from fastdiff.training.training_state import find_checkpoints, load_checkpoint
from fastdiff.training.snapshots import list_snapshots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "builtin:shapes?n=48&seed=2"


def _cfg(**kw):
    base = dict(batch=16, duration=96, status=32, snapshot=32, checkpoint=48, lr=0.01, lr_decay=0, rampup_mimg=0,
                seed=1, workers=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _train(outdir, net=None, loss=None, data=DATA, **kw):
    net = net or tiny()["net"]
    ds = open_dataset(data, resolution=net.img_resolution, channels=net.img_channels)
    result = training_loop(net, loss or StandinLoss(), ds, str(outdir), _cfg(**kw))
    return net, result


def _final_state(outdir):
    nimg, path = find_checkpoints(outdir)[0]
    tensors, state = load_checkpoint(path)
    return nimg, tensors, state


def test_learning_rate_schedule():
    # alpha_ref / sqrt(max(t / t_ref, 1)) * min(nimg / rampup, 1), t = steps taken.
    assert learning_rate_schedule(0, 2048, 0.01, 70000, 10) == 0.0
    assert learning_rate_schedule(5_000_000, 2048, 0.01, 70000, 10) == pytest.approx(0.005)
    assert learning_rate_schedule(2048 * 70000, 2048, 0.01, 70000, 10) == pytest.approx(0.01)
    assert learning_rate_schedule(2048 * 280000, 2048, 0.01, 70000, 10) == pytest.approx(0.005)
    assert learning_rate_schedule(2048 * 10, 2048, 0.01, 0, 0) == 0.01
    assert parse_nimg("8Mi") == 8 << 20 and parse_nimg("64Ki") == 65536 and parse_nimg("2Gi") == 2 << 30
    assert parse_nimg("1.5K") == 1500 and parse_nimg(12) == 12 and parse_nimg("300") == 300
    with pytest.raises(ValueError):
        parse_nimg("8Xi")


def test_training_writes_stats_snapshots_checkpoints_and_phema(tmp_path):
    net, result = _train(tmp_path)
    assert result == {"nimg": 96, "step": 6, "stopped": False, "resumed_from": None}
    records = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert [r["nimg"] for r in records] == [0, 32, 64, 96]
    for r in records[1:]:
        assert math.isfinite(r["loss"]) and r["lr"] == 0.01 and r["grad_norm"] > 0 and r["img_per_s"] > 0
        assert r["nonfinite_grads"] == 0 and "cpu_peak_rss_gib" in r
    snaps = list_snapshots(tmp_path)
    assert [(s.nimg, s.std) for s in snaps] == [(n, s) for n in (32, 64, 96) for s in (0.05, 0.1)]
    assert snaps[0].config["extra"]["exponent"] == pytest.approx(16.97, abs=0.01)
    assert [n for n, _ in find_checkpoints(tmp_path)] == [96, 48]
    nimg, tensors, state = _final_state(tmp_path)
    assert state["step"] == 6 and state["sampler"]["position"] == 96
    for k, v in net.state_dict().items():
        torch.testing.assert_close(tensors[f"net.{k}"], v)
    assert any(k.startswith("optim.") for k in tensors) and any(k.startswith("ema.1.") for k in tensors)
    # Post-hoc EMA over this run's snapshots; reconstructing a tracked std gives (nearly) that EMA.
    from fastdiff.training.phema import reconstruct_phema
    from safetensors.torch import load_file

    paths = reconstruct_phema(tmp_path, [0.1, 0.07], tmp_path / "phema", progress=False, verbose=False)
    out = load_file(paths[0])
    ema = load_file(str(tmp_path / "network-snapshot-0000000096-0.100.safetensors"))
    for k in ema:
        torch.testing.assert_close(out[k], ema[k], rtol=1e-4, atol=1e-4)
    # Nothing left to do: a second call resumes at the end and returns at once.
    _, again = _train(tmp_path)
    assert again["nimg"] == 96 and again["resumed_from"].endswith("training-state-0000000096.json")


def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
    _train(tmp_path / "full", duration=96)
    _train(tmp_path / "split", duration=48)  # stops (and checkpoints) at 48
    _, result = _train(tmp_path / "split", duration=96, net=tiny(init_seed=123)["net"])  # other init: overwritten
    assert result["resumed_from"].endswith("training-state-0000000048.json")
    _, a, sa = _final_state(tmp_path / "full")
    _, b, sb = _final_state(tmp_path / "split")
    assert sa["step"] == sb["step"] == 6
    for k in a:
        if not k.startswith("rng."):
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
    la = [json.loads(x) for x in open(tmp_path / "full" / "stats.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "split" / "stats.jsonl")]
    assert la[-1]["loss"] == pytest.approx(lb[-1]["loss"], rel=1e-6)


class _DeterministicLoss(StandinLoss):
    """Noise and sigma fixed by the image content, so accumulation must not change the result."""

    def __call__(self, net, images, labels=None, generator=None):
        key = images.flatten(1).sum(1)
        sigma = (torch.sin(key * 12.9898).abs() * 2 + 0.1).reshape(-1, 1, 1, 1)
        noise = torch.cos(images * 78.233 + key.reshape(-1, 1, 1, 1)) * sigma
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        d, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (d - images) ** 2 + logvar


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    results = []
    for batch_gpu in (16, 8, 4):
        net, _ = _train(tmp_path / str(batch_gpu), loss=_DeterministicLoss(), batch_gpu=batch_gpu, duration=48,
                        ema_stds=())
        results.append(net.state_dict())
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="batch-gpu"):
        _train(tmp_path / "bad", batch_gpu=5)


class _NaNOnce(StandinLoss):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, net, images, labels=None, generator=None):
        self.calls += 1
        loss = super().__call__(net, images, labels, generator)
        if self.calls == 3:
            loss = loss * torch.tensor(float("nan"))
        return loss


def test_nonfinite_gradients_are_zeroed_and_counted(tmp_path):
    net, _ = _train(tmp_path, loss=_NaNOnce(), duration=64, checkpoint=0)
    records = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert sum(r["nonfinite_grads"] for r in records) == sum(p.numel() for p in net.parameters())
    assert records[-1]["nonfinite_grads_total"] > 0
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert math.isfinite(records[-1]["grad_norm"])


def test_bf16_autocast_keeps_float32_weights(tmp_path):
    net, result = _train(tmp_path, precision="bf16", duration=32, checkpoint=0, snapshot=0)
    assert result["nimg"] == 32 and all(p.dtype == torch.float32 for p in net.parameters())
    records = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert math.isfinite(records[-1]["loss"])


def test_conditioning_and_mismatches(tmp_path):
    # Unconditional network on labelled data: labels ignored; conditional network on unlabelled data: error.
    _, r = _train(tmp_path / "u", net=StandinPrecond(label_dim=0), duration=16, checkpoint=0, snapshot=0)
    assert r["nimg"] == 16
    unlabelled = open_dataset(DATA, 8, 3, use_labels=False)
    with pytest.raises(ValueError, match="no labels"):
        training_loop(StandinPrecond(), StandinLoss(), unlabelled, str(tmp_path / "c"), _cfg())
    wrong = open_dataset(DATA, 16, 3)
    with pytest.raises(ValueError, match="expects 3x8x8"):
        training_loop(StandinPrecond(), StandinLoss(), wrong, str(tmp_path / "w"), _cfg())
    _, r = _train(tmp_path / "nc", cond=False, duration=16, checkpoint=0, snapshot=0)
    assert r["nimg"] == 16


class _LabelRecorder(StandinLoss):
    """The stand-in loss, keeping the labels it is given (after any label dropout)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __call__(self, net, images, labels=None, generator=None):
        self.seen.append(None if labels is None else labels.detach().clone())
        return super().__call__(net, images, labels, generator)

    def labels(self):
        return torch.cat(self.seen)


def _record_labels(outdir, **kw):
    rec = _LabelRecorder()
    kw = {"checkpoint": 0, "snapshot": -1, "ema_stds": (), **kw}
    _train(outdir, loss=rec, **kw)
    return rec.labels()


def _expected_onehot(nimg, seed=1, batch=16):
    """The one-hot labels of the first ``nimg`` training images, in the loop's order (without dropout)."""
    from fastdiff.data import InfiniteSampler

    ds = open_dataset(DATA, 8, 3)
    sampler = InfiniteSampler(len(ds), batch, seed=seed)
    labels = torch.tensor([ds[sampler.global_index(g)][1] for g in range(nimg)])
    return torch.nn.functional.one_hot(labels, 10).to(torch.float32)


def test_label_dropout_replaces_a_fraction_p_of_the_labels_by_the_null_label(tmp_path):
    p, nimg = 0.3, 2048
    clean = _record_labels(tmp_path / "p0", duration=nimg, batch=64, status=nimg)
    torch.testing.assert_close(clean, _expected_onehot(nimg, batch=64), rtol=0, atol=0)  # p = 0: untouched
    seen = _record_labels(tmp_path / "p", duration=nimg, batch=64, status=nimg, label_dropout=p)
    assert seen.shape == clean.shape
    null = seen.sum(1) == 0
    assert torch.equal(seen[~null], clean[~null])  # the others keep their own label, whole
    # 2048 images: the standard deviation of the fraction is 0.010.
    assert abs(null.float().mean().item() - p) < 0.05, null.float().mean().item()
    # Spread over the micro-batches, not all in a few: every batch of 64 has some, none has all.
    per_batch = null.reshape(-1, 64).sum(1)
    assert per_batch.min() > 0 and per_batch.max() < 64
    assert len({tuple(m.tolist()) for m in null.reshape(-1, 64)}) > 1  # a fresh mask every step
    # Deterministic for a seed; another seed draws other masks (and another data order).
    again = _record_labels(tmp_path / "again", duration=nimg, batch=64, status=nimg, label_dropout=p)
    assert torch.equal(again, seen)
    other = _record_labels(tmp_path / "s2", duration=nimg, batch=64, status=nimg, label_dropout=p, seed=2)
    assert not torch.equal(other.sum(1) == 0, null)
    # Recorded in the run's options.
    options = json.loads((tmp_path / "p" / "training_options.json").read_text())
    assert options["config"]["label_dropout"] == p


def test_snapshots_record_the_label_dropout_and_phema_keeps_it(tmp_path):
    """The network files say whether CFG's null label was trained (fastdiff generate refuses it otherwise)."""
    from fastdiff.training.phema import reconstruct_phema
    from fastdiff.training.snapshots import read_snapshot_meta

    _train(tmp_path / "run", duration=64, batch=16, snapshot=32, checkpoint=0, ema_stds=(0.05, 0.10),
           label_dropout=0.2)
    snaps = list_snapshots(str(tmp_path / "run"))
    assert snaps and all(read_snapshot_meta(s.path)["extra"]["label_dropout"] == 0.2 for s in snaps)
    (path,) = reconstruct_phema(str(tmp_path / "run"), [0.07], str(tmp_path / "phema"), progress=False)
    assert read_snapshot_meta(path)["extra"]["label_dropout"] == 0.2


def test_label_dropout_masks_survive_a_resume(tmp_path):
    kw = {"label_dropout": 0.4, "batch_gpu": 8}  # two accumulation rounds per step
    full = _LabelRecorder()
    _train(tmp_path / "full", loss=full, duration=96, **kw)
    first, second = _LabelRecorder(), _LabelRecorder()
    _train(tmp_path / "split", loss=first, duration=48, **kw)  # checkpoints at 48
    _, result = _train(tmp_path / "split", loss=second, duration=96, **kw)
    assert result["resumed_from"].endswith("training-state-0000000048.json")
    assert torch.equal(torch.cat([first.labels(), second.labels()]), full.labels())
    null = full.labels().sum(1) == 0
    assert null.any()
    # Each micro-batch draws its own mask (seeded by its place in the global batch).
    rounds = null.reshape(-1, 2, 8)
    assert not torch.equal(rounds[:, 0], rounds[:, 1])
    _, a, _ = _final_state(tmp_path / "full")
    _, b, _ = _final_state(tmp_path / "split")
    for k in a:
        if not k.startswith("rng."):
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_label_dropout_rejects_bad_values_and_unconditional_runs(tmp_path):
    for bad in (1.0, 1.5, -0.1, float("nan"), "often"):
        with pytest.raises(ValueError, match="label_dropout"):
            _train(tmp_path / "bad", duration=16, label_dropout=bad)
    assert not (tmp_path / "bad").exists()  # rejected before anything is written
    with pytest.raises(ValueError, match="label_dropout.*label_dim 0"):
        _train(tmp_path / "u", net=StandinPrecond(label_dim=0), duration=16, label_dropout=0.1)
    with pytest.raises(ValueError, match="label_dropout.*cond=False"):
        _train(tmp_path / "nc", cond=False, duration=16, label_dropout=0.1)
    # p = 0 is fine on an unconditional run.
    _, r = _train(tmp_path / "u0", net=StandinPrecond(label_dim=0), duration=16, checkpoint=0, snapshot=0,
                  label_dropout=0.0)
    assert r["nimg"] == 16


def test_cli_label_dropout_reaches_the_config(tmp_path, monkeypatch, capsys):
    import argparse

    from fastdiff.cli import train as cli

    def parse(*extra):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        return parser.parse_args(["--preset", "_standin:tiny", "--data", DATA, "--outdir", str(tmp_path / "run"),
                                  "--duration", "32", "--batch", "16", "--workers", "0", "--no-progress",
                                  "--device", "cpu", *extra])

    assert cli.build_run(parse())[3].label_dropout == 0.0
    args = parse("--label-dropout", "0.2")
    assert cli.build_run(args)[3].label_dropout == 0.2
    assert cli.main(args) == 0
    options = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert options["config"]["label_dropout"] == 0.2
    for bad in ("1", "-0.5", "x"):
        with pytest.raises(SystemExit):
            parse("--label-dropout", bad)
    assert "--label-dropout" in capsys.readouterr().err
    # A module:function preset may set the default in its training options; the flag overrides it.
    def tiny_cfg(**overrides):
        made = tiny(**overrides)
        made["training"]["label_dropout"] = 0.15
        return made

    monkeypatch.setattr("_standin.tiny_cfg", tiny_cfg, raising=False)
    assert cli.build_run(parse("--preset", "_standin:tiny_cfg"))[3].label_dropout == 0.15
    assert cli.build_run(parse("--preset", "_standin:tiny_cfg", "--label-dropout", "0"))[3].label_dropout == 0.0
    # An unconditional run with label dropout: an error naming the option, no traceback.
    assert cli.main(parse("--uncond", "--label-dropout", "0.1", "--outdir", str(tmp_path / "u"))) == 1
    assert "label_dropout" in capsys.readouterr().err


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    _train(tmp_path, duration=96)
    weights = tmp_path / "training-state-0000000096.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, wrong checksum
    weights.write_bytes(bytes(data))
    (tmp_path / "training-state-0000000200.safetensors").write_bytes(b"orphan")  # no JSON: incomplete
    _, result = _train(tmp_path, duration=96)
    assert result["resumed_from"].endswith("training-state-0000000048.json")
    assert result["nimg"] == 96


def _cli_cmd(outdir, duration, extra=()):
    return [sys.executable, "-W", "ignore", "-m", "fastdiff.cli.train", "--preset", "_standin:tiny", "--data", DATA,
            "--outdir", str(outdir), "--duration", str(duration), "--batch", "16", "--status", "64",
            "--snapshot", "64", "--checkpoint", "32", "--seed", "1", "--workers", "0", "--no-progress",
            "--lr", "0.01", "--decay", "0", "--rampup", "0", *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1")
    return env


def test_sigkill_then_resume_loses_only_the_steps_since_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    duration = 4000  # far more than it will get to before the kill
    proc = subprocess.Popen(_cli_cmd(run, duration), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if len(find_checkpoints(run)) >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoints within 60 s")
        time.sleep(0.3)  # let it run on past the checkpoint (and maybe into the next one)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = find_checkpoints(run)[0][0]
    progress = [json.loads(x)["nimg"] for x in open(run / "stats.jsonl")]
    assert killed_at >= 96 and killed_at % 32 == 0
    # Resume to a fixed end point, through the CLI as a user would.
    end = killed_at + 64
    out = subprocess.run(_cli_cmd(run, end), env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {run / f'training-state-{killed_at:010d}.json'} at {killed_at} images" in out.stderr
    # Same end state as an uninterrupted run with the same seeds.
    ref = tmp_path / "ref"
    net = tiny()["net"]
    ds = open_dataset(DATA, 8, 3)
    training_loop(net, StandinLoss(), ds, str(ref),
                  _cfg(duration=end, status=64, snapshot=64, checkpoint=32, lr_decay=0.0))
    _, a, sa = _final_state(ref)
    _, b, sb = _final_state(run)
    assert sa["step"] == sb["step"] == end // 16
    for k in a:
        if not k.startswith("rng."):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # The stats log (every 64 images) reached the last status point at or before the newest checkpoint
    # (checkpoints come every 32, so the kill can fall between a checkpoint and the next status line).
    assert max(progress) >= killed_at // 64 * 64


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli_cmd(run, 100000, extra=("--checkpoint", "100000")), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "stats.jsonl").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped at" in err
    nimg = find_checkpoints(run)[0][0]
    assert nimg > 0 and nimg % 16 == 0
    assert not list_snapshots(run) or max(s.nimg for s in list_snapshots(run)) <= nimg


def test_cli_with_a_fastdiff_preset(tmp_path):
    fnn = pytest.importorskip("fastdiff.nn")
    if not hasattr(fnn, "build"):
        pytest.skip("fastdiff.nn has no presets yet (branch nn not merged)")
    import argparse

    from fastdiff.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny-16", "--data", "builtin:shapes?n=16", "--outdir", str(tmp_path),
                              "--duration", "8", "--batch", "4", "--workers", "0", "--no-progress",
                              "--device", "cpu"])
    assert cli.main(args) == 0
    from fastdiff.io import load_network

    net = load_network(str(tmp_path / "network-snapshot-0000000008-0.100.safetensors"))
    assert net.img_resolution == 16
    assert find_checkpoints(tmp_path)[0][0] == 8
