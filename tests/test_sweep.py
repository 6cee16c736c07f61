"""``fastdiff sweep``: post-hoc EMA x guidance grid search on tiny networks with the digit classifier."""

import argparse
import json
import os

import numpy as np
import pytest
import torch

import fastdiff.nn as fnn
from fastdiff.experiments import sweep
from fastdiff.metrics import FeatureStats, get_detector
from fastdiff.metrics.classifier import DigitClassifier, load_classifier, save_classifier
from fastdiff.sampling import Autoguidance, Interval as GInterval, generate_images
from fastdiff.training.snapshots import save_snapshot, snapshot_name

SEEDS = list(range(4))
STEPS = 2


def _snapshots(folder, channels, seed):
    """EMA snapshot files as training writes them (4 times x 2 stds), from perturbed random networks."""
    torch.manual_seed(seed)
    net = fnn.build("tiny-16", model_channels=channels, logvar_channels=channels, img_channels=1, label_dim=10,
                    use_fp16=False)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    for t, nimg in enumerate((64, 128, 192, 256)):
        for std in (0.05, 0.10):
            with torch.no_grad():
                for k, p in net.state_dict().items():
                    if p.is_floating_point():
                        p.copy_(base[k] * (1 + 0.05 * t) + 0.01 * std * torch.randn_like(p))
            save_snapshot(net, os.path.join(folder, snapshot_name(nimg, std)),
                          dict(kind="ema", nimg=nimg, std=std, exponent=0.0, step=t, batch_size=64))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    main = _snapshots(str(root / "main"), 8, 0)
    guide = _snapshots(str(root / "guide"), 4, 1)
    torch.manual_seed(3)
    clf = DigitClassifier(1, 10, 16)
    save_classifier(clf, root / "classifier.safetensors")
    det = get_detector("classifier", weights=str(root / "classifier.safetensors"))
    real = (torch.rand(64, 1, 16, 16) * 255).to(torch.uint8)
    stats = FeatureStats()
    stats.update(det(real))
    ref = stats.to_reference("classifier")
    ref.save(root / "ref.npz")
    return dict(root=root, main=main, guide=guide, det=det, ref=ref)


def _spec():
    return sweep.SweepSpec(main_stds=[0.05, 0.1], guide_stds=[0.1], weights=[1, 2],
                           intervals=[None, sweep.IntervalSpec("sigma", 0.001, 10.0)])


def test_classifier_file_roundtrip_and_errors(setup, tmp_path):
    clf = load_classifier(setup["root"] / "classifier.safetensors")
    assert (clf.channels, clf.num_classes, clf.resolution) == (1, 10, 16)
    x = (torch.rand(3, 1, 16, 16) * 255).to(torch.uint8)
    torch.testing.assert_close(setup["det"](x), get_detector("classifier", weights=str(
        setup["root"] / "classifier.safetensors"))(x))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable classifier"):
        load_classifier(bad)
    with pytest.raises(FileNotFoundError, match="needs its weights"):
        get_detector("classifier")


def test_per_row_guidance_matches_one_setting_at_a_time(setup, tmp_path):
    """All settings in one batch = each setting through generate_images with the library's guidance."""
    from fastdiff.io import load_network

    paths = sweep.Networks("main", None, setup["main"], str(tmp_path), "cpu", False)
    paths.prepare([0.1])
    gpaths = sweep.Networks("guide", None, setup["guide"], str(tmp_path), "cpu", False)
    gpaths.prepare([0.1])
    net, gnet = load_network(paths.paths[0.1]).eval(), load_network(gpaths.paths[0.1]).eval()
    settings = [sweep.Cell(0.1, 0.1, 1.0, None), sweep.Cell(0.1, 0.1, 2.0, None),
                sweep.Cell(0.1, 0.1, 2.0, sweep.IntervalSpec("sigma", 0.001, 10.0)),
                sweep.Cell(0.1, 0.1, 1.5, sweep.IntervalSpec("steps", 0, 0))]
    got = {j: [] for j in range(len(settings))}
    counts = sweep.sample_settings(net, settings, SEEDS, gnet, steps=STEPS, batch=64, device="cpu",
                                   on_batch=lambda j, im: got[j].append(im))
    refs = [None, Autoguidance(2.0, gnet), GInterval(Autoguidance(2.0, gnet), sigma=(0.001, 10.0)),
            GInterval(Autoguidance(1.5, gnet), steps=(0, 0))]
    for j, g in enumerate(refs):
        want = torch.cat([im for _, im in generate_images(net, SEEDS, guidance=g, steps=STEPS, batch=64)])
        diff = (torch.cat(got[j]).int() - want.int()).abs()
        assert diff.max() <= 1, (j, diff.max())  # batch composition may flip a rounding
    # evaluations: the guide only where guided (w != 1, inside the interval)
    ev = [sweep.cell_evaluations(c, STEPS, len(SEEDS)) for c in settings]
    evals = 2 * STEPS - 1
    assert counts["main"] == sum(e["main"] for e in ev) == 4 * evals * len(SEEDS)
    assert counts["guide"] == sum(e["guide"] for e in ev)
    assert ev[0]["guide"] == 0 and ev[1]["guide"] == evals * len(SEEDS)
    assert 0 < ev[2]["guide"] < ev[1]["guide"] and ev[3]["guide"] == 2 * len(SEEDS)


def test_sweep_resumes_after_a_kill_and_splits_across_ranks(setup, tmp_path):
    kw = dict(detector=setup["det"], ref=setup["ref"], seeds=SEEDS, steps=STEPS, main_snapshots=setup["main"],
              guide_snapshots=setup["guide"], batch=64, progress=False)
    class Killed(Exception):
        pass

    seen = []

    def kill_after_two(rec):
        seen.append(rec["key"])
        if len(seen) == 2:
            raise Killed

    out = str(tmp_path / "killed")
    with pytest.raises(Killed):
        sweep.run_sweep(_spec(), out, on_cell=kill_after_two, **kw)
    assert len(sweep.load_cells(out)) == 2
    redone = []
    resumed = sweep.run_sweep(_spec(), out, on_cell=lambda r: redone.append(r["key"]), **kw)
    assert len(redone) == 4 and not set(redone) & set(seen)  # only the missing cells
    # 2 main stds x (w=1 shared + 2 guided settings) = 6 evaluated cells, 8 table rows
    assert len(resumed["rows"]) == 8 and len(os.listdir(os.path.join(out, "cells"))) == 6
    shared = [r for r in resumed["rows"] if r["shared_with"]]
    assert len(shared) == 4 and all(r["weight"] == 1 for r in shared)  # w = 1: one cell per main std
    assert resumed["best"]["value"] == min(r["value"] for r in resumed["rows"])
    assert len(os.listdir(os.path.join(out, "phema-main"))) == 2  # one reconstruction per std

    # two ranks (run one after the other here) share the cells without overlap, with the same values
    out2 = str(tmp_path / "ranks")
    parts = []
    for rank in (0, 1):
        sweep.run_sweep(_spec(), out2, rank=rank, world_size=2,
                        on_cell=lambda r, rank=rank: parts.append((rank, r["key"])), **kw)
    assert sorted(k for _, k in parts) == sorted(seen + redone) and {rk for rk, _ in parts} == {0, 1}
    by_key = {r["shared_with"] or r["key"]: r["value"] for r in resumed["rows"]}
    split = sweep.load_cells(out2)
    for key, rec in split.items():
        assert rec["value"] == pytest.approx(by_key[key], rel=1e-6)


def test_refine_adds_midpoints_around_the_best():
    spec = sweep.SweepSpec(main_stds=[0.05, 0.1, 0.2], guide_stds=[0.1], weights=[1, 2, 3],
                           intervals=[None])
    new = sweep.refine_axes(spec, sweep.Cell(0.1, 0.1, 2.0, None))
    assert new.main_stds == pytest.approx([np.sqrt(0.005), 0.1, np.sqrt(0.02)], rel=1e-3)
    assert new.weights == [1.5, 2.0, 2.5] and new.guide_stds == [0.1]
    edge = sweep.refine_axes(spec, sweep.Cell(0.05, 0.1, 3.0, None))
    assert edge.main_stds == pytest.approx([0.05, np.sqrt(0.005)], rel=1e-3) and edge.weights == [2.5, 3.0]


def _cli(*argv):
    from fastdiff.cli import sweep as cli

    p = argparse.ArgumentParser(prog="fastdiff sweep")
    cli.add_arguments(p)
    return cli.main(p.parse_args(list(argv)))


def test_sweep_cli_outputs_refine_and_generate_command(setup, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = _cli("--main-snapshots", setup["main"], "--main-stds", "0.05,0.1", "--guide-snapshots", setup["guide"],
              "--guide-stds", "0.1", "--weights", "1,2", "--intervals", "none;0.001,10", "--interval-steps", "1,1",
              "--ref", str(setup["root"] / "ref.npz"), "--detector-weights",
              str(setup["root"] / "classifier.safetensors"), "--seeds", "0-3", "--steps", str(STEPS),
              "--refine", "1", "--outdir", str(out), "--no-progress")
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["metric"] == "fd_classifier" and summary["num_images"] == 4
    best = summary["best"]
    assert best["value"] == min(r["value"] for r in summary["rows"])
    assert any(r["round"] == 1 for r in summary["rows"])  # the refinement evaluated new cells
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("main_std,guide_std,weight,interval,fd_classifier") and len(lines) == 1 + len(
        summary["rows"])
    cmd = [ln for ln in printed.splitlines() if ln.startswith("reproduce: ")][0]
    assert "fastdiff generate --net " in cmd and f"--steps {STEPS}" in cmd and "--seeds 0-3" in cmd
    main_path = cmd.split("--net ")[1].split()[0]
    assert os.path.isfile(main_path) and f"-{best['main_std']:.3f}" in main_path
    if best["weight"] != 1:
        assert f"--guidance {best['weight']:g}" in cmd and "--gnet " in cmd
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    maps = sorted(f for f in os.listdir(out) if f.startswith("heatmap-"))
    assert "heatmap-main_std-weight.png" in maps and "heatmap-weight-interval.png" in maps
    # a rerun finds every cell done
    assert _cli("--main-snapshots", setup["main"], "--main-stds", "0.05,0.1", "--guide-snapshots", setup["guide"],
                "--guide-stds", "0.1", "--weights", "1,2", "--intervals", "none;0.001,10", "--interval-steps", "1,1",
                "--ref", str(setup["root"] / "ref.npz"), "--detector-weights",
                str(setup["root"] / "classifier.safetensors"), "--seeds", "0-3", "--steps", str(STEPS),
                "--refine", "1", "--outdir", str(out), "--no-progress", "--no-plot") == 0
    assert json.loads((out / "sweep.json").read_text())["rows"] == summary["rows"]


def test_sweep_cli_errors(setup, capsys):
    ref = str(setup["root"] / "ref.npz")
    assert _cli("--ref", ref, "--seeds", "0-3") == 2
    assert "exactly one of --main-snapshots" in capsys.readouterr().err
    assert _cli("--ref", ref, "--main-snapshots", setup["main"]) == 2
    assert "needs --main-stds" in capsys.readouterr().err
    assert _cli("--ref", ref, "--main-snapshots", setup["main"], "--main-stds", "0.1", "--weights", "0.5") == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert _cli("--ref", ref, "--main-snapshots", setup["main"], "--main-stds", "0.1", "--intervals", "1") == 2
    assert "expected LO,HI" in capsys.readouterr().err


# --- hardening: diverged networks, kill points, output folder ---------------------------------------------------


def test_nonfinite_samples_fail_the_cell_and_name_the_seeds(setup, tmp_path, capsys):
    from test_generate_integrity import ElementwiseNet, _bad_seeds

    seeds = list(range(10))
    expected = _bad_seeds(seeds, 0.8)
    assert 0 < len(expected) < len(seeds)
    cells = [sweep.Cell(None, None, 1.0, None)]
    with pytest.raises(sweep.NonFiniteSamples, match=f"{len(expected)} of 10 samples of setting .* are not finite"
                       ) as info:
        sweep.sample_settings(ElementwiseNet(0.8), cells, seeds, steps=2, batch=4, device="cpu",
                              on_batch=lambda j, im: None)
    assert "seeds " + ", ".join(map(str, expected)) + ";" in str(info.value)
    got = []
    sweep.sample_settings(ElementwiseNet(), cells, seeds, steps=2, batch=4, device="cpu",
                          on_batch=lambda j, im: got.append(im))
    assert sum(len(g) for g in got) == 10
    # The CLI: a network file with NaN weights is refused before any sampling, naming the tensor.
    net = fnn.build("tiny-16", model_channels=8, logvar_channels=8, img_channels=1, label_dim=10)
    with torch.no_grad():
        next(p for p in net.parameters() if p.ndim > 1).fill_(float("nan"))
    from fastdiff.io import save_network

    save_network(net, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    assert _cli("--net", str(tmp_path / "nan.safetensors"), "--weights", "1", "--ref", str(setup["root"] / "ref.npz"),
                "--detector-weights", str(setup["root"] / "classifier.safetensors"), "--seeds", "0-3", "--steps",
                str(STEPS), "--outdir", str(out), "--no-progress") != 0
    err = capsys.readouterr().err
    assert "not finite" in err and "Traceback" not in err
    assert not (out / "sweep.csv").exists() and not os.listdir(out / "cells")


def _sweep_argv(setup, out):
    return ["sweep", "--main-snapshots", setup["main"], "--main-stds", "0.05,0.1", "--guide-snapshots",
            setup["guide"], "--guide-stds", "0.1", "--weights", "1,2", "--ref", str(setup["root"] / "ref.npz"),
            "--detector-weights", str(setup["root"] / "classifier.safetensors"), "--seeds", "0-3", "--steps",
            str(STEPS), "--outdir", str(out), "--no-progress", "--no-plot", "--device", "cpu"]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    from fastdiff.cli import main

    out = tmp_path_factory.mktemp("whole") / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess runs (OMP_NUM_THREADS=1): the same float sums
    try:
        assert main(_sweep_argv(setup, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "sweep.json").read_text())


@pytest.mark.parametrize("where", ["phema-main/*.safetensors", "*.json", "sweep.csv"])
def test_sweep_killed_mid_write_resumes_and_removes_the_temporary(setup, uninterrupted, tmp_path, where,
                                                                  one_thread):
    """SIGKILL just before a file gets its name (a reconstructed network, a cell, the table): the rerun of the
    same command removes the temporary left behind and ends with the uninterrupted run's results."""
    from _killpoints import kill_at_replace, run_killed

    from fastdiff._atomic import is_orphan_temp
    from fastdiff.cli import main

    out = tmp_path / "sweep"
    run_killed(_sweep_argv(setup, out), kill_at_replace(where.rsplit("/", 1)[-1]))

    def temporaries():
        return [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if is_orphan_temp(f)]

    assert len(temporaries()) == 1, sorted(os.walk(out))
    assert main(_sweep_argv(setup, out)) == 0
    assert temporaries() == []
    summary = json.loads((out / "sweep.json").read_text())
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "round"} for r in rows]

    assert [r["value"] for r in summary["rows"]] == [r["value"] for r in uninterrupted["rows"]]
    assert strip(summary["rows"]) == strip(uninterrupted["rows"]) and summary["best"] == uninterrupted["best"]


def test_sweep_outdir_must_be_a_folder(setup, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    argv = _sweep_argv(setup, tmp_path / "a-file")[1:]
    assert _cli(*argv) == 2
    err = capsys.readouterr().err
    assert "--outdir" in err and "is a file, not a folder" in err
