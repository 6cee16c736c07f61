"""Power-function EMA and post-hoc EMA: the maths against brute force, the tracker, the reconstruction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff.training.phema import (
    MAX_STD,
    PowerFunctionEMA,
    combine_snapshots,
    exp_to_std,
    power_function_beta,
    power_function_correlation,
    power_function_profile,
    solve_posthoc_coefficients,
    std_to_exp,
)

integrate = pytest.importorskip("scipy.integrate")


# ---------------------------------------------------------------------------------------------- std <-> exp


def test_std_to_exp_reference_values():
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)
    assert std_to_exp(MAX_STD) == pytest.approx(0.0, abs=1e-6)
    assert MAX_STD == pytest.approx(0.2887, abs=1e-4)


@pytest.mark.parametrize("std", [0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.28])
def test_std_exp_roundtrip_and_cubic(std):
    g = std_to_exp(std)
    assert exp_to_std(g) == pytest.approx(std, rel=1e-10)
    r = std ** -2
    assert g**3 + 7 * g**2 + (16 - r) * g + (12 - r) == pytest.approx(0.0, abs=1e-6 * r)
    # The largest real root: the cubic is increasing past it.
    assert 3 * g**2 + 14 * g + (16 - r) > 0


def test_std_to_exp_vectorized_and_errors():
    gs = std_to_exp(np.array([[0.05, 0.1]]))
    assert gs.shape == (1, 2)
    np.testing.assert_allclose(gs, [[std_to_exp(0.05), std_to_exp(0.1)]])
    for bad in (0.0, -0.1, 0.3, float("nan")):
        with pytest.raises(ValueError):
            std_to_exp(bad)
    with pytest.raises(ValueError):
        exp_to_std(-1.0)


def test_exp_to_std_is_profile_std():
    # sigma_rel is the std of the profile's time, relative to t.
    for g in (0.0, 2.0, 6.94):
        t = 1.0
        p = lambda tau: (g + 1) * tau**g / t ** (g + 1)
        m1 = integrate.quad(lambda x: x * p(x), 0, t)[0]
        m2 = integrate.quad(lambda x: x * x * p(x), 0, t)[0]
        assert math.sqrt(m2 - m1 * m1) == pytest.approx(exp_to_std(g), rel=1e-8)


def test_power_function_beta():
    g = std_to_exp(0.1)
    assert power_function_beta(0.1, t_next=1000, t_delta=10) == pytest.approx((1 - 0.01) ** (g + 1))
    assert power_function_beta(0.1, t_next=32, t_delta=32) == 0.0  # first step: the EMA becomes theta
    # Images or steps: the same decay.
    assert power_function_beta(0.05, 64 * 100, 64) == pytest.approx(power_function_beta(0.05, 100, 1))


# ---------------------------------------------------------------------------------------------- inner products


def _quad_inner(ta, sa, tb, sb):
    ga, gb = std_to_exp(sa), std_to_exp(sb)
    f = lambda x: (ga + 1) * (x / ta) ** ga / ta * (gb + 1) * (x / tb) ** gb / tb
    return integrate.quad(f, 0, min(ta, tb), epsabs=0, epsrel=1e-11, limit=200)[0]


@pytest.mark.parametrize("ta,sa,tb,sb", [
    (100.0, 0.05, 100.0, 0.05), (100.0, 0.05, 300.0, 0.10), (300.0, 0.05, 100.0, 0.10),
    (7.0, 0.2, 11.0, 0.03), (5e6, 0.1, 2e6, 0.1), (1.0, 0.28, 1.0, 0.01),
])
def test_correlation_matches_quadrature(ta, sa, tb, sb):
    got = power_function_correlation(ta, sa, tb, sb)
    assert got == pytest.approx(_quad_inner(ta, sa, tb, sb), rel=1e-7)
    assert got == pytest.approx(power_function_correlation(tb, sb, ta, sa), rel=1e-12)  # symmetric


def test_correlation_broadcasts():
    a = power_function_correlation(np.array([[1.0], [2.0]]), 0.05, np.array([[1.0, 2.0, 3.0]]), 0.1)
    assert a.shape == (2, 3)
    assert a[1, 2] == pytest.approx(power_function_correlation(2.0, 0.05, 3.0, 0.1))


def _snapshot_grid():
    ofs = np.array([200.0, 400.0, 600.0, 800.0, 1000.0])
    return np.concatenate([ofs, ofs]), np.array([0.05] * 5 + [0.10] * 5)


def test_solver_against_brute_force_integration():
    in_ofs, in_std = _snapshot_grid()
    out_ofs, out_std = np.array([1000.0, 1000.0, 800.0]), np.array([0.07, 0.12, 0.06])
    x = solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    assert x.shape == (10, 3)
    np.testing.assert_allclose(x.sum(axis=0), 1.0, atol=1e-12)
    # Brute force: Gram matrix and cross products by quadrature, plain solve, normalize.
    n = len(in_ofs)
    a = np.array([[_quad_inner(in_ofs[i], in_std[i], in_ofs[k], in_std[k]) for k in range(n)] for i in range(n)])
    b = np.array([[_quad_inner(in_ofs[i], in_std[i], out_ofs[j], out_std[j]) for j in range(3)] for i in range(n)])
    ref = np.linalg.solve(a, b)
    ref /= ref.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(x, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    # The reconstructed profile is close to the target profile (relative L2 error on a fine grid).
    tau = np.linspace(0, 1000, 200001)
    for j in range(3):
        target = power_function_profile(tau, out_ofs[j], out_std[j])
        recon = sum(x[i, j] * power_function_profile(tau, in_ofs[i], in_std[i]) for i in range(n))
        err = np.sqrt(np.trapezoid((recon - target) ** 2, tau) / np.trapezoid(target**2, tau))
        assert err < 0.05, (j, err)


def test_solver_reproduces_a_stored_profile_exactly():
    in_ofs, in_std = _snapshot_grid()
    x = solve_posthoc_coefficients(in_ofs, in_std, 1000.0, 0.10)
    expected = np.zeros(10)
    expected[9] = 1.0
    np.testing.assert_allclose(x[:, 0], expected, atol=1e-6)


def test_solver_units_do_not_matter():
    in_ofs, in_std = _snapshot_grid()
    x1 = solve_posthoc_coefficients(in_ofs, in_std, 1000.0, [0.06, 0.09])
    x2 = solve_posthoc_coefficients(in_ofs * 2048, in_std, 1000.0 * 2048, [0.06, 0.09])  # images vs steps
    np.testing.assert_allclose(x1, x2, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- the tracker


class _Params(torch.nn.Module):
    def __init__(self, n=64):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.v = torch.nn.Parameter(torch.zeros(3, 5))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_ema_update_follows_the_recurrence():
    net = _Params()
    ema = PowerFunctionEMA(net, stds=[0.05, 0.1])
    ref = [torch.zeros(64), torch.zeros(64)]
    batch = 8
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 40):
        with torch.no_grad():
            net.w.add_(torch.randn(64, generator=gen))
        nimg = step * batch
        ema.update(cur_nimg=nimg, batch_size=batch)
        for k, std in enumerate([0.05, 0.1]):
            beta = (1 - batch / nimg) ** (std_to_exp(std) + 1)
            ref[k] = beta * ref[k] + (1 - beta) * net.w.detach()
    for (e, suffix), r, std in zip(ema.get(), ref, [0.05, 0.1]):
        assert suffix == f"-{std:.3f}"
        torch.testing.assert_close(e.w, r, rtol=1e-5, atol=1e-5)
        assert not e.training and not e.w.requires_grad


def test_ema_of_linear_trajectory_is_profile_mean():
    # theta(t) = t: the EMA at time T is int tau p(tau) dtau = (g+1)/(g+2) T (up to discretization).
    net = _Params(1)
    ema = PowerFunctionEMA(net, stds=[0.05, 0.2])
    steps = 2000
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.w.fill_(step - 0.5)  # the parameter during step `step` (midpoint of its interval)
        ema.update(cur_nimg=step, batch_size=1)
    for (e, _), std in zip(ema.get(), [0.05, 0.2]):
        g = std_to_exp(std)
        assert e.w.item() == pytest.approx((g + 1) / (g + 2) * steps, rel=2e-3)


def test_ema_state_dict_roundtrip_reset_and_buffers():
    net = _Params()
    ema = PowerFunctionEMA(net, stds=[0.05, 0.1])
    with torch.no_grad():
        net.w.fill_(2.0)
        net.count.fill_(7)
    ema.update(100, 10)
    state = ema.state_dict()
    assert state["stds"] == [0.05, 0.1] and len(state["emas"]) == 2
    other = PowerFunctionEMA(_Params(), stds=[0.05, 0.1])
    other.load_state_dict(state)
    for (a, _), (b, _) in zip(ema.get(), other.get()):
        torch.testing.assert_close(a.w, b.w)
    assert ema.get()[0][0].count.item() == 7  # buffers copied from the network by get()
    ema.reset()
    torch.testing.assert_close(ema.get()[1][0].w, net.w.detach())


# ---------------------------------------------------------------------------------------------- reconstruction


def test_combine_snapshots_streams_all_targets():
    gen = torch.Generator().manual_seed(1)
    sds = [{"a": torch.randn(4, 3, generator=gen), "n": torch.tensor([i])} for i in range(5)]
    coefs = np.random.default_rng(0).normal(size=(5, 3))
    calls = []

    def stream():
        for i, sd in enumerate(sds):
            calls.append(i)
            yield sd

    outs = combine_snapshots(stream(), coefs)
    assert calls == [0, 1, 2, 3, 4]  # one pass
    for j in range(3):
        ref = sum(float(coefs[i, j]) * sds[i]["a"].double() for i in range(5)).float()
        torch.testing.assert_close(outs[j]["a"], ref)
        assert outs[j]["n"].item() == 0
    with pytest.raises(ValueError):
        combine_snapshots(iter(sds[:3]), coefs)


def _trajectory_run(steps=600, batch=16, snap_every=60, stds=(0.05, 0.10), extra_stds=(0.07,)):
    """Synthetic training: a noisy trajectory with drift; snapshots of the tracked EMAs every few steps."""
    net = _Params(256)
    tracked = PowerFunctionEMA(net, stds=list(stds) + list(extra_stds))
    gen = torch.Generator().manual_seed(3)
    drift = torch.randn(256, generator=gen)
    snaps = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.w.add_(0.02 * drift + 0.1 * torch.randn(256, generator=gen))
            net.v.add_(0.05 * torch.randn(3, 5, generator=gen))
        nimg = step * batch
        tracked.update(nimg, batch)
        if step % snap_every == 0:
            for (e, _), std in zip(tracked.get()[: len(stds)], stds):
                snaps.append((nimg, std, {k: v.clone() for k, v in e.state_dict().items()}))
    return net, tracked, snaps


def test_reconstruction_reproduces_tracked_emas():
    net, tracked, snaps = _trajectory_run()
    nimg = snaps[-1][0]
    emas = {std: e for (e, _), std in zip(tracked.get(), tracked.stds)}
    coefs = solve_posthoc_coefficients([s[0] for s in snaps], [s[1] for s in snaps], nimg, [0.10, 0.07])
    outs = combine_snapshots((s[2] for s in snaps), coefs)
    for out, std in zip(outs, [0.10, 0.07]):
        ref = emas[std]
        # Error relative to how far the EMA is from the raw weights (the scale the EMA matters on).
        spread = (ref.w - net.w.detach()).norm()
        err = (out["w"] - ref.w).norm()
        assert err < 0.03 * spread, (std, float(err), float(spread))
        assert (out["v"] - ref.v).norm() < 0.1 * (ref.v - net.v.detach()).norm()


def test_phema_cli_end_to_end(tmp_path):
    from fastdiff.cli import phema as phema_cli
    from fastdiff.training.snapshots import read_snapshot_meta, save_snapshot, snapshot_name

    net, tracked, snaps = _trajectory_run(steps=300, snap_every=50)
    holder = _Params(256)
    for nimg, std, sd in snaps:
        holder.load_state_dict(sd)
        save_snapshot(holder, tmp_path / "run" / snapshot_name(nimg, std),
                      {"kind": "ema", "nimg": nimg, "std": std, "exponent": std_to_exp(std)})
    import argparse

    parser = argparse.ArgumentParser()
    phema_cli.add_arguments(parser)
    args = parser.parse_args(["--indir", str(tmp_path / "run"), "--outstd", "0.07,0.10",
                              "--outdir", str(tmp_path / "out"), "--no-progress"])
    assert phema_cli.main(args) == 0
    from safetensors.torch import load_file

    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [snapshot_name(snaps[-1][0], 0.07, "phema"),
                                        snapshot_name(snaps[-1][0], 0.10, "phema")]
    meta = read_snapshot_meta(files[1])
    assert meta["extra"]["kind"] == "phema" and meta["extra"]["std"] == 0.10
    ref = tracked.get()[1][0]
    out = load_file(str(files[1]))
    assert (out["w"] - ref.w).norm() < 0.05 * (ref.w - net.w.detach()).norm()
    # Errors are reported, not raised.
    args = parser.parse_args(["--indir", str(tmp_path / "nothing"), "--outstd", "0.07", "--outdir",
                              str(tmp_path / "o2")])
    assert phema_cli.main(args) == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--indir", "x", "--outstd", "0.5", "--outdir", "y"])
