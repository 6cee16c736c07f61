"""``fastdiff demo`` end to end (--fast), its pieces, and ``fastdiff metrics gen`` on a tiny network file."""

import argparse
import json
import os

import pytest
import torch

from fastdiff.cli import demo
from fastdiff.experiments import demo as demo_lib
from fastdiff.metrics import ModuleDetector, compute_feature_stats, register_detector, unregister_detector
from fastdiff.cli import metrics as metrics_cli

from conftest import run_cli


def _demo_args(*argv):
    parser = argparse.ArgumentParser(prog="fastdiff demo")
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(_demo_args("--fast", "--outdir", str(out), "--no-progress", "--data", "builtin:digits")) == 0
    results = json.loads((out / "results.json").read_text())
    keys = [s["key"] for s in results["settings"]]
    assert keys == ["none", "cfg-w2", "autoguidance-w2", "autoguidance-interval-w2"]
    for s in results["settings"]:
        assert (out / s["grid"]).is_file()
        assert min(s["fd_classifier"], s["fd_half_a"], s["fd_half_b"]) >= 0 and 0 <= s["accuracy"] <= 1
        assert "fid" not in s  # --fid auto on the CPU: not computed, and said so
    assert results["metric"]["fid_note"]
    assert results["real"]["num_images"] == results["sampler"]["num_images"] == 24
    assert results["sampler"]["halves"] == ["0-11", "12-23"]
    assert results["main"]["label_dropout"] == 0.1 and results["guide"]["params"] < results["main"]["params"]
    # The main model trains with the loop's label dropout (CFG's null label); the guide without.
    for run, p in (("main", 0.1), ("guide", 0.0)):
        options = json.loads((out / "train" / run / "training_options.json").read_text())
        assert options["config"]["label_dropout"] == p and options["loss"].startswith("EDM2Loss"), options
    # Network evaluations per image: Heun 3 steps = 5 per network; the guide only where it guides.
    ev = {s["key"]: (s["evaluations_main"], s["evaluations_guide"]) for s in results["settings"]}
    assert ev["none"] == (5, 0) and ev["cfg-w2"] == (5, 5) and ev["autoguidance-w2"] == (5, 5)
    assert 0 < ev["autoguidance-interval-w2"][1] < 5
    # The EMA lengths come from post-hoc EMA reconstructions of the training snapshots.
    sel = results["ema_selection"]
    assert sel["main_std"] == 0.1 and sel["guide_std"] == 0.1
    assert os.path.isfile(sel["main_net"]) and os.path.isfile(sel["guide_net"])
    # The classifier and the reference are files `fastdiff sweep` can use (the registered detector).
    from fastdiff.metrics import get_detector, load_reference

    det = get_detector("classifier", weights=str(out / "classifier.safetensors"))
    assert load_reference(out / "ref-classifier.npz").detector == det.name == "classifier"
    for c in results["comparisons"]:
        assert c["verdict"] in ("better", "worse", "within the seed-to-seed spread")
    assert (out / "overview.png").is_file()
    report = (out / "report.md").read_text()
    assert "FD (classifier features)" in report and "not FID" in report and "autoguidance + interval" in report
    assert "s CPU" in report and "load average" in report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert results["plot"] is None and "matplotlib" in results["plot_error"]
    else:
        assert results["plot"] == "metrics.png" and (out / "metrics.png").is_file()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temporaries
    printed = capsys.readouterr().out
    assert "| no guidance | 1 |" in printed and "wrote" in printed

    # A rerun resumes the finished training runs and the finished EMA selection instead of redoing them.
    assert demo.main(_demo_args("--fast", "--outdir", str(out), "--no-progress", "--no-plot",
                                "--data", "builtin:digits")) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["main"]["resumed_from"] and again["settings"][0]["fd_classifier"] == pytest.approx(
        results["settings"][0]["fd_classifier"], rel=1e-6)
    assert again["metric"]["classifier_heldout_accuracy"] == results["metric"]["classifier_heldout_accuracy"]


def test_demo_verdicts_need_both_seed_halves():
    def row(key, method, w, fd, a, b):
        return dict(key=key, method=method, weight=w, fd_classifier=fd, fd_half_a=a, fd_half_b=b)

    results = dict(settings=[row("none", "none", 1, 10.0, 11.0, 12.0), row("cfg-w2", "CFG", 2, 9.0, 10.0, 12.5),
                             row("autoguidance-w2", "autoguidance", 2, 8.0, 9.0, 10.0),
                             row("autoguidance-interval-w2", "autoguidance+interval", 2, 12.0, 13.0, 14.0)])
    got = {(c["a"], c["b"]): c["verdict"] for c in demo_lib.comparisons(results)}
    assert got[("CFG", "none")] == "within the seed-to-seed spread"  # lower overall, higher on half B
    assert got[("autoguidance", "none")] == "better" and got[("autoguidance", "CFG")] == "better"
    assert got[("autoguidance+interval", "none")] == "worse"


def test_demo_registered_in_cli():
    from fastdiff import cli

    assert cli.SUBCOMMANDS["demo"][0] == "fastdiff.cli.demo"


def test_labels_for_seeds_match_generate_images():
    """The demo scores each sample against the class generate_images drew for its seed."""
    from fastdiff.sampling import generate_images

    seen = []

    class Recorder(torch.nn.Module):
        img_resolution, img_channels, label_dim = 4, 1, 7

        def forward(self, x, sigma, labels):
            seen.append(labels.argmax(1))
            return torch.zeros_like(x)

    seeds = [3, 0, 11, 200, 5]
    for _ in generate_images(Recorder(), seeds, steps=1, batch=2):
        pass
    drawn = torch.cat(seen[::1])  # steps=1: one evaluation per batch
    assert drawn.tolist() == demo_lib.labels_for_seeds(seeds, (1, 4, 4), 7).tolist()


def test_demo_trains_the_main_model_with_label_dropout(tmp_path, capsys):
    """Label dropout is the training loop's option (TrainConfig.label_dropout); a bad value fails at once."""
    assert demo.main(_demo_args("--fast", "--outdir", str(tmp_path), "--label-dropout", "1")) == 1
    assert "--label-dropout must lie in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("argv, message", [
    (["--kimg", "-1"], "--kimg must be a finite number > 0, got -1"),
    (["--kimg", "0"], "--kimg must be a finite number > 0"),
    (["--guide-kimg", "nan"], "--guide-kimg must be a finite number > 0"),
    (["--batch", "0"], "--batch must be a finite number > 0"),
    (["--outdir", "{file}"], "is a file, not a folder"),
])
def test_demo_refuses_bad_sizes_and_outdir_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "f").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "f")) for a in argv]
    if "--outdir" not in argv:
        argv += ["--outdir", str(tmp_path / "out")]
    assert demo.main(_demo_args("--fast", "--no-progress", *argv)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_parse_preset():
    assert demo_lib.parse_preset("tiny-16") == ("tiny-16", {})
    assert demo_lib.parse_preset("tiny-16?model_channels=16&channel_mult=1,2&dropout=0.1") == (
        "tiny-16", {"model_channels": 16, "channel_mult": [1, 2], "dropout": 0.1})
    with pytest.raises(ValueError):
        demo_lib.parse_preset("tiny-16?model_channels")


# ------------------------------------------------------------------------------------------------ metrics gen


class Pool(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


@pytest.fixture
def pooldet():
    def factory(weights=None, device="cpu", batch_size=64):
        return ModuleDetector(Pool(), "pool", 12, device=device, batch_size=batch_size)

    register_detector("pool", factory, overwrite=True)
    yield factory
    unregister_detector("pool")


def _metrics_cli(*argv) -> int:
    return run_cli(metrics_cli, *argv)


def test_metrics_gen(tmp_path, pooldet, capsys):
    import fastdiff.nn as fnn
    from fastdiff.io import save_network

    torch.manual_seed(0)
    small = dict(model_channels=8, logvar_channels=8, use_fp16=False)
    save_network(fnn.build("tiny-16", **small), tmp_path / "net.safetensors")
    save_network(fnn.build("tiny-16", **small), tmp_path / "gnet.safetensors")
    real = (torch.rand(40, 3, 16, 16) * 255).to(torch.uint8)
    stats = compute_feature_stats([real], pooldet(), num=None, progress=False)
    stats.to_reference("pool").save(tmp_path / "ref.npz")
    common = ["--ref", str(tmp_path / "ref.npz"), "--net", str(tmp_path / "net.safetensors"), "--steps", "2",
              "--batch", "8", "--device", "cpu", "--no-progress"]

    out = tmp_path / "gen.json"
    assert _metrics_cli("gen", *common, "--seeds", "0-11", "--out", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["num"] == 12 and record["detector"] == "pool" and record["results"]["fd_pool"] > 0
    assert "fd_pool" in capsys.readouterr().out

    # the same seeds through the Python API give the same value (the CLI feeds calc_from_generator)
    from fastdiff.io import load_network
    from fastdiff.metrics import calc_from_generator
    from fastdiff.sampling import generate_images

    net = load_network(tmp_path / "net.safetensors")
    direct = calc_from_generator((b for _, b in generate_images(net, range(12), steps=2, batch=8)),
                                 str(tmp_path / "ref.npz"), num=12, progress=False)
    assert direct["fd_pool"] == pytest.approx(record["results"]["fd_pool"], rel=1e-5)

    # autoguidance with an interval, fewer images than seeds
    assert _metrics_cli("gen", *common, "--gnet", str(tmp_path / "gnet.safetensors"), "--guidance", "2",
                        "--interval", "0.5,10", "--seeds", "0-11", "--num", "6", "--out", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["num"] == 6 and record["guidance"] == 2 and record["interval"] == [0.5, 10]
    assert record["guidance_setup"].startswith("auto = autoguidance, w=2")

    # every guidance method of fastdiff generate is there too (same flags): null-label CFG
    assert _metrics_cli("gen", *common, "--guidance-method", "cfg", "--guidance", "1.5", "--seeds", "0-3",
                        "--out", str(out)) == 0
    assert json.loads(out.read_text())["guidance_setup"].startswith("cfg, w=1.5, null label")

    # errors: guidance without a guide, more images than seeds, a missing network file
    assert _metrics_cli("gen", *common, "--guidance", "2", "--seeds", "0-3") == 1
    assert "needs a guiding network" in capsys.readouterr().err
    assert _metrics_cli("gen", *common, "--seeds", "0-3", "--num", "10") == 1
    assert "only 4 seeds" in capsys.readouterr().err
    assert _metrics_cli("gen", "--ref", str(tmp_path / "ref.npz"), "--net", str(tmp_path / "none.safetensors"),
                        "--seeds", "0-3", "--no-progress") == 1
    assert "none.safetensors: not found" in capsys.readouterr().err


def test_metrics_gen_fails_on_a_diverged_network(tmp_path, pooldet, capsys, monkeypatch):
    """NaN weights: refused when loaded (naming the tensor); let through for debugging, the samples are NaN and
    ``metrics gen`` names them and exits 1 without a score."""
    import fastdiff.nn as fnn
    from fastdiff.io import load_any_network, load_network, save_network

    torch.manual_seed(0)
    net = fnn.build("tiny-16", model_channels=8, logvar_channels=8, use_fp16=False)
    name, param = [(n, p) for n, p in net.named_parameters() if p.ndim > 1][1]
    with torch.no_grad():
        param.view(-1)[3] = float("inf")
    save_network(net, tmp_path / "net.safetensors")
    for load in (load_network, load_any_network):
        with pytest.raises(ValueError, match=f"tensor {name} holds 1 of {param.numel()} values that are not finite"):
            load(tmp_path / "net.safetensors")
    assert not torch.isfinite(load_network(tmp_path / "net.safetensors", allow_nonfinite=True)
                              .state_dict()[name]).all()
    real = (torch.rand(20, 3, 16, 16) * 255).to(torch.uint8)
    compute_feature_stats([real], pooldet(), num=None, progress=False).to_reference("pool").save(tmp_path / "ref.npz")
    argv = ["gen", "--ref", str(tmp_path / "ref.npz"), "--net", str(tmp_path / "net.safetensors"), "--steps", "2",
            "--batch", "4", "--device", "cpu", "--no-progress", "--seeds", "0-5", "--out", str(tmp_path / "r.json")]
    assert _metrics_cli(*argv) == 1
    assert f"tensor {name} holds 1 of" in capsys.readouterr().err
    monkeypatch.setenv("FASTDIFF_ALLOW_NONFINITE", "1")
    assert _metrics_cli(*argv) == 1
    captured = capsys.readouterr()
    assert "6 of 6 samples are not finite" in captured.err and "seeds 0, 1, 2, 3, 4, 5;" in captured.err
    assert "fd_pool" not in captured.out and not (tmp_path / "r.json").exists()
