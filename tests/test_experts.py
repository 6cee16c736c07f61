"""Expert denoisers by noise level (eDiffi's ensemble of experts): the ``Experts`` router, its range checks,
composition with every sampler and guidance method (an ensemble as the guide too), ``fastdiff generate
--expert``, the truncated log-normal of ``fastdiff train --sigma-range`` and ``--init``."""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import pytest
import torch

from fastdiff.sampling import APG, CADS, CFG, ICG, TSG, Autoguidance, Interval, sample
from fastdiff.sampling.experts import Experts, fill_gaps, parse_sigma_range
from fastdiff.sampling.samplers import SAMPLERS
from fastdiff.training.experts import TruncatedEDM2Loss, truncated_lognormal


class Shrink(torch.nn.Module):
    """An elementwise stand-in denoiser ``D = c_skip x + (1 - c_skip) (a tanh(x) + b label colour)``; ``tag``
    identifies which network answered (added to the output's last pixel times 1e-3)."""

    def __init__(self, a=0.5, tag=0.0, label_dim=3):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.sigma_data = 4, 2, label_dim, 0.5
        self.a, self.tag = a, tag
        self.calls = []

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)
        self.calls.append(len(x))
        c_skip = 0.25 / (s**2 + 0.25)
        target = self.a * torch.tanh(x.float()) + self.tag
        if class_labels is not None and self.label_dim:
            target = target + 0.3 * class_labels.float().argmax(1).reshape(-1, 1, 1, 1) * (class_labels.sum(1) > 0
                                                                                            ).reshape(-1, 1, 1, 1)
        d = c_skip * x.float() + (1 - c_skip) * target
        if return_logvar:
            return d, s.log() + self.tag
        return d


def _routed(ranges_nets):
    """The reference: each sample evaluated on its own by the network of its sigma (the stand-in networks are
    elementwise, so a row alone gives what it gives in a batch)."""

    def pick(s):
        for lo, hi, net in ranges_nets:
            if lo < s <= hi or (lo == 0 and s == 0):
                return net
        raise AssertionError(s)

    def denoiser(x, sigma, labels=None):
        sig = torch.as_tensor(sigma).reshape(-1).expand(len(x))
        rows = [pick(float(sig[i]))(x[i:i + 1], sig[i:i + 1], None if labels is None else labels[i:i + 1])
                for i in range(len(x))]
        return torch.cat(rows)

    denoiser.img_resolution, denoiser.img_channels, denoiser.label_dim = 4, 2, 3
    return denoiser


def test_routing_per_sample_with_boundaries_and_logvar():
    nets = [Shrink(tag=1.0), Shrink(tag=2.0), Shrink(tag=3.0)]
    ex = Experts([(1.0, 10.0, nets[1]), (0.0, 1.0, nets[0]), (10.0, math.inf, nets[2])])  # any order
    assert ex.ranges == [(0.0, 1.0), (1.0, 10.0), (10.0, math.inf)] and len(ex) == 3
    assert (ex.img_channels, ex.img_resolution, ex.label_dim, ex.sigma_data) == (2, 4, 3, 0.5)
    sigma = torch.tensor([0.0, 0.5, 1.0, 1.0001, 10.0, 10.5, 80.0, 3.0])
    assert ex.route(sigma).tolist() == [0, 0, 0, 1, 1, 2, 2, 1]  # (lo, hi]: a boundary goes to the lower range
    x = torch.randn(8, 2, 4, 4)
    labels = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    d, logvar = ex(x, sigma, labels, return_logvar=True)
    for i, k in enumerate(ex.route(sigma).tolist()):
        d_i, lv_i = nets[k](x[i:i + 1], sigma[i:i + 1], labels[i:i + 1], return_logvar=True)
        torch.testing.assert_close(d[i:i + 1], d_i, rtol=0, atol=0)
        torch.testing.assert_close(logvar[i:i + 1], lv_i, rtol=0, atol=0)
    # A batch at one sigma: one call of one network with the whole batch (no split, no copy).
    for n in nets:
        n.calls.clear()
    out = ex(x, torch.full((8,), 5.0), labels)
    assert [len(n.calls) for n in nets] == [0, 1, 0] and nets[1].calls == [8]
    torch.testing.assert_close(out, nets[1](x, torch.full((8,), 5.0), labels), rtol=0, atol=0)
    assert ex(x, 0.2).shape == x.shape and ex(x, torch.tensor([[[[20.0]]]] * 8)).shape == x.shape
    with pytest.raises(ValueError, match="NaN"):
        ex(x, torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="expected sigma as a scalar"):
        ex(x, torch.ones(3))


@pytest.mark.parametrize("ranges,match", [
    ([(0, 1), (2, math.inf)], r"no expert for sigma in \(1, 2\]"),
    ([(0, 2), (1, math.inf)], r"\(0, 2\] and \(1, inf\] overlap"),
    ([(0.5, math.inf)], r"leave \(0, 0.5\] uncovered"),
    ([(0, 1), (1, 80)], r"leave \(80, inf\) uncovered"),
    ([(0, 0), (0, math.inf)], "bad sigma range"),
    ([(0, math.nan), (1, math.inf)], "bad sigma range"),
])
def test_ranges_must_cover_zero_to_inf_without_overlap(ranges, match):
    with pytest.raises(ValueError, match=match):
        Experts([(lo, hi, Shrink()) for lo, hi in ranges])


def test_networks_must_agree_and_gaps_can_be_filled():
    with pytest.raises(ValueError, match="at least one"):
        Experts([])
    with pytest.raises(ValueError, match=r"disagree on label_dim \(\(0, 1\]: 3, \(1, inf\]: 0\)"):
        Experts([(0, 1, Shrink()), (1, math.inf, Shrink(label_dim=0))])
    with pytest.raises(ValueError, match="has no attribute 'img_channels'"):
        Experts([(0, math.inf, lambda x, s, l=None: x)])
    base, low = Shrink(tag=9.0), Shrink(tag=1.0)
    filled = fill_gaps([(0.5, 2.0, low)], base)
    assert [(lo, hi) for lo, hi, _ in filled] == [(0.0, 0.5), (0.5, 2.0), (2.0, math.inf)]
    assert [n for _, _, n in filled] == [base, low, base]
    assert parse_sigma_range("0.5,inf") == (0.5, math.inf)
    for bad in ("1", "2,1", "a,b", "-1,2", "nan,1", "1,2,3"):
        with pytest.raises(ValueError):
            parse_sigma_range(bad)


GUIDES = {
    "none": lambda main, guide: None,
    "cfg": lambda main, guide: CFG(2.0),
    "autoguidance": lambda main, guide: Autoguidance(1.8, guide),
    "interval": lambda main, guide: Interval(Autoguidance(2.5, guide), sigma=(0.3, 3.0)),
    "apg": lambda main, guide: APG(3.0, uncond=guide),
    "icg": lambda main, guide: ICG(1.5),
    "tsg": lambda main, guide: TSG(1.5),
    "cads": lambda main, guide: CADS(CFG(1.5)),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("method", sorted(GUIDES))
def test_ensembles_compose_with_every_sampler_and_guidance(sampler, method):
    lo, hi = Shrink(a=0.4, tag=0.05), Shrink(a=0.6, tag=-0.05)
    glo, ghi = Shrink(a=0.2), Shrink(a=0.3)
    main = Experts([(0, 1.2, lo), (1.2, math.inf, hi)])
    guide = Experts([(0, 0.5, glo), (0.5, math.inf, ghi)])  # the guide is an ensemble too, with other ranges
    ref_main = _routed([(0, 1.2, lo), (1.2, math.inf, hi)])
    ref_guide = _routed([(0, 0.5, glo), (0.5, math.inf, ghi)])
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).float()
    kw = dict(sampler=sampler, steps=6, labels=labels, S_churn=0.0)

    def run(m, g):
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        return sample(m, noise, guidance=GUIDES[method](m, g), generators=gens, **kw)

    got, want = run(main, guide), run(ref_main, ref_guide)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # An ensemble of one network is that network.
    single = Experts([(0, math.inf, lo)])
    torch.testing.assert_close(run(single, glo), run(lo, glo), rtol=0, atol=0)
    # Each sample's evaluation is done by one network: as many samples evaluated as one network alone does
    # (a batch whose samples fall in two ranges, as TSG's perturbed sigmas may, is two calls of parts).
    if sampler == "dpm_adaptive":  # its step-size control depends on the denoiser: other counts
        return
    lo.calls.clear(), hi.calls.clear()
    run(main, guide)
    rows_ensemble = sum(lo.calls) + sum(hi.calls)
    lo.calls.clear()
    run(single, guide)
    assert rows_ensemble == sum(lo.calls)


def test_truncated_lognormal_is_the_conditioned_distribution(one_thread):
    from scipy import stats

    g = torch.Generator().manual_seed(3)
    P_mean, P_std = -0.8, 1.6
    for lo, hi in ((0.0, 0.5), (0.5, 4.0), (4.0, math.inf), (200.0, math.inf), (0.0, 1e-4)):
        s = truncated_lognormal((6000,), P_mean, P_std, (lo, hi), generator=g).double()
        assert s.dtype == torch.float64 and bool((s > lo * (1 - 1e-6)).all() and (s <= hi * (1 + 1e-6)).all())
        a = -np.inf if lo == 0 else (math.log(lo) - P_mean) / P_std
        b = np.inf if hi == math.inf else (math.log(hi) - P_mean) / P_std
        ks = stats.kstest(((s.log() - P_mean) / P_std).numpy(), stats.truncnorm(a, b).cdf)
        assert ks.pvalue > 1e-3, (lo, hi, ks)
    with pytest.raises(ValueError, match="no probability"):
        truncated_lognormal((4,), P_mean, P_std, (1e30, math.inf))
    loss = TruncatedEDM2Loss(P_mean, P_std, 0.5, (0.5, 4.0))
    s = loss.sample_sigma(64, generator=torch.Generator().manual_seed(0))
    assert s.shape == (64, 1, 1, 1) and s.dtype == torch.float32 and float(s.min()) > 0.5 and float(s.max()) <= 4.0
    assert "sigma_range=(0.5, 4]" in repr(loss)
    # The loss is EDM2's otherwise: with a range covering everything it equals EDM2Loss for the same draws.
    from fastdiff.diffusion import EDM2Loss

    net = Shrink()
    images = torch.randn(5, 2, 4, 4)
    full = TruncatedEDM2Loss(P_mean, P_std, 0.5, (0.0, math.inf))
    sig = full.sample_sigma(5, generator=torch.Generator().manual_seed(1))
    plain = EDM2Loss(P_mean, P_std, 0.5)
    # The same noise levels, after the same draw from the generator (so that the noise is the same too).
    plain.sample_sigma = lambda b, device=None, generator=None: (
        torch.rand([b, 1, 1, 1], dtype=torch.float64, generator=generator), sig)[1]
    a = full(net, images, generator=torch.Generator().manual_seed(1))
    b = plain(net, images, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    fnn = pytest.importorskip("fastdiff.nn")
    from fastdiff.io import save_network

    root = tmp_path_factory.mktemp("nets")
    paths = {}
    for i, name in enumerate(("low", "high", "base")):
        torch.manual_seed(10 + i)
        net = fnn.build("tiny-16", model_channels=8, logvar_channels=8, label_dim=0, use_fp16=False)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))  # untrained nets with a distinct output
        paths[name] = str(root / f"{name}.safetensors")
        save_network(net, paths[name])
    return paths


def _gen_args(*argv):
    from fastdiff.cli import generate as gen_cli

    p = argparse.ArgumentParser()
    gen_cli.add_arguments(p)
    return p.parse_args(list(argv) + ["--no-progress", "--device", "cpu", "--steps", "2", "--seeds", "0-1"])


def _pngs(folder):
    from PIL import Image

    return {f: np.asarray(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder))}


def test_cli_generate_with_experts_matches_the_library(tmp_path, net_files, capsys, one_thread):
    from fastdiff.cli import generate as gen_cli
    from fastdiff.io import load_network
    from fastdiff.sampling.generate import generate_images

    out = tmp_path / "e"
    args = _gen_args("--expert", f"{net_files['low']}:0,1.5", "--expert", f"{net_files['high']}:1.5,inf",
                     "--outdir", str(out))
    assert gen_cli.main(args) == 0
    low, high = load_network(net_files["low"]), load_network(net_files["high"])
    ex = Experts([(0, 1.5, low), (1.5, math.inf, high)])
    want = {f"{s:06d}.png": img.permute(1, 2, 0).numpy()
            for seeds, imgs in generate_images(ex, [0, 1], steps=2) for s, img in zip(seeds, imgs)}
    got = _pngs(out)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # --net fills the ranges no expert covers; the result differs from the experts alone and from the base alone.
    assert gen_cli.main(_gen_args("--net", net_files["base"], "--expert", f"{net_files['low']}:0,1.5",
                                  "--outdir", str(tmp_path / "f"))) == 0
    assert gen_cli.main(_gen_args("--net", net_files["base"], "--outdir", str(tmp_path / "b"))) == 0
    f, b = _pngs(tmp_path / "f"), _pngs(tmp_path / "b")
    assert any((f[k] != got[k]).any() for k in f) and any((f[k] != b[k]).any() for k in f)
    # An ensemble guide (--gexpert) is accepted as the guiding network.
    assert gen_cli.main(_gen_args("--net", net_files["base"], "--gexpert", f"{net_files['low']}:0,inf",
                                  "--guidance", "1.5", "--outdir", str(tmp_path / "g"))) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["--expert", "x.safetensors"], "expected NET:LO,HI"),
    (["--expert", "x.safetensors:2,1"], "expected 0 <= lo < hi"),
    (["--expert", "missing.safetensors:0,inf"], "--expert missing.safetensors:0,inf: missing.safetensors not found"),
    ([], "no network"),
])
def test_cli_generate_expert_errors(tmp_path, capsys, argv, message):
    from fastdiff.cli import generate as gen_cli

    assert gen_cli.main(_gen_args(*argv, "--outdir", str(tmp_path))) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_expert_gap_is_an_error(tmp_path, net_files, capsys):
    from fastdiff.cli import generate as gen_cli

    args = _gen_args("--expert", f"{net_files['low']}:0,1", "--expert", f"{net_files['high']}:2,inf",
                     "--outdir", str(tmp_path))
    assert gen_cli.main(args) == 2
    assert "no expert for sigma in (1, 2]" in capsys.readouterr().err


def test_cli_train_init_and_sigma_range(tmp_path, capsys):
    from fastdiff.cli import train as cli
    from fastdiff.training.snapshots import save_snapshot

    import _standin

    base = _standin.tiny(init_seed=5)["net"]
    save_snapshot(base, tmp_path / "base.safetensors", {"kind": "base"})
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)

    def argv(outdir, *extra):
        return parser.parse_args(["--preset", "_standin:tiny", "--data", "builtin:shapes?n=32&seed=1", "--outdir",
                                  str(tmp_path / outdir), "--duration", "32", "--batch", "16", "--workers", "0",
                                  "--no-progress", "--device", "cpu", *extra])

    edm2 = ("--P-mean", "-0.8", "--P-std", "1.6")  # the stand-in preset brings a loss of its own otherwise
    args = argv("run", "--init", str(tmp_path / "base.safetensors"), "--sigma-range", "0.5,inf", *edm2)
    net, loss, _ds, config = cli.build_run(args)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    assert isinstance(loss, TruncatedEDM2Loss) and loss.sigma_range == (0.5, math.inf)
    assert (loss.P_mean, loss.P_std) == (-0.8, 1.6)
    assert config.extra["init"].endswith("base.safetensors") and config.extra["sigma_range"] == "0.5,inf"
    assert cli.main(args) == 0
    assert "TruncatedEDM2Loss" in (tmp_path / "run" / "training_options.json").read_text()
    # A base network of another shape, a bad range, a loss that is not EDM2's: clear errors, exit status 1.
    other = _standin.tiny(model_channels=12)["net"]
    save_snapshot(other, tmp_path / "other.safetensors", {"kind": "base"})
    capsys.readouterr()
    assert cli.main(argv("r2", "--init", str(tmp_path / "other.safetensors"))) == 1
    err = capsys.readouterr().err
    assert "other.safetensors" in err and "of another shape" in err and "Traceback" not in err
    (tmp_path / "net.pkl").write_bytes(b"\x80\x04not safetensors")
    assert cli.main(argv("r5", "--init", str(tmp_path / "net.pkl"))) == 1
    assert "not a fastdiff .safetensors network file" in capsys.readouterr().err
    assert cli.main(argv("r3", "--sigma-range", "3,1", *edm2)) == 1
    assert "--sigma-range" in capsys.readouterr().err
    assert cli.main(argv("r4", "--sigma-range", "0,1")) == 1
    assert "needs the EDM2 loss" in capsys.readouterr().err
