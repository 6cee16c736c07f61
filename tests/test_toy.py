"""The 2-D toy: exact mixture denoiser, exact-score sampling, guidance on the toy, the CLI end to end."""

import importlib.util
import json
import math

import pytest
import torch

from fastdiff.sampling import Autoguidance, sample
from fastdiff.toy import GaussianMixture, ToyDenoiser, tree_mixture
from fastdiff.cli import toy as toy_cli


pytestmark = pytest.mark.usefixtures("one_thread")  # the toy's tensors are tiny: one thread is faster


@pytest.fixture(scope="module")
def tree():
    return tree_mixture()


@pytest.fixture(scope="module")
def small_tree():
    """The same construction with 5 levels (496 components instead of 2032): for the sampling tests."""
    return tree_mixture(depth=5)


def test_tree_is_the_papers_construction(tree):
    """7 levels of 8 components per class, class masses 0.477 / 0.523, classes grown in opposite directions."""
    assert len(tree) == 2 * 8 * (2**7 - 1)
    assert [int((tree.cls == c).sum()) for c in (0, 1)] == [8 * 127, 8 * 127]
    torch.testing.assert_close(tree.class_prior(), torch.tensor([0.477, 0.523], dtype=torch.float64))
    mu0, _ = tree.moments(0)
    mu1, _ = tree.moments(1)
    cos = float(mu0 @ mu1 / (mu0.norm() * mu1.norm()))
    assert cos < -0.9, cos  # the class means point in (nearly) opposite directions from the common root
    x = tree.sample(1500, None, torch.Generator().manual_seed(0))
    frac1 = float((tree.log_prob(x, 0, torch.tensor([[0.0, 1.0]]).expand(1500, -1)) >
                   tree.log_prob(x, 0, torch.tensor([[1.0, 0.0]]).expand(1500, -1))).double().mean())
    assert abs(frac1 - 0.523) < 0.04  # unconditional samples follow the class masses
    with pytest.raises(ValueError, match="class_weights"):
        GaussianMixture([[0.0, 0.0], [1.0, 0.0]], [[1.0, 0.0]] * 2, [0.1, 0.1], [0.1, 0.1], [1, 1], [0, 1],
                        class_weights=torch.tensor([1.0, -1.0]))


def tiny_mixture():
    return GaussianMixture(
        mean=[[0.0, 0.0], [1.0, 0.5], [-0.6, 0.8]],
        axis=[[1.0, 0.0], [1.0, 1.0], [0.3, -1.0]],
        std_along=[0.35, 0.25, 0.4],
        std_across=[0.1, 0.15, 0.05],
        weight=[1.0, 2.0, 1.0],
        cls=[0, 0, 1],
    )


def quadrature(mix, x, sigma, labels=None, h=0.01):
    """Brute force: ``E[x0 | x]`` and ``p(x; sigma)`` by summing over a fine grid of ``x0``."""
    xs = torch.arange(-3.0, 3.0 + h / 2, h, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    x0 = torch.stack([gx.flatten(), gy.flatten()], 1)
    p0 = mix.log_prob(x0, 0.0, None if labels is None else labels.expand(len(x0), -1)).exp() * h * h
    out_d, out_p = [], []
    for xi in x:
        k = torch.exp(-((x0 - xi) ** 2).sum(1) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
        wgt = p0 * k
        out_p.append(wgt.sum())
        out_d.append((wgt[:, None] * x0).sum(0) / wgt.sum())
    return torch.stack(out_d), torch.stack(out_p)


@pytest.mark.parametrize("labels", [None, [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
def test_exact_denoiser_matches_brute_force(labels):
    mix = tiny_mixture()
    x = torch.tensor([[0.1, 0.2], [1.2, 0.1], [-0.9, 1.3], [0.5, -0.4]], dtype=torch.float64)
    lab = None if labels is None else torch.tensor([labels], dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0):
        d_ref, p_ref = quadrature(mix, x, sigma, lab)
        lab_n = None if lab is None else lab.expand(len(x), -1)
        d = mix.denoise(x, torch.full((len(x),), sigma, dtype=torch.float64), lab_n)
        torch.testing.assert_close(d, d_ref, atol=2e-4, rtol=0)
        torch.testing.assert_close(mix.log_prob(x, sigma, lab_n).exp(), p_ref, atol=1e-5, rtol=1e-3)


def test_zero_label_is_unconditional_and_classes_mix(tree):
    x = torch.randn(64, 2, dtype=torch.float64)
    s = torch.full((64,), 0.2, dtype=torch.float64)
    zero = torch.zeros(64, 2, dtype=torch.float64)
    torch.testing.assert_close(tree(x, s, zero), tree(x, s, None))
    p0 = tree.log_prob(x, 0.2, torch.tensor([[1.0, 0.0]]).expand(64, -1)).exp()
    p1 = tree.log_prob(x, 0.2, torch.tensor([[0.0, 1.0]]).expand(64, -1)).exp()
    torch.testing.assert_close(tree.log_prob(x, 0.2).exp(), 0.477 * p0 + 0.523 * p1)


def test_score_is_gradient_of_log_density(tree):
    """Tweedie: (D - x) / sigma^2 equals grad log p(x; sigma) (central differences, float64)."""
    g = torch.Generator().manual_seed(3)
    x = tree.sample(16, None, g) + 0.1 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    sigma, eps = 0.1, 1e-6
    score = tree.score(x, torch.full((16,), sigma, dtype=torch.float64))
    fd = torch.stack([(tree.log_prob(x + eps * e, sigma) - tree.log_prob(x - eps * e, sigma)) / (2 * eps)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    torch.testing.assert_close(score, fd, rtol=1e-5, atol=1e-5)


def test_denoiser_is_stable_at_extreme_noise_levels(tree):
    x = torch.tensor([[0.0, 0.0], [50.0, -40.0], [1e3, 1e3]], dtype=torch.float64)
    for sigma in (1e-4, 0.002, 80.0):
        d = tree(x, torch.full((3,), sigma, dtype=torch.float64))
        assert torch.isfinite(d).all()
    mu, _ = tree.moments()
    big = tree(x[:1], torch.tensor([1e4], dtype=torch.float64))
    torch.testing.assert_close(big[0], mu, atol=1e-3, rtol=0)  # sigma -> inf: D -> E[x0]


def test_exact_sampler_and_moments(tree):
    g = torch.Generator().manual_seed(0)
    n = 20000
    x = tree.sample(n, None, g)
    mu, cov = tree.moments()
    torch.testing.assert_close(x.mean(0), mu, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.015, rtol=0)
    assert abs(float(torch.trace(cov)) / 2 - 0.25) < 1e-9  # scaled to sigma_data = 0.5


@pytest.mark.parametrize("cls", [0, 1])
def test_heun_with_exact_denoiser_matches_mixture(small_tree, cls):
    tree = small_tree
    g = torch.Generator().manual_seed(10 + cls)
    n = 1500
    labels = torch.nn.functional.one_hot(torch.full((n,), cls), 2).double()
    x = sample(tree, torch.randn(n, 2, generator=g, dtype=torch.float64), steps=32, labels=labels,
               dtype=torch.float64)
    mu, cov = tree.moments(cls)
    torch.testing.assert_close(x.mean(0), mu, atol=0.04, rtol=0)  # ~3 standard errors
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0)
    ref = tree.sample(n, labels, g)
    lp, lp_ref = tree.log_prob(x, 0, labels).mean(), tree.log_prob(ref, 0, labels).mean()
    assert abs(float(lp - lp_ref)) < 0.15, (float(lp), float(lp_ref))


def test_autoguidance_with_exact_main_and_blurred_guide_concentrates(small_tree):
    """Deterministic: same noise and labels; the guide is the exact denoiser of a blurred tree."""
    tree = small_tree
    g = torch.Generator().manual_seed(5)
    n = 512
    labels = torch.nn.functional.one_hot(torch.arange(n) % 2, 2).double()
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    guide = tree.blurred(0.05)
    plain = sample(tree, noise, steps=16, labels=labels, dtype=torch.float64)
    guided = sample(tree, noise, steps=16, labels=labels, dtype=torch.float64,
                    guidance=Autoguidance(2.5, guide))
    lp_plain, lp_guided = tree.log_prob(plain, 0, labels), tree.log_prob(guided, 0, labels)
    assert float(lp_guided.mean()) > float(lp_plain.mean()) + 0.1, (float(lp_guided.mean()), float(lp_plain.mean()))
    assert float(lp_guided.median()) > float(lp_plain.median())
    again = sample(tree, noise, steps=16, labels=labels, dtype=torch.float64, guidance=Autoguidance(2.5, guide))
    assert torch.equal(again, guided)


def test_toy_denoiser_preconditioning_and_gradients():
    net = ToyDenoiser(channels=16, blocks=2, seed=1)
    x = torch.randn(8, 2)
    sigma = torch.rand(8) + 0.1
    labels = torch.nn.functional.one_hot(torch.arange(8) % 2, 2).float()
    net.eval()
    d = net(x, sigma, labels)
    c_skip = 0.25 / (sigma**2 + 0.25)
    torch.testing.assert_close(d, c_skip[:, None] * x)  # out_gain starts at 0
    net.train()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    d, logvar = net(x, sigma, labels, return_logvar=True)
    assert d.shape == (8, 2) and logvar.shape == (8,)
    (d.square().sum() + logvar.sum()).backward()
    assert net.out_gain.grad is not None and net.out.weight.grad.abs().sum() > 0
    assert net.blocks[0].emb_gain.grad is not None
    rows = net.inp.weight.detach().norm(dim=1) / math.sqrt(3)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-3, rtol=0)  # forced weight norm
    d_uncond = net(x, sigma, None)
    assert torch.isfinite(d_uncond).all()


def test_toy_cli_fast_end_to_end(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    toy_cli.add_arguments(parser)
    out = tmp_path / "toy"
    args = parser.parse_args(["--fast", "--quiet", "--outdir", str(out), "--seed", "1", "--steps", "16",
                              "--guidance", "2.5"])
    assert toy_cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    if importlib.util.find_spec("matplotlib") is None:
        assert results["plot"] is None and not (out / "toy.png").exists()
    else:
        png = (out / "toy.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    report = (out / "report.md").read_text()
    assert "autoguidance w=2.5" in report and "CFG w=2.5" in report and "| no guidance |" in report
    assert results["sampler_steps"] == 16 and results["fast"] is True
    exact = results["settings"]["exact denoiser"]
    assert exact["in_hdr90"] > 0.8 and exact["outside_hdr99"] < 0.05
    for m in results["settings"].values():
        assert math.isfinite(m["mean_logp"]) and 0 <= m["in_hdr90"] <= 1
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
