"""fastdiff.sampling: samplers against direct formula implementations, guidance, per-sample seeds,
an exact Gaussian-mixture denoiser, generate_images and the generate CLI (incl. a 2-process run)."""

import math
import os

import pytest
import torch

from fastdiff import ops
from fastdiff.sampling import (
    APG, CADS, CFG, ICG, TSG, Autoguidance, Guidance, Interval, edm_sampler, edm_sigma_steps, generate_images, rng,
    sample,
)
from fastdiff import _runtime as _nvtx
from fastdiff.cli import common as cli_common
from fastdiff.cli import generate as gen_cli
from fastdiff.sampling.generate import make_guidance, split_batches
from fastdiff.sampling.guidance import EvalContext

from conftest import cli_args


# --- test denoisers ---------------------------------------------------------------------------------


class GMM:
    """Isotropic Gaussian mixture sum_k pi_k N(mu_k, s0^2 I); D(x; sigma) = E[x0 | x] exactly.
    labels: one-hot [N, K] restricts to that component; an all-zero row (or None) is unconditional."""

    def __init__(self, mus, s0=0.5, pi=None):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)
        self.s0 = s0
        k = self.mus.shape[0]
        self.pi = torch.full((k,), 1.0 / k, dtype=torch.float64) if pi is None else torch.as_tensor(pi, dtype=torch.float64)
        self.calls, self.rows = 0, 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        self.rows += x.shape[0]
        x64, s = x.double(), sigma.double().reshape(-1, 1)
        var = self.s0**2 + s**2
        w = self.pi.expand(x.shape[0], -1)
        if labels is not None:
            lab = labels.double()
            rs = lab.sum(1, keepdim=True)
            w = torch.where(rs > 0, lab / rs.clamp_min(1e-30), w)
        diff = x64[:, None, :] - self.mus[None]  # [N, K, d]
        logits = torch.log(w.clamp_min(1e-300)) - (diff**2).sum(-1) / (2 * var)
        r = torch.softmax(logits, dim=1)
        post = self.mus[None] + (self.s0**2 / var)[:, :, None] * diff
        return (r[:, :, None] * post).sum(1).to(x.dtype)

    def moments(self):
        mean = (self.pi[:, None] * self.mus).sum(0)
        second = (self.pi[:, None] * (self.mus**2 + self.s0**2)).sum(0)
        return mean, second - mean**2


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.rows, self.sigmas = fn, 0, 0, []

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        self.rows += x.shape[0]
        self.sigmas.append(float(sigma[0]))
        return self.fn(x, sigma, labels)


class TinyNet(torch.nn.Module):
    """Stand-in for fastdiff.nn.Precond: purely elementwise, so its output for a sample never depends
    on the rest of the batch. D = c_skip x + (1 - c_skip) (0.5 tanh(x) + class colour)."""

    def __init__(self, label_dim=4, channels=3, res=8, shift=0.0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = res, channels, label_dim
        self.register_buffer("colour", torch.linspace(-0.6, 0.6, max(label_dim, 1) * channels).reshape(-1, channels) + shift)

    def forward(self, x, sigma, class_labels=None):
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = 0.25 / (s**2 + 0.25)
        target = 0.5 * torch.tanh(x.float())
        if self.label_dim and class_labels is not None:
            idx = class_labels.argmax(dim=1)
            target = target + self.colour[idx][:, :, None, None] * (class_labels.sum(1) > 0).float()[:, None, None, None]
        return (c_skip * x.float() + (1 - c_skip) * target).to(x.dtype)


MIX = GMM([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], s0=0.5, pi=[0.5, 0.3, 0.2])


# --- direct formula implementations -------------------------------------------------------------------


def heun_direct(D, noise, t, labels=None, churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, randn=None):
    n_steps = len(t) - 1
    x = noise * t[0]
    for i in range(n_steps):
        tc, tn = t[i], t[i + 1]
        gamma = min(churn / n_steps, math.sqrt(2) - 1) if churn > 0 and S_min <= float(tc) <= S_max else 0.0
        th = tc + gamma * tc
        xh = x + (th**2 - tc**2).sqrt() * S_noise * randn(x) if gamma > 0 else x
        d = (xh - D(xh, th, labels)) / th
        x = xh + (tn - th) * d
        if i < n_steps - 1:
            d2 = (x - D(x, tn, labels)) / tn
            x = xh + (tn - th) * (0.5 * d + 0.5 * d2)
    return x


def euler_direct(D, noise, t, labels=None, eta=0.0, randn=None):
    x = noise * t[0]
    for i in range(len(t) - 1):
        s, s1 = float(t[i]), float(t[i + 1])
        den = D(x, t[i], labels)
        up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2)) if s1 > 0 else 0.0
        down = math.sqrt(s1**2 - up**2)
        x = x + (down - s) * (x - den) / s
        if up > 0:
            x = x + up * randn(x)
    return x


def dpmpp_direct(D, noise, t, labels=None):
    x = noise * t[0]
    old, h_last = None, None
    for i in range(len(t) - 1):
        s, s1 = float(t[i]), float(t[i + 1])
        den = D(x, t[i], labels)
        if s1 == 0:
            x = den
        else:
            h = math.log(s / s1)
            if old is None:
                dh = den
            else:
                r = h_last / h
                dh = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = (s1 / s) * x - math.expm1(-h) * dh
            h_last = h
        old = den
    return x


def per_sample(D):
    """Direct loops pass a scalar t; the denoiser takes [N]."""
    return lambda x, t, labels: D(x, torch.as_tensor(t, dtype=x.dtype).reshape(()).expand(x.shape[0]), labels)


def guided(D1, D0, w):
    return lambda x, s, labels: D0(x, s, labels) + w * (D1(x, s, labels) - D0(x, s, labels))


def _noise(n=16, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- schedule -----------------------------------------------------------------------------------------


def test_sigma_per_sample_and_the_schedule_inverse():
    from fastdiff.diffusion import edm_time_of_sigma, sigma_per_sample

    assert sigma_per_sample(0.5, 3).tolist() == [0.5, 0.5, 0.5]
    assert sigma_per_sample(0.1, 2, dtype=torch.float64).tolist() == [0.1, 0.1]  # not rounded through float32
    s = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(sigma_per_sample(s, 3), s)
    assert sigma_per_sample(s, 3).dtype == torch.float64
    assert sigma_per_sample(torch.tensor([2]), 4).tolist() == [2.0] * 4
    assert sigma_per_sample(s.reshape(3, 1, 1, 1), 3, image_shaped=True).shape == (3,)
    for bad, kw in [(torch.ones(2), {}), (torch.ones(3, 1, 1, 1), {}), (torch.ones(3, 2), {"image_shaped": True})]:
        with pytest.raises(ValueError, match="who: expected sigma as a scalar"):
            sigma_per_sample(bad, 3, who="who", **kw)
    t = edm_sigma_steps(9, 0.01, 50.0, 5.0)
    _close(edm_time_of_sigma(t[:-1], 0.01, 50.0, 5.0), 1 - torch.arange(9, dtype=torch.float64) / 8)
    assert edm_time_of_sigma(torch.tensor([100.0, 0.0]), 0.01, 50.0, 5.0).tolist() == [1.0, 0.0]


def test_edm_sigma_steps():
    t = edm_sigma_steps(32)
    assert t.shape == (33,) and t.dtype == torch.float64 and float(t[-1]) == 0
    _close(t[0], torch.tensor(80.0, dtype=torch.float64))
    _close(t[31], torch.tensor(0.002, dtype=torch.float64))
    i = 5
    want = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(float(t[i]) - want) < 1e-12
    assert bool((t[1:] < t[:-1]).all())
    assert edm_sigma_steps(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError):
        edm_sigma_steps(0)


# --- samplers vs the formulas -------------------------------------------------------------------------


@pytest.mark.parametrize("reference", [False, True])
def test_heun_matches_formula(reference):
    noise = _noise()
    t = edm_sigma_steps(12)
    want = heun_direct(per_sample(MIX), noise, t)
    with ops.use_reference(reference):
        got = sample(MIX, noise, "heun", steps=12, dtype=torch.float64)
    _close(got, want)


def test_heun_evaluations():
    f = Counter(MIX)
    sample(f, _noise(), "heun", steps=32, dtype=torch.float64)
    assert f.calls == 63


def test_stochastic_heun_matches_formula():
    noise, seeds = _noise(6), range(6)
    t = edm_sigma_steps(10)
    gens = rng.seed_generators(seeds)
    want = heun_direct(per_sample(MIX), noise, t, churn=40, S_min=0.05, S_max=50, S_noise=1.003,
                       randn=lambda x: rng.randn_like(x, gens))
    got = sample(MIX, noise, "heun", steps=10, generators=rng.seed_generators(seeds), S_churn=40, S_min=0.05, S_max=50,
                 S_noise=1.003, dtype=torch.float64)
    _close(got, want)


def test_euler_and_ancestral_match_formula():
    noise = _noise()
    t = edm_sigma_steps(16)
    _close(sample(MIX, noise, "euler", steps=16, dtype=torch.float64), euler_direct(per_sample(MIX), noise, t))
    gens = rng.seed_generators(range(16))
    want = euler_direct(per_sample(MIX), noise, t, eta=1.0, randn=lambda x: rng.randn_like(x, gens))
    got = sample(MIX, noise, "euler_ancestral", steps=16, generators=rng.seed_generators(range(16)), dtype=torch.float64)
    _close(got, want)


def test_euler_churn_and_ancestral_s_noise_match_formula():
    """S_churn / S_noise reach euler (EDM churn before the step, taken from sigma_hat) and euler_ancestral
    (S_noise scales the fresh noise); the CLI passes them through generate_images."""
    noise, seeds = _noise(6), range(6)
    t = [float(v) for v in edm_sigma_steps(10)]
    gens = rng.seed_generators(seeds)
    x = noise * t[0]
    for i in range(10):
        gamma = min(40 / 10, math.sqrt(2) - 1) if 0.05 <= t[i] <= 50 else 0.0
        s_hat = t[i] * (1 + gamma)
        if gamma > 0:
            x = x + rng.randn_like(x, gens) * 1.003 * math.sqrt(s_hat**2 - t[i] ** 2)
        x = x + (t[i + 1] - s_hat) * (x - per_sample(MIX)(x, s_hat, None)) / s_hat
    got = sample(MIX, noise, "euler", steps=10, generators=rng.seed_generators(seeds), S_churn=40, S_min=0.05,
                 S_max=50, S_noise=1.003, dtype=torch.float64)
    _close(got, x)
    assert not torch.allclose(got, sample(MIX, noise, "euler", steps=10, dtype=torch.float64))
    gens = rng.seed_generators(seeds)
    want = euler_direct(per_sample(MIX), noise, edm_sigma_steps(10), eta=1.0,
                        randn=lambda x: 0.7 * rng.randn_like(x, gens))
    got = sample(MIX, noise, "euler_ancestral", steps=10, generators=rng.seed_generators(seeds), S_noise=0.7,
                 dtype=torch.float64)
    _close(got, want)
    # through the generate CLI's path: S_churn changes the images
    net = TinyNet()
    a = next(generate_images(net, [1, 2], sampler="euler", steps=4, S_churn=0.0))[1]
    b = next(generate_images(net, [1, 2], sampler="euler", steps=4, S_churn=30.0))[1]
    assert not torch.equal(a, b)


def test_dpmpp_2m_matches_formula():
    noise = _noise()
    t = edm_sigma_steps(16)
    _close(sample(MIX, noise, "dpmpp_2m", steps=16, dtype=torch.float64), dpmpp_direct(per_sample(MIX), noise, t))


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m"])
def test_autoguidance_matches_formula(sampler):
    guide = GMM(MIX.mus, s0=0.8, pi=MIX.pi)
    noise, w = _noise(), 2.3
    t = edm_sigma_steps(10)
    D = per_sample(guided(MIX, guide, w))
    want = {"heun": heun_direct, "euler": euler_direct, "dpmpp_2m": dpmpp_direct}[sampler](D, noise, t)
    got = sample(MIX, noise, sampler, steps=10, guidance=Autoguidance(w, guide), dtype=torch.float64)
    _close(got, want, 1e-9)


def test_edm_sampler_drop_in():
    guide = GMM(MIX.mus, s0=0.8, pi=MIX.pi)
    noise = _noise().float()
    t = edm_sigma_steps(8, dtype=torch.float32)
    torch.manual_seed(1)
    want = heun_direct(per_sample(guided(MIX, guide, 1.7)), noise, t, churn=10, S_min=0.1, S_max=20, randn=torch.randn_like)
    torch.manual_seed(1)
    got = edm_sampler(MIX, noise, gnet=guide, num_steps=8, guidance=1.7, S_churn=10, S_min=0.1, S_max=20)
    _close(got, want, 1e-5)
    f = Counter(guide)
    edm_sampler(MIX, noise, gnet=f, num_steps=8, guidance=1)
    assert f.calls == 0
    with pytest.raises(ValueError, match="gnet"):
        edm_sampler(MIX, noise, guidance=2.0)


def test_kernel_and_reference_paths_agree():
    noise = _noise().float()
    g = Autoguidance(2.0, GMM(MIX.mus, s0=0.8, pi=MIX.pi))
    a = sample(MIX, noise, "heun", steps=12, guidance=g)
    with ops.use_reference():
        b = sample(MIX, noise, "heun", steps=12, guidance=g)
    _close(a, b, 1e-4)


def test_bad_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(MIX, _noise(), "rk45")


# --- the exact Gaussian-mixture check ------------------------------------------------------------------


def test_heun_reaches_gaussian_mixture():
    noise = _noise(4000, seed=3)
    x = sample(MIX, noise, "heun", steps=32, dtype=torch.float64)
    mean, var = MIX.moments()
    assert (x.mean(0) - mean).abs().max() < 0.1, (x.mean(0), mean)
    assert ((x.var(0) - var).abs() / var).max() < 0.08, (x.var(0), var)
    # The mode proportions too.
    k = ((x[:, None, :] - MIX.mus[None]) ** 2).sum(-1).argmin(1)
    frac = torch.bincount(k, minlength=3).double() / len(k)
    assert (frac - MIX.pi).abs().max() < 0.03


def test_cfg_on_gaussian_mixture():
    noise = _noise(2000, seed=4)
    labels = torch.nn.functional.one_hot(torch.zeros(2000, dtype=torch.long), 3).double()
    cond = sample(MIX, noise, "heun", steps=32, labels=labels, dtype=torch.float64)
    # Conditioned on component 0: its own Gaussian.
    assert (cond.mean(0) - MIX.mus[0]).abs().max() < 0.06
    assert ((cond.var(0) - 0.25).abs() / 0.25).max() < 0.1
    guided_x = sample(MIX, noise, "heun", steps=32, labels=labels, guidance=CFG(3.0), dtype=torch.float64)
    # CFG extrapolates away from the unconditional prediction: the samples move away from the other
    # components (the mixture mean lies to the right of mu_0) and no sample lands in another mode.
    mix_mean, _ = MIX.moments()
    away = (cond.mean(0) - mix_mean)
    assert float(((guided_x.mean(0) - cond.mean(0)) * away).sum()) > 0
    k = ((guided_x[:, None, :] - MIX.mus[None]) ** 2).sum(-1).argmin(1)
    assert bool((k == 0).all())


# --- guidance -----------------------------------------------------------------------------------------


def test_guidance_weight_one_skips_guide():
    guide = Counter(MIX)
    base = sample(MIX, _noise(), "heun", steps=6, dtype=torch.float64)
    for g in (Autoguidance(1.0, guide), CFG(1.0, uncond=guide), APG(1.0, uncond=guide)):
        out = sample(MIX, _noise(), "heun", steps=6, guidance=g, dtype=torch.float64)
        assert torch.equal(out, base)
    assert guide.calls == 0


def test_cfg_null_label_one_batched_forward():
    f = Counter(MIX)
    labels = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).double()
    noise = _noise(8)
    got = sample(f, noise, "heun", steps=8, labels=labels, guidance=CFG(2.5), dtype=torch.float64)
    assert f.calls == 15 and f.rows == 15 * 16
    uncond = lambda x, s, lab: MIX(x, s, torch.zeros_like(lab))  # noqa: E731
    want = heun_direct(per_sample(guided(MIX, uncond, 2.5)), noise, edm_sigma_steps(8), labels=labels)
    _close(got, want)
    # A separate unconditional network gets no labels.
    seen = []
    unc = lambda x, s, lab: (seen.append(lab), MIX(x, s, None))[1]  # noqa: E731
    sample(MIX, noise, "euler", steps=3, labels=labels, guidance=CFG(2.0, uncond=unc), dtype=torch.float64)
    assert seen == [None] * 3


@pytest.mark.parametrize("sampler", ["heun", "euler", "euler_ancestral", "dpmpp_2m"])
def test_interval_skips_guide_outside(sampler):
    guide = Counter(GMM(MIX.mus, s0=0.8, pi=MIX.pi))
    main = Counter(MIX)
    lo, hi = 0.28, 2.9
    sample(main, _noise(), sampler, steps=16, guidance=Interval(Autoguidance(2.0, guide), sigma=(lo, hi)),
           generators=rng.seed_generators(range(16)), dtype=torch.float64)
    inside = [s for s in main.sigmas if lo < s <= hi]
    assert 0 < guide.calls == len(inside) < main.calls
    assert all(lo < s <= hi for s in guide.sigmas)


def test_interval_matches_formula_and_steps():
    guide = GMM(MIX.mus, s0=0.8, pi=MIX.pi)
    lo, hi, w = 0.5, 5.0, 2.0

    def D(x, s, labels):
        inside = lo < float(s[0]) <= hi
        return guided(MIX, guide, w)(x, s, labels) if inside else MIX(x, s, labels)

    noise = _noise()
    want = heun_direct(per_sample(D), noise, edm_sigma_steps(12))
    got = sample(MIX, noise, "heun", steps=12, guidance=Interval(Autoguidance(w, guide), sigma=(lo, hi)),
                 dtype=torch.float64)
    _close(got, want)
    g = Counter(guide)
    sample(MIX, noise, "heun", steps=12, guidance=Interval(Autoguidance(w, g), steps=(3, 5)), dtype=torch.float64)
    assert g.calls == 6  # steps 3, 4, 5: Euler + correction each
    with pytest.raises(ValueError):
        Interval(Autoguidance(w, guide))


def test_interval_mixed_batch():
    # Per-sample sigmas on both sides of the interval: the guide sees only the rows inside.
    guide = Counter(GMM(MIX.mus, s0=0.8, pi=MIX.pi))
    x, sigma = _noise(4), torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)
    ctx = EvalContext(num_steps=4, sigmas=edm_sigma_steps(4), sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float64, batch=4)
    out = Interval(Autoguidance(2.0, guide), sigma=(0.5, 5.0)).evaluate(MIX, x, sigma, None, ctx).combine()
    assert guide.rows == 2
    want = torch.where((sigma > 0.5)[:, None] & (sigma <= 5)[:, None], guided(MIX, guide.fn, 2.0)(x, sigma, None), MIX(x, sigma, None))
    _close(out, want)


def _apg_direct(d_c, d_u, w, eta, r, beta, running):
    delta = (d_c - d_u).double()
    if running is not None:
        delta = delta + beta * running
    n = delta.norm(dim=1, keepdim=True)
    if r is not None:
        delta = delta * torch.minimum(torch.ones_like(n), r / n)
    v = d_c.double() / d_c.double().norm(dim=1, keepdim=True)
    par = (delta * v).sum(1, keepdim=True) * v
    return d_c.double() + (w - 1) * ((delta - par) + eta * par), delta


def test_apg_matches_formula():
    uncond = GMM(MIX.mus, s0=0.9)
    w, eta, r, beta = 3.0, 0.3, 0.8, -0.5
    g = APG(w, uncond=lambda x, s, lab: uncond(x, s, None), eta=eta, r=r, beta=beta)
    ctx = EvalContext(num_steps=2, sigmas=edm_sigma_steps(2), sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float64, batch=5)
    x, running = _noise(5), None
    for sig in (2.0, 1.0):
        sigma = torch.full((5,), sig, dtype=torch.float64)
        got = g.evaluate(MIX, x, sigma, None, ctx)
        assert not got.linear
        want, running = _apg_direct(MIX(x, sigma), uncond(x, sigma), w, eta, r, beta, running)
        _close(got.d1, want)
    # eta = 1, no momentum, no rescale: plain CFG.
    x = _noise(5, seed=9)
    sigma = torch.full((5,), 1.5, dtype=torch.float64)
    apg = APG(w, uncond=lambda x, s, lab: uncond(x, s, None), eta=1.0, beta=0.0).evaluate(MIX, x, sigma, None, ctx).d1
    _close(apg, guided(MIX, uncond, w)(x, sigma, None))


def test_icg_random_labels_batched():
    f = Counter(MIX)
    labels = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 3).double()
    seen = []

    def spy(x, s, lab):
        seen.append(lab.clone())
        return f(x, s, lab)

    sample(spy, _noise(4), "euler", steps=3, labels=labels, guidance=ICG(2.0), generators=rng.seed_generators(range(4)),
           dtype=torch.float64)
    assert f.calls == 3 and f.rows == 3 * 8
    assert all(torch.equal(lab[:4], labels) and (lab[4:].sum(1) == 1).all() for lab in seen)
    first = torch.stack([lab[4:].argmax(1) for lab in seen])
    want = torch.stack([torch.tensor([int(torch.randint(3, (1,), generator=g)) for g in gens]) for gens in [rng.seed_generators(range(4))] for _ in range(1)])
    assert torch.equal(first[0], want[0])


class _EmbNet(torch.nn.Module):
    """A denoiser with a noise-embedding layer named emb_noise (as the EDM2 U-Net has): its output, the
    embedding e [batch, 6], shifts D a little, so that a perturbed e is visible."""

    def __init__(self):
        super().__init__()
        self.emb_noise = torch.nn.Identity()
        self.seen = []

    def forward(self, x, sigma, labels=None):
        e = self.emb_noise(torch.ones(x.shape[0], 6, dtype=torch.float64) * torch.arange(6.0, dtype=torch.float64))
        self.seen.append(e)
        return MIX(x, sigma, labels) + 0.01 * e.mean(1, keepdim=True).to(x.dtype)


def test_tsg_hook_and_fallback():
    from fastdiff.sampling.graphs import cuda_graphed
    from fastdiff.sampling.guidance import noise_embedding_layer

    net = _EmbNet()
    assert noise_embedding_layer(net) is net.emb_noise and noise_embedding_layer(cuda_graphed(net)) is net.emb_noise
    assert noise_embedding_layer(MIX) is None
    sample(net, _noise(4), "euler", steps=2, guidance=TSG(2.0, scale=0.5), generators=rng.seed_generators(range(4)),
           dtype=torch.float64)
    assert len(net.seen) == 2 and not net.emb_noise._forward_hooks  # the hook is removed after each call
    e = net.seen[0]
    want = torch.arange(6.0, dtype=torch.float64).expand(4, 6)
    noise = torch.stack([torch.randn(6, generator=g) for g in rng.seed_generators(range(4))]).double()
    assert e.shape[0] == 8 and torch.equal(e[:4], want)
    _close(e[4:], want + 0.5 * want[0].std() * noise, tol=1e-6)
    # Through cuda_graphed (eager on the CPU; on CUDA the hook needs the eager forward too): same result.
    a = sample(net, _noise(4), "euler", steps=2, guidance=TSG(2.0, scale=0.5), generators=rng.seed_generators(range(4)),
               dtype=torch.float64)
    b = sample(cuda_graphed(net), _noise(4), "euler", steps=2, guidance=TSG(2.0, scale=0.5),
               generators=rng.seed_generators(range(4)), dtype=torch.float64)
    assert torch.equal(a, b)
    # Fallback: the guiding half is evaluated at a perturbed sigma.
    f = Counter(MIX)
    sig_seen = []
    sample(lambda x, s, lab: (sig_seen.append(s.clone()), f(x, s, lab))[1], _noise(4), "euler", steps=2,
           guidance=TSG(2.0), dtype=torch.float64)
    s = sig_seen[0]
    assert f.calls == 2 and torch.equal(s[:4], torch.full((4,), 80.0, dtype=torch.float64)) and not torch.equal(s[4:], s[:4])


def test_tsg_reaches_the_noise_embedding_of_fastdiff_networks():
    """fastdiff's Precond has the noise-embedding layer TSG hooks: a hook sees emb_noise's [2N, C]
    output, identity leaves D unchanged, and TSG at scale 0 is no guidance (the c_noise fallback would
    still perturb sigma)."""
    from fastdiff.bench import Options
    from fastdiff.bench.suites import build_net
    from fastdiff.sampling.guidance import noise_embedding_layer

    # every learned gain at 1: they start at 0, which would hide the embedding
    net = build_net("tiny-16", Options(), 0).eval().requires_grad_(False)
    assert noise_embedding_layer(net) is net.unet.emb_noise
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([1.0, 3.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4]), 10).float()
    seen = []

    def hooked(fn):
        handle = net.unet.emb_noise.register_forward_hook(fn)
        try:
            return net(x, sigma, labels)
        finally:
            handle.remove()

    with torch.no_grad():
        d = net(x, sigma, labels)
        d_id = hooked(lambda m, i, e: (seen.append(e.shape), e)[1])
        d_big = hooked(lambda m, i, e: e + 3 * torch.randn_like(e))
        gens = rng.seed_generators(range(2))
        plain = sample(net, x, "euler", steps=3, labels=labels, generators=gens)
        tsg0 = sample(net, x, "euler", steps=3, labels=labels, guidance=TSG(2.0, scale=0.0),
                      generators=rng.seed_generators(range(2)))
        tsg = sample(net, x, "euler", steps=3, labels=labels, guidance=TSG(2.0, scale=1.0),
                     generators=rng.seed_generators(range(2)))
    assert seen == [torch.Size([2, net.unet.emb_noise.out_channels])] and torch.equal(d, d_id)
    assert not torch.allclose(d, d_big)
    # scale 0 runs the network on 2 + 2 samples per call where plain runs 2: other batch sizes take other
    # kernel paths (Winograd chunks, the convolution selector), so the two agree to float rounding, not bitwise
    torch.testing.assert_close(tsg0, plain, atol=5e-5, rtol=1e-4)
    assert not torch.allclose(tsg, plain, atol=1e-3)


def test_cads_schedule_and_rescale():
    g = CADS(Guidance(), tau1=0.6, tau2=0.9, s=0.25, psi=1.0)
    t = torch.tensor([0.0, 0.6, 0.75, 0.9, 1.0], dtype=torch.float64)
    _close(g.gamma(t), torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    ctx = EvalContext(num_steps=32, sigmas=edm_sigma_steps(32), sigma_min=0.002, sigma_max=80, rho=7, batch=4,
                      generators=rng.seed_generators(range(4)), dtype=torch.float64)
    ts = ctx.t_of(edm_sigma_steps(32)[:-1])
    _close(ts, 1 - torch.arange(32, dtype=torch.float64) / 31)
    labels = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).double()
    low = g.anneal(labels, torch.full((4,), 0.01, dtype=torch.float64), ctx)
    assert torch.equal(low, labels)
    high = g.anneal(labels, torch.full((4,), 80.0, dtype=torch.float64), ctx)
    assert not torch.equal(high, labels)
    _close(high.mean(1), labels.mean(1))
    _close(high.std(1), labels.std(1))
    # psi = 0, no rescale: pure s * n at t = 1, from each sample's generator.
    g0 = CADS(Guidance(), psi=0.0)
    ctx.generators = rng.seed_generators(range(4))
    high0 = g0.anneal(labels, torch.full((4,), 80.0, dtype=torch.float64), ctx)
    _close(high0, 0.25 * rng.randn(rng.seed_generators(range(4)), 4, (3,), dtype=torch.float64))
    with pytest.raises(ValueError, match="labels"):
        sample(MIX, _noise(2), "euler", steps=2, guidance=CADS())


@pytest.mark.parametrize("g", ["cfg", "icg", "tsg", "cads", "apg"])
def test_every_guidance_with_every_sampler_runs(g):
    """Each method with each sampler: it acts (w = 2 differs from no guidance), it is deterministic for the same
    seeds, w = 1 is no guidance (CADS: the annealing acts on its own), and CFG equals sampling the guided denoiser
    D_0 + w (D_1 - D_0) written out directly."""
    labels = torch.nn.functional.one_hot(torch.arange(4) % 3, 3).double()
    make = {"cfg": lambda w: CFG(w), "icg": lambda w: ICG(w), "tsg": lambda w: TSG(w), "cads": lambda w: CADS(CFG(w)),
            "apg": lambda w: APG(w, r=5.0)}[g]
    uncond = lambda x, s, lab: MIX(x, s, torch.zeros_like(lab))  # noqa: E731  (the null label)
    for sampler in ("heun", "euler", "euler_ancestral", "dpmpp_2m"):
        def run(guidance, denoiser=MIX):
            return sample(denoiser, _noise(4), sampler, steps=6, guidance=guidance, labels=labels,
                          generators=rng.seed_generators(range(4)), dtype=torch.float64)

        x, plain = run(make(2.0)), run(None)
        assert x.shape == (4, 2) and torch.isfinite(x).all()
        assert (x - plain).abs().max() > 1e-3, sampler
        _close(run(make(2.0)), x)
        if g == "cads":
            assert (x - run(CFG(2.0))).abs().max() > 1e-3, sampler
        else:
            _close(run(make(1.0)), plain)
        if g == "cfg":
            _close(x, run(None, guided(MIX, uncond, 2.0)))


# --- per-sample seeds ---------------------------------------------------------------------------------


def _gen(net, seeds, batch, **kw):
    out = {}
    for s, imgs in generate_images(net, seeds, batch=batch, device="cpu", steps=6, S_churn=20, **kw):
        out.update({int(k): v for k, v in zip(s, imgs)})
    return out


def _gen_float(net, seeds, **kw):
    gens = rng.seed_generators(seeds)
    noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    labels = torch.nn.functional.one_hot(torch.tensor([int(torch.randint(4, (1,), generator=g)) for g in gens]), 4).float()
    return sample(net, noise, "heun", steps=6, labels=labels, generators=gens, S_churn=20, **kw)


@pytest.mark.parametrize("reference", [True, False])
def test_seed_independent_of_batch(reference):
    net, gnet = TinyNet(), TinyNet(shift=0.2)
    g = Interval(Autoguidance(2.0, gnet), sigma=(0.3, 10.0))
    with ops.use_reference(reference):
        alone = _gen_float(net, [7], guidance=g)
        mixed = _gen_float(net, [3, 7, 11, 12345], guidance=g)
        other = _gen_float(net, [99, 5, 7, 1], guidance=ICG(1.5))
        alone_icg = _gen_float(net, [7], guidance=ICG(1.5))
        # Null-label CFG and APG (momentum and rescale are per sample), as `fastdiff generate` builds them.
        pairs = [(_gen_float(net, [7], guidance=g())[0], _gen_float(net, [2, 9, 7], guidance=g())[2])
                 for g in (lambda: CFG(1.5), lambda: APG(2.0, r=0.5, eta=0.3))]
    if reference:
        assert torch.equal(alone[0], mixed[1])
        assert torch.equal(alone_icg[0], other[2])
        assert all(torch.equal(a, b) for a, b in pairs)
    else:
        torch.testing.assert_close(alone[0], mixed[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone_icg[0], other[2], rtol=1e-5, atol=1e-5)
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a = _gen(net, [7, 8], 1, guidance=Autoguidance(2.0, gnet))
    b = _gen(net, [1, 8, 7], 3, guidance=Autoguidance(2.0, gnet))
    assert (a[7].int() - b[7].int()).abs().max() <= 1 and (a[8].int() - b[8].int()).abs().max() <= 1


# --- generate_images and the CLI ----------------------------------------------------------------------


def test_generate_images_basic_and_errors():
    net = TinyNet()
    out = list(generate_images(net, range(5), batch=2, steps=4, class_idx=2))
    assert [s for s, _ in out] == [[0, 1], [2, 3], [4]]  # ceil(5 / 2) = 3 nearly equal consecutive batches
    imgs = torch.cat([i for _, i in out])
    assert imgs.dtype == torch.uint8 and imgs.shape == (5, 3, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        list(generate_images(net, [-1]))
    with pytest.raises(ValueError, match="out of range"):
        list(generate_images(net, [2**32]))
    with pytest.raises(TypeError, match="make_guidance"):
        list(generate_images(net, [0], guidance=2.0))  # the official gnet / weight form is make_guidance's
    with pytest.raises(ValueError, match="gnet"):
        make_guidance(None, 2.0, None)
    with pytest.raises(ValueError, match="unknown sampler"):
        list(generate_images(net, [0], sampler="ddim"))
    with pytest.raises(ValueError, match="class"):
        list(generate_images(net, [0], class_idx=4))
    with pytest.raises(ValueError, match="unconditional"):
        list(generate_images(TinyNet(label_dim=0), [0], class_idx=0))


def test_split_batches():
    seeds = list(range(10))
    parts = [split_batches(seeds, 3, r, 2) for r in range(2)]
    flat = sorted(s for p in parts for b in p for s in b)
    assert flat == seeds and len(parts[0]) == len(parts[1]) and all(len(b) <= 3 for p in parts for b in p)


def test_parse_seeds_and_interval():
    assert cli_common.parse_seeds("0-3") == [0, 1, 2, 3]
    assert cli_common.parse_seeds("1,5, 7-8") == [1, 5, 7, 8]
    for bad in ("a-b", "3-1", "1,,2", "-5", f"{2**32}"):
        with pytest.raises(ValueError):
            cli_common.parse_seeds(bad)
    assert cli_common.parse_interval("0.28,2.9") == (0.28, 2.9)
    for bad in ("1", "2,1", "x,y"):
        with pytest.raises(ValueError):
            cli_common.parse_interval(bad)


def _args(**kw):
    import argparse

    p = argparse.ArgumentParser()
    gen_cli.add_arguments(p)
    argv = ["--net", "unused"] + [f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k}" for k, v in kw.items()]
    return p.parse_args(argv + ["--no-progress"])


def _read_pngs(folder):
    from PIL import Image
    import numpy as np

    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".png"):
                out[os.path.relpath(os.path.join(root, f), folder)] = np.asarray(Image.open(os.path.join(root, f)))
    return out


def test_cli_run_writes_pngs_and_grid(tmp_path):
    args = _args(seeds="0-4,1000", outdir=str(tmp_path / "out"), subdirs=True, grid=str(tmp_path / "grid.png"),
                 batch=4, steps=3, device="cpu")
    assert gen_cli.run(gen_cli.parse_config(args), TinyNet()) == 0
    files = _read_pngs(tmp_path / "out")
    assert sorted(files) == ["000000/000000.png", "000000/000001.png", "000000/000002.png", "000000/000003.png",
                             "000000/000004.png", "001000/001000.png"]
    assert files["000000/000000.png"].shape == (8, 8, 3)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (24, 16)  # 6 images: 3 columns, 2 rows
    assert not [f for f in os.listdir(tmp_path / "out" / "000000") if ".tmp" in f]


def test_cli_main_errors(tmp_path, capsys):
    assert gen_cli.main(_args(outdir=str(tmp_path), guidance=2.0)) == 2
    assert "gnet" in capsys.readouterr().err
    assert gen_cli.main(_args(outdir=str(tmp_path), seeds="1-x")) == 2
    assert gen_cli.main(_args()) == 2  # nothing to write


def test_cli_every_sampler_and_its_options(tmp_path, capsys):
    """--sampler knows every sampler; sampler options reach the sampler (the images change) and an option the
    sampler has no use for exits 2 with the flag named, before any network is loaded."""
    from fastdiff.sampling import SAMPLERS

    parser = __import__("argparse").ArgumentParser()
    gen_cli.add_arguments(parser)
    for name in SAMPLERS:
        assert parser.parse_args(["--net", "x", "--sampler", name]).sampler == name
    out = {}
    for name, extra in [("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", dict(eta=0.3)), ("dpm_adaptive", dict(rtol=0.2)),
                        ("euler", dict(S_churn=20.0))]:
        args = _args(seeds="0-1", grid=str(tmp_path / "g.png"), steps=3, device="cpu", sampler=name, **extra)
        assert gen_cli.run(gen_cli.parse_config(args), TinyNet()) == 0
        out[(name, tuple(extra))] = (tmp_path / "g.png").read_bytes()
    assert out[("dpmpp_2m_sde", ())] != out[("dpmpp_2m_sde", ("eta",))]
    for flags, message in [(dict(sampler="dpmpp_2m", S_churn=2.0), "has no use for --S-churn"),
                           (dict(sampler="euler", S_noise=float("inf")), "--S-noise must be a finite number"),
                           (dict(sampler="heun", rtol=0.1), "takes no option 'rtol'"),
                           (dict(sampler="lms", eta=0.5), "has no use for --eta")]:
        assert gen_cli.main(_args(outdir=str(tmp_path), net="missing.safetensors", **flags)) == 2
        assert message in capsys.readouterr().err


def _dist_worker(rank, world, init_file, outdir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        args = _args(seeds="0-6", outdir=outdir, batch=2, steps=3, device="cpu", grid=os.path.join(outdir, "..", "grid2.png"))
        gen_cli.run(gen_cli.parse_config(args), TinyNet())
    finally:
        torch.distributed.destroy_process_group()


def test_cli_distributed_two_processes(tmp_path):
    import torch.multiprocessing as mp

    single = tmp_path / "single"
    gen_cli.run(gen_cli.parse_config(_args(seeds="0-6", outdir=str(single), batch=7, steps=3, device="cpu")),
                TinyNet())
    dist_dir = tmp_path / "dist" / "out"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(dist_dir)), nprocs=2, join=True)
    a, b = _read_pngs(single), _read_pngs(dist_dir)
    assert sorted(a) == sorted(b) and len(a) == 7
    for k in a:
        assert abs(a[k].astype(int) - b[k].astype(int)).max() <= 1, k
    assert (tmp_path / "dist" / "grid2.png").exists()


# --- the generate CLI's guidance methods ----------------------------------------------------------------


def _parse(*argv):
    return cli_args(gen_cli, *argv)


def _cli_images(tmp_path, name, net, gnet=None, flags=""):
    out = tmp_path / name
    args = _parse("--net", "unused", "--seeds", "0-3", "--outdir", out, "--batch", "4", "--steps", "3",
                  "--device", "cpu", "--no-progress", *flags.split())
    assert gen_cli.run(gen_cli.parse_config(args, has_gnet=gnet is not None), net, gnet) == 0
    return _read_pngs(out)


def _lib_images(net, guidance, seeds=range(4), steps=3):
    out = {}
    for s, imgs in generate_images(net, list(seeds), batch=4, steps=steps, device="cpu", guidance=guidance):
        out.update({f"{k:06d}.png": v.permute(1, 2, 0).numpy() for k, v in zip(s, imgs)})
    return out


def _same_images(a, b):
    assert sorted(a) == sorted(b) and a
    return all((a[k] == b[k]).all() for k in a)


COND_GUIDE, UNCOND_GUIDE = TinyNet(shift=0.2), TinyNet(label_dim=0, shift=0.3)
CLI_METHODS = [  # (flags, --gnet, the library object the flags must build)
    ("--guidance-method cfg --guidance 2.5", None, lambda: CFG(2.5)),
    ("--guidance-method cfg --guidance 2", UNCOND_GUIDE, lambda: CFG(2.0, uncond=UNCOND_GUIDE)),
    ("--guidance-method autoguidance --guidance 2", COND_GUIDE, lambda: Autoguidance(2.0, COND_GUIDE)),
    ("--guidance-method apg --guidance 3 --apg-eta 0.5 --apg-momentum -0.3 --apg-rescale 2", None,
     lambda: APG(3.0, eta=0.5, beta=-0.3, r=2.0)),
    ("--guidance-method apg --guidance 3", COND_GUIDE, lambda: APG(3.0, guide=COND_GUIDE)),
    ("--guidance-method icg --guidance 1.5", None, lambda: ICG(1.5)),
    ("--guidance-method tsg --guidance 2 --tsg-c-noise-scale 0.2", None, lambda: TSG(2.0, c_noise_scale=0.2)),
    ("--cads --cads-tau1 0.3", None, lambda: CADS(None, tau1=0.3)),
    ("--guidance-method apg --guidance 2 --interval 0.5,10", None, lambda: Interval(APG(2.0), sigma=(0.5, 10.0))),
    ("--guidance-method cfg --guidance 2 --interval 0.3,5 --cads --cads-s 0.5", None,
     lambda: CADS(Interval(CFG(2.0), sigma=(0.3, 5.0)), s=0.5)),
    ("--guidance 2 --cads --cads-tau2 0.95", COND_GUIDE, lambda: CADS(Autoguidance(2.0, COND_GUIDE), tau2=0.95)),
]


@pytest.mark.parametrize("flags,gnet,make", CLI_METHODS, ids=[c[0].replace("--", "") for c in CLI_METHODS])
def test_cli_guidance_methods(tmp_path, capsys, flags, gnet, make):
    """Every method from the command line builds the library's object (same images) and guides."""
    net = TinyNet()
    got = _cli_images(tmp_path, "cli", net, gnet, flags)
    line = capsys.readouterr().err
    method = flags.split()[1] if flags.startswith("--guidance-method") else "auto" if "--guidance " in flags else "none"
    assert f"fastdiff generate: guidance: {method}" in line
    assert ("cads (" in line) == ("--cads" in flags) and ("interval" in line) == ("--interval" in flags)
    assert _same_images(got, _lib_images(net, make()))
    assert not _same_images(got, _lib_images(net, None))


def test_cli_guidance_weight_one_is_unguided(tmp_path, capsys):
    """--guidance 1 with any method is the unguided baseline (for sweeps), and says so."""
    plain = _cli_images(tmp_path, "plain", TinyNet())
    assert "guidance: none" in capsys.readouterr().err
    for method in ("cfg", "apg", "icg", "tsg"):
        got = _cli_images(tmp_path, method, TinyNet(), flags=f"--guidance-method {method} --guidance 1")
        assert _same_images(got, plain)
        assert "no guidance" in capsys.readouterr().err


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    """Tiny fastdiff networks on disk: a conditional net, a conditional guide and an unconditional net."""
    import fastdiff.nn as fnn
    from fastdiff.io import save_network

    root = tmp_path_factory.mktemp("nets")
    small = {"model_channels": 8, "logvar_channels": 8, "use_fp16": False}
    torch.manual_seed(0)
    files = {}
    for name, label_dim in (("net", 10), ("gnet", 10), ("uncond", 0)):
        net = fnn.build("tiny-16", label_dim=label_dim, **small)
        with torch.no_grad():  # a freshly built EDM2 network outputs zeros (out_gain 0): give it some signal
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
        files[name] = root / f"{name}.safetensors"
        save_network(net, files[name])
    return files


COMMON = ("--seeds", "0-3", "--batch", "4", "--steps", "3", "--device", "cpu", "--no-progress")


def _main(*argv):
    return gen_cli.main(_parse(*argv))


def test_cli_old_invocation_unchanged(tmp_path, net_files):
    """--gnet X --guidance W [--interval] is the official autoguidance, bit for bit, as before."""
    from fastdiff.io import load_network

    flags = ("--gnet", net_files["gnet"], "--guidance", "2", "--interval", "0.3,5")
    assert _main("--net", net_files["net"], *flags, "--outdir", tmp_path / "old", *COMMON) == 0
    net, gnet = (load_network(net_files[k]).eval().requires_grad_(False) for k in ("net", "gnet"))
    ref = {}
    for s, imgs in generate_images(net, range(4), guidance=make_guidance(gnet, 2.0, (0.3, 5.0)), steps=3, batch=4,
                                   device="cpu"):
        ref.update({f"{k:06d}.png": v.permute(1, 2, 0).numpy() for k, v in zip(s, imgs)})
    old = _read_pngs(tmp_path / "old")
    assert _same_images(old, ref)
    assert _main("--net", net_files["net"], *flags, "--guidance-method", "autoguidance", "--outdir", tmp_path / "ag",
                 *COMMON) == 0
    assert _same_images(_read_pngs(tmp_path / "ag"), old)


def test_cli_null_label_cfg_matches_sample(tmp_path, net_files):
    """--guidance-method cfg without --gnet is sample(..., guidance=CFG(w)) with the generate seeds."""
    from fastdiff.io import load_network
    from fastdiff.sampling.generate import to_uint8

    assert _main("--net", net_files["net"], "--guidance-method", "cfg", "--guidance", "2.5", "--outdir",
                 tmp_path / "cfg", *COMMON) == 0
    net = load_network(net_files["net"]).eval().requires_grad_(False)
    gens = rng.seed_generators(range(4))
    noise, classes = [], []
    for g in gens:  # per seed: noise, then the class
        noise.append(torch.randn(3, 16, 16, generator=g))
        classes.append(int(torch.randint(net.label_dim, (1,), generator=g)))
    labels = torch.nn.functional.one_hot(torch.tensor(classes), net.label_dim).float()
    x = sample(net, torch.stack(noise), "heun", steps=3, labels=labels, generators=gens, guidance=CFG(2.5))
    ref = {f"{s:06d}.png": img.permute(1, 2, 0).numpy() for s, img in enumerate(to_uint8(x))}
    assert _same_images(_read_pngs(tmp_path / "cfg"), ref)


@pytest.mark.parametrize("flags,message", [
    ("--guidance nan --gnet g", "--guidance must be a finite"),
    ("--guidance 2", "--guidance-method cfg"),  # the old error, now pointing at null-label CFG too
    ("--guidance-method cfg", "needs a weight: give --guidance"),
    ("--guidance-method autoguidance --guidance 2", r"autoguidance needs a guiding network \(--gnet\)"),
    ("--guidance-method icg --guidance 2 --gnet g", "--gnet is not used"),
    ("--guidance-method tsg --guidance 2 --gnet g", "--gnet is not used"),
    ("--guidance-method cfg --guidance 2 --apg-eta 0.5", "--apg-eta is only used with --guidance-method apg"),
    ("--gnet g --guidance 2 --tsg-scale 0.5", "--tsg-scale is only used with --guidance-method tsg"),
    ("--guidance-method cfg --guidance 2 --cads-tau1 0.5", "--cads-tau1 is only used with --cads"),
    ("--guidance-method apg --guidance 2 --apg-rescale -1", "--apg-rescale must be"),
    ("--guidance-method apg --guidance 2 --apg-momentum 0.5", "--apg-momentum must be"),
    ("--cads --cads-psi 2", "--cads-psi must lie in"),
    ("--cads --cads-tau1 0.95", r"--cads-tau1 \(0.95\) must not exceed --cads-tau2 \(0.9\)"),
])
def test_cli_guidance_flag_errors(tmp_path, capsys, flags, message):
    """Flag errors are reported before any network is loaded (--net does not exist), naming the flag."""
    import re

    assert _main("--net", "missing.safetensors", "--outdir", tmp_path, *flags.split()) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdiff generate: error: ") and re.search(message, err), err


def test_cli_guidance_method_cads_points_at_the_flag(capsys):
    with pytest.raises(SystemExit):
        _parse("--net", "n", "--guidance-method", "cads")
    assert "add --cads to any method" in capsys.readouterr().err


@pytest.mark.parametrize("flags,net,gnet,message", [
    ("--guidance-method cfg --guidance 2", TinyNet(label_dim=0), None, "cfg needs a class-conditional --net"),
    ("--guidance-method icg --guidance 2", TinyNet(label_dim=0), None, "icg needs a class-conditional --net"),
    ("--guidance-method apg --guidance 2", TinyNet(label_dim=0), None, "apg without --gnet uses the null label"),
    ("--cads", TinyNet(label_dim=0), None, "--cads anneals the class condition"),
    ("--guidance-method cfg --guidance 2", TinyNet(), TinyNet(), "needs an unconditional --gnet"),
    ("--guidance-method autoguidance --guidance 2", TinyNet(), TinyNet(label_dim=3), "--gnet has label_dim 3"),
    ("--guidance 2", TinyNet(), TinyNet(res=4), "--gnet does not match --net: img_resolution 4 vs 8"),
    ("--guidance-method tsg --guidance 2 --tsg-scale 0.5", TinyNet(), None, "--tsg-scale has no effect"),
])
def test_cli_guidance_network_errors(tmp_path, flags, net, gnet, message):
    args = _parse("--net", "n", "--outdir", tmp_path, "--seeds", "0", "--steps", "1", "--device", "cpu", *flags.split())
    with pytest.raises(ValueError, match=message):
        gen_cli.run(gen_cli.parse_config(args, has_gnet=gnet is not None), net, gnet)
    assert not os.listdir(tmp_path)


def test_cli_guidance_network_error_exit_code(tmp_path, net_files, capsys):
    assert _main("--net", net_files["uncond"], "--guidance-method", "cfg", "--guidance", "2", "--outdir", tmp_path,
                 *COMMON) == 2
    assert "cfg needs a class-conditional --net" in capsys.readouterr().err
    # Where the library composes, unconditional networks work: APG and autoguidance by an unconditional guide, TSG.
    for flags in (("--guidance-method", "apg", "--gnet", net_files["uncond"]), ("--guidance-method", "tsg"),
                  ("--guidance-method", "autoguidance", "--gnet", net_files["uncond"])):
        assert _main("--net", net_files["uncond"], *flags, "--guidance", "2", "--outdir", tmp_path / flags[1],
                     *COMMON) == 0
        assert len(_read_pngs(tmp_path / flags[1])) == 4


# --- NVTX ---------------------------------------------------------------------------------------------


def test_nvtx_noop_when_disabled(monkeypatch):
    monkeypatch.setattr(_nvtx, "ENABLED", False)
    assert _nvtx.nvtx_range("a") is _nvtx.nvtx_range("b")
    with _nvtx.nvtx_range("x"):
        pass


def test_generate_cuda_graphs_flag_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    from fastdiff import nn as fnn
    from fastdiff.io import save_network

    save_network(fnn.build("tiny-16"), str(tmp_path / "n.safetensors"))
    assert gen_cli.main(_parse("--net", str(tmp_path / "n.safetensors"), "--outdir", str(tmp_path / "o"),
                               "--cuda-graphs", *COMMON)) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
