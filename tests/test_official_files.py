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

    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
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
