"""The official EDM2 release's own files, read without running any code from them:

* ``fastdiff phema --indir`` on the official training loop's raw snapshots (``network-snapshot-<kimg>-<std>.pkl``,
  a persistence pickle of ``{'ema': Precond (float16), ...}``), compared with the official reconstruction's
  algorithm (``reconstruct_phema.py`` of the release, written out independently below);
* ``fastdiff metrics calc/gen --ref`` on an official dataset-refs pickle (``{'fid': {'mu', 'sigma'},
  'fd_dinov2': {'mu', 'sigma'}}`` of numpy arrays, what ``calculate_metrics.py ref`` writes).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_net
from test_edm2_pickle import write_official

pytestmark = pytest.mark.usefixtures("one_thread")


# --- post-hoc EMA from official raw snapshots -------------------------------------------------------------


def _official_coefficients(in_nimg, in_std, out_nimg, out_std):
    """The official ``training/phema.py`` solve, written out: ``gamma`` from ``std`` by the cubic's root,
    Gram matrices of the power-function profiles, ``np.linalg.solve``, columns normalized to sum to 1."""

    def std_to_exp(std):
        tmp = np.float64(std) ** -2
        return np.real(np.roots([1, 7, 16 - tmp, 12 - tmp])).max()

    def p_dot_p(t_a, g_a, t_b, g_b):
        t_ratio = t_a / t_b
        t_exp = np.where(t_a < t_b, g_b, -g_a)
        t_max = np.maximum(t_a, t_b)
        return (g_a + 1) * (g_b + 1) * t_ratio ** t_exp / ((g_a + g_b + 1) * t_max)

    rv = lambda x: np.float64(x).reshape(-1, 1)
    cv = lambda x: np.float64(x).reshape(1, -1)
    g_in = np.array([std_to_exp(s) for s in in_std])
    g_out = np.array([std_to_exp(s) for s in out_std])
    a = p_dot_p(rv(in_nimg), rv(g_in), cv(in_nimg), cv(g_in))
    b = p_dot_p(rv(in_nimg), rv(g_in), cv([out_nimg] * len(out_std)), cv(g_out))
    x = np.linalg.solve(a, b)
    return x / x.sum(axis=0)


def _phema_cli(*argv):
    from fastdiff.cli import phema as phema_cli

    return run_cli(phema_cli, *argv, "--no-progress")


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """Six official raw snapshots (kimg 1, 2, 4 x std 0.050, 0.100) of one tiny architecture, weights differing
    per snapshot; and each snapshot's float16-rounded parameters (what the official reconstruction reads)."""
    run = tmp_path_factory.mktemp("official-run")
    inputs = []
    for i, (kimg, std) in enumerate([(k, s) for k in (1, 2, 4) for s in (0.05, 0.10)]):
        net = tiny_net(seed=i).eval()
        write_official(run / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", net)
        params = {k: v.detach().to(torch.float16).to(torch.float32) for k, v in net.named_parameters()}
        inputs.append(((kimg * 1000 + 999) // 1024 * 1024, std, params))
    return run, inputs


def test_phema_reads_official_raw_snapshots_like_the_official_reconstruction(official_run, tmp_path):
    from fastdiff.io import load_network, read_network_config

    run, inputs = official_run
    out_stds = [0.07, 0.15]
    assert _phema_cli("--indir", run, "--outstd", "0.07,0.15", "--outdir", tmp_path / "out") == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["phema-0000004096-0.070.safetensors",
                                                    "phema-0000004096-0.150.safetensors"]
    # The official reconstruction: float32 accumulation of the float16 snapshots' parameters.
    coefs = _official_coefficients([n for n, _, _ in inputs], [s for _, s, _ in inputs], 4096, out_stds)
    for j, std in enumerate(out_stds):
        path = tmp_path / "out" / f"phema-0000004096-{std:.3f}.safetensors"
        got = load_network(path)
        extra = read_network_config(path)["extra"]
        assert extra["kind"] == "phema" and extra["nimg"] == 4096 and extra["std"] == std
        assert extra["num_inputs"] == 6 and extra["official_inputs"] is True
        assert extra["source_entries"]["encoder"]["class_name"] == "StabilityVAEEncoder"
        assert got.init_kwargs == tiny_net().init_kwargs
        mine = dict(got.named_parameters())
        for name, first in inputs[0][2].items():
            want = torch.zeros_like(first)
            for i, (_, _, params) in enumerate(inputs):
                want += params[name] * coefs[i, j]
            scale = max(want.abs().max().item(), 1e-3)
            assert (mine[name].detach() - want).abs().max().item() <= 2e-6 * scale * np.abs(coefs[:, j]).sum(), name
            # (the official file casts this to float16 at the end: far coarser than the difference checked here)
    # the coefficients are a real mix of all six inputs, not one snapshot
    assert ((np.abs(coefs) > 1e-3).sum(axis=0) >= 3).all()


def test_phema_official_instd_outkimg_and_mixing_refused(official_run, tmp_path, capsys):
    import shutil

    from fastdiff.io import load_network, save_network

    run, inputs = official_run
    # --instd and --outnimg select inputs as for fastdiff's own snapshots
    assert _phema_cli("--indir", run, "--outstd", "0.08", "--instd", "0.1", "--outnimg", "2048",
                      "--outdir", tmp_path / "o1") == 0
    (name,) = os.listdir(tmp_path / "o1")
    assert name == "phema-0000002048-0.080.safetensors"
    got = dict(load_network(tmp_path / "o1" / name).named_parameters())
    coefs = _official_coefficients([1024, 2048], [0.1, 0.1], 2048, [0.08])
    k = "unet.enc.16x16_conv.weight"
    want = inputs[1][2][k] * coefs[0, 0] + inputs[3][2][k] * coefs[1, 0]
    assert torch.allclose(got[k].detach(), want, rtol=1e-5, atol=1e-6)
    # a folder with both kinds of snapshots is refused with a clear message
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    save_network(tiny_net(), mixed / "network-snapshot-0000004096-0.050.safetensors",
                 extra={"kind": "ema", "nimg": 4096, "std": 0.05, "exponent": 16.97})
    assert _phema_cli("--indir", mixed, "--outstd", "0.07", "--outdir", tmp_path / "o2") == 1
    err = capsys.readouterr().err
    assert "both fastdiff EMA snapshots" in err and "official EDM2 snapshot pickles" in err
    assert not (tmp_path / "o2").exists()
    # an official snapshot whose network fastdiff cannot rebuild is one clear error, not a traceback
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "network-snapshot-0000001-0.050.pkl").write_bytes(pickle.dumps({"ema": [1, 2, 3]}))
    assert _phema_cli("--indir", bad, "--outstd", "0.07", "--outdir", tmp_path / "o3") == 1
    assert "not a network" in capsys.readouterr().err


# --- official dataset-refs pickles as --ref ---------------------------------------------------------------


class _Projection(torch.nn.Module):
    """A fixed random projection of 8x8-pooled images: a cheap stand-in feature network."""

    def __init__(self, dim, seed):
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.w


@pytest.fixture
def standin_detectors():
    """'inception' and 'dinov2' replaced by cheap projections (16-d and 8-d), restored afterwards."""
    from fastdiff.metrics import detectors
    from fastdiff.metrics.detectors import ModuleDetector, register_detector

    saved = dict(detectors._REGISTRY)
    for name, fd_name, dim in (("inception", "fid", 16), ("dinov2", "fd_dinov2", 8)):
        def factory(weights=None, device="cpu", batch_size=64, name=name, dim=dim):
            return ModuleDetector(_Projection(dim, seed=dim), name, dim, device=device, batch_size=batch_size)

        register_detector(name, factory, fd_name=fd_name, overwrite=True)
    yield
    detectors._REGISTRY.clear()
    detectors._REGISTRY.update(saved)


def _metrics_cli(*argv):
    from fastdiff.cli import metrics as metrics_cli

    return run_cli(metrics_cli, *argv)


def _official_refs(path, refs, protocol=None, num_images=None):
    """What the official ``calculate_metrics.py ref`` writes: a plain pickle of numpy statistics,
    ``dict(num_images=N, fid=dict(mu=..., sigma=...), fd_dinov2=dict(...))``."""
    data = {} if num_images is None else {"num_images": num_images}
    data.update({name: {"mu": ref.mu, "sigma": ref.sigma} for name, ref in refs.items()})
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_metrics_calc_reads_official_dataset_refs(standin_detectors, tmp_path, protocol, capsys):
    from test_metrics import _smooth_images, _write_pngs

    from fastdiff.metrics.stats import load_reference

    _write_pngs(tmp_path / "data", _smooth_images(20, seed=30))
    _write_pngs(tmp_path / "gen", (_smooth_images(20, seed=31).int() // 2 + 90).to(torch.uint8))
    common = ["--workers", "0", "--batch", "8", "--device", "cpu", "--no-progress"]
    npz = {}
    for det in ("inception", "dinov2"):
        npz[det] = tmp_path / f"{det}.npz"
        assert _metrics_cli("ref", "--data", tmp_path / "data", "--dest", npz[det], "--detector", det,
                            "--num", "all", *common) == 0
    refs = {"fid": load_reference(npz["inception"]), "fd_dinov2": load_reference(npz["dinov2"])}
    pkl = _official_refs(tmp_path / "img16.pkl", refs, protocol, num_images=20)

    # the Python API: one detector's statistics, Inception's by default, with the release's image count
    got = load_reference(pkl)
    assert got.detector == "inception" and got.num_images == 20
    assert load_reference(_official_refs(tmp_path / "nocount.pkl", refs, protocol)).num_images is None
    assert np.array_equal(got.mu, refs["fid"].mu) and np.array_equal(got.sigma, refs["fid"].sigma)
    assert load_reference(pkl, "dinov2").detector == "dinov2"

    def calc(ref, *metrics):
        out = tmp_path / "r.json"
        assert _metrics_cli("calc", "--images", tmp_path / "gen", "--ref", ref, "--num", "20", "--out", out,
                            *metrics, *common) == 0
        return json.loads(out.read_text())["results"]

    # exactly the values the same statistics give in .npz files
    fid = calc(pkl, "--metrics", "fid")
    assert fid == calc(npz["inception"], "--metrics", "fid") and fid["fid"] > 1.0
    assert calc(pkl) == fid  # the default detector, Inception
    fd_dinov2 = calc(pkl, "--metrics", "fd_dinov2")
    assert fd_dinov2 == calc(npz["dinov2"]) and fd_dinov2["fd_dinov2"] > 1.0
    assert calc(pkl, "--detector", "dinov2") == fd_dinov2
    # the official refs carry no raw features: precision/recall is refused with the reason
    assert _metrics_cli("calc", "--images", tmp_path / "gen", "--ref", pkl, "--metrics", "fid,pr", "--num", "20",
                        *common) == 1
    assert "raw features" in capsys.readouterr().err
    # files that also keep the raw features (as some forks of the release write them) give precision/recall
    with_feats = tmp_path / "feats.npz"
    assert _metrics_cli("ref", "--data", tmp_path / "data", "--dest", with_feats, "--detector", "inception",
                        "--metrics", "fd,pr", "--num", "all", *common) == 0
    full = load_reference(with_feats)
    with open(tmp_path / "feats.pkl", "wb") as f:
        pickle.dump({"num_images": 20, "fid": {"mu": full.mu, "sigma": full.sigma, "features": full.features}}, f)
    assert calc(tmp_path / "feats.pkl", "--metrics", "fid,pr") == calc(with_feats, "--metrics", "fid,pr")


def test_metrics_gen_reads_official_dataset_refs(standin_detectors, tmp_path):
    from test_metrics import _smooth_images, _write_pngs

    from fastdiff.io import save_network
    from fastdiff.metrics.stats import load_reference

    _write_pngs(tmp_path / "data", _smooth_images(12, seed=40))
    common = ["--workers", "0", "--batch", "4", "--device", "cpu", "--no-progress"]
    npz = tmp_path / "dinov2.npz"
    assert _metrics_cli("ref", "--data", tmp_path / "data", "--dest", npz, "--detector", "dinov2", "--num", "all",
                        *common) == 0
    pkl = _official_refs(tmp_path / "refs.pkl", {"fd_dinov2": load_reference(npz)})
    save_network(tiny_net(), tmp_path / "net.safetensors")
    results = []
    for ref in (npz, pkl):
        out = tmp_path / "g.json"
        assert _metrics_cli("gen", "--net", tmp_path / "net.safetensors", "--ref", ref, "--num", "4",
                            "--steps", "2", "--seeds", "0-3", "--out", out, *common) == 0
        results.append(json.loads(out.read_text())["results"])
    assert results[0] == results[1] and np.isfinite(results[0]["fd_dinov2"])


def _bad_refs(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((30, 5))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    asym = sigma.copy()
    asym[0, 1] += 0.1
    nan_mu = mu.copy()
    nan_mu[1] = np.nan
    w, v = np.linalg.eigh(sigma)
    w[0] = -w[-1]
    not_psd = (v * w) @ v.T
    not_psd = (not_psd + not_psd.T) / 2
    cases = {
        "asym": ({"fid": {"mu": mu, "sigma": asym}}, "not symmetric"),
        "nan": ({"fid": {"mu": nan_mu, "sigma": sigma}}, "NaN or Inf"),
        "not_psd": ({"fid": {"mu": mu, "sigma": not_psd}}, "not positive semi-definite"),
        "shape": ({"fid": {"mu": mu, "sigma": sigma[:3]}}, r"mu \[D\] and sigma \[D, D\]"),
        "no_sigma": ({"fid": {"mu": mu}}, "numpy arrays 'mu' and 'sigma'"),
        "list": ({"fid": {"mu": mu.tolist(), "sigma": sigma}}, "numpy arrays 'mu' and 'sigma'"),
        "unknown": ({"is": {"mu": mu, "sigma": sigma}}, r"not a reference file.*found 'is'"),
        "toplist": ([mu, sigma], r"not a reference file.*found a list"),
        "tensor": ({"fid": {"mu": torch.from_numpy(mu), "sigma": sigma}}, r"\['mu'\] is a Tensor"),
        "object": ({"fid": {"mu": np.array([1, "a"] * 2 + [2.5], dtype=object), "sigma": sigma}},
                   "neither a .npz .*numpy"),
        "payload": ({"fid": {"mu": _Payload(), "sigma": sigma}}, r"neither a .npz .*allow-list"),
        "missing": ({"fd_dinov2": {"mu": mu, "sigma": sigma}}, "has no inception statistics"),
        "count": ({"num_images": "30", "fid": {"mu": mu, "sigma": sigma}}, "'num_images' is '30', expected an integer"),
        "count_only": ({"num_images": 30}, "not a reference file.*found 'num_images'"),
        "one": ({"num_images": 1, "fid": {"mu": mu, "sigma": sigma}}, "1 image"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / f"{name}.pkl"
        with open(path, "wb") as f:
            pickle.dump(data, f)
        yield name, path, match


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def test_official_refs_are_validated_and_never_run_code(tmp_path, monkeypatch):
    from fastdiff.metrics.stats import load_reference

    monkeypatch.chdir(tmp_path)
    for name, path, match in _bad_refs(tmp_path):
        detector = "inception"
        with pytest.raises(ValueError, match=match) as e:
            load_reference(path, detector)
        assert path.name in str(e.value), name
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    # a file holding both kinds and asked for neither: Inception's (the default of every metrics run)
    sigma = np.eye(3)
    both = _official_refs(tmp_path / "both.pkl", {
        "fid": argparse.Namespace(mu=np.zeros(3), sigma=sigma), "fd_dinov2": argparse.Namespace(mu=np.ones(2),
                                                                                                sigma=np.eye(2))})
    assert load_reference(both).feature_dim == 3 and load_reference(both, "dinov2").feature_dim == 2
