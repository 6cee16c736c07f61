"""The k-diffusion sampler set (DPM-2, DPM-2 ancestral, LMS, DPM++(2S) ancestral, DPM++ SDE, DPM++(2M)
SDE, DPM++(3M) SDE, adaptive DPM-Solver) against small re-implementations written here from the
published algorithms (the DPM-Solver / DPM-Solver++ papers and k-diffusion's documented update rules),
on analytic denoisers: the exact denoiser of a Gaussian (whose probability-flow ODE has a closed form,
so convergence orders can be checked) and of a Gaussian mixture (nonlinear). Same noise on both sides:
the ancestral samplers draw from the per-sample generators, the SDE samplers take a shared
noise_sampler. Also: guidance inside every sampler, per-sample seeds, the Brownian noise, and option
errors."""

import math

import pytest
import torch

from fastdiff.sampling import CFG, Autoguidance, rng, sample
from fastdiff.sampling import dpm
from fastdiff.sampling._loop import BrownianNoise
from fastdiff.sampling.adaptive import sample_dpm_adaptive
from fastdiff.sampling.samplers import SAMPLERS, edm_sigma_steps, sampler_function

NEW = ("dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
ANCESTRAL = ("dpm_2_ancestral", "dpmpp_2s_ancestral")


# --- analytic denoisers -------------------------------------------------------------------------------


class Gaussian:
    """Data ~ N(mu, s0^2 I): D(x; sigma) = mu + s0^2 / (s0^2 + sigma^2) (x - mu); the ODE solution from
    x(sigma_a) is x(sigma_b) = mu + sqrt((s0^2 + sigma_b^2) / (s0^2 + sigma_a^2)) (x(sigma_a) - mu)."""

    def __init__(self, mu=(0.3, -0.7, 1.1), s0=0.6):
        self.mu, self.s0 = torch.tensor(mu, dtype=torch.float64), s0

    def __call__(self, x, sigma, labels=None):
        s = sigma.double().reshape(-1, 1)
        return (self.mu + self.s0**2 / (self.s0**2 + s**2) * (x.double() - self.mu)).to(x.dtype)

    def exact(self, x, sigma_a, sigma_b):
        return self.mu + math.sqrt((self.s0**2 + sigma_b**2) / (self.s0**2 + sigma_a**2)) * (x - self.mu)


class Mixture:
    """Isotropic Gaussian mixture: D = E[x0 | x] exactly (nonlinear in x); labels pick a component."""

    def __init__(self, mus=((-2.0, 0.0), (2.0, 1.0), (0.0, -2.5)), s0=0.5, pi=(0.5, 0.3, 0.2)):
        self.mus, self.s0 = torch.tensor(mus, dtype=torch.float64), s0
        self.pi = torch.tensor(pi, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        x64, s = x.double(), sigma.double().reshape(-1, 1)
        var = self.s0**2 + s**2
        w = self.pi.expand(x.shape[0], -1)
        if labels is not None:
            rs = labels.double().sum(1, keepdim=True)
            w = torch.where(rs > 0, labels.double() / rs.clamp_min(1e-30), w)
        diff = x64[:, None, :] - self.mus[None]
        r = torch.softmax(torch.log(w.clamp_min(1e-300)) - (diff**2).sum(-1) / (2 * var), dim=1)
        return (r[:, :, None] * (self.mus[None] + (self.s0**2 / var)[:, :, None] * diff)).sum(1).to(x.dtype)


MIX = Mixture()


def scalar(den, labels=None):
    """The re-implementations call D(x, sigma) with a python float sigma."""
    return lambda x, s: den(x, torch.full((x.shape[0],), float(s), dtype=x.dtype), labels)


# --- the published algorithms, re-implemented -------------------------------------------------------
# Notation: lambda = -ln sigma (half log-SNR of the VE process), h = lambda_next - lambda. Ancestral step
# (DDPM posterior for the VE process, eta-scaled): up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)),
# down = sqrt(s'^2 - up^2).


def anc(s, s1, eta=1.0):
    up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2)) if eta else 0.0
    return math.sqrt(s1**2 - up**2), up


def ref_dpm_2(D, x, sig, randn=None, churn=0.0, tmin=0.0, tmax=math.inf, s_noise=1.0):
    n = len(sig) - 1
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        gamma = min(churn / n, 2**0.5 - 1) if churn > 0 and tmin <= s <= tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + randn(x) * s_noise * math.sqrt(s_hat**2 - s**2)
        d = (x - D(x, s_hat)) / s_hat
        if s1 == 0:
            x = x + d * (s1 - s_hat)
        else:
            mid = math.exp((math.log(s_hat) + math.log(s1)) / 2)  # the midpoint in log sigma
            x2 = x + d * (mid - s_hat)
            x = x + (x2 - D(x2, mid)) / mid * (s1 - s_hat)
    return x


def ref_dpm_2_ancestral(D, x, sig, randn, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        d = (x - D(x, s)) / s
        down, up = anc(s, s1, eta)
        if down == 0:
            x = x + d * (down - s)
        else:
            mid = math.exp((math.log(s) + math.log(down)) / 2)
            x2 = x + d * (mid - s)
            x = x + (x2 - D(x2, mid)) / mid * (down - s)
            x = x + randn(x) * s_noise * up
    return x


def ref_lms(D, x, sig, order=4):
    """Adams-Bashforth on the sigma grid: coefficients = integrals of the Lagrange basis (numerically, by
    composite Simpson's rule, which is exact for these cubic polynomials)."""
    ds = []
    for i in range(len(sig) - 1):
        ds = (ds + [(x - D(x, sig[i])) / sig[i]])[-order:]
        k = min(i + 1, order)

        def basis(tau, j):
            return math.prod((tau - sig[i - m]) / (sig[i - j] - sig[i - m]) for m in range(k) if m != j)

        a, b = sig[i], sig[i + 1]
        coeff = [(b - a) / 6 * (basis(a, j) + 4 * basis((a + b) / 2, j) + basis(b, j)) for j in range(k)]
        x = x + sum(c * d for c, d in zip(coeff, reversed(ds)))
    return x


def ref_dpmpp_2s_ancestral(D, x, sig, randn, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) to sigma_down, then ancestral noise."""
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        down, up = anc(s, s1, eta)
        if down == 0:
            x = den  # Euler to sigma = 0
        else:
            lam, lam_next = -math.log(s), -math.log(down)
            h = lam_next - lam
            s_mid = math.exp(-(lam + h / 2))
            u = (s_mid / s) * x + (1 - s_mid / s) * den
            x = (down / s) * x + (1 - down / s) * D(u, s_mid)
        if s1 > 0:
            x = x + randn(x) * s_noise * up
    return x


def ref_dpmpp_sde(D, x, sig, noise, eta=1.0, s_noise=1.0, r=0.5):
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
            continue
        lam, lam_next = -math.log(s), -math.log(s1)
        s_mid = math.exp(-(lam + r * (lam_next - lam)))
        down, up = anc(s, s_mid, eta)
        u = (down / s) * x + (1 - down / s) * den + noise(s, s_mid) * s_noise * up
        den_2 = D(u, s_mid)
        down, up = anc(s, s1, eta)
        mix = (1 - 1 / (2 * r)) * den + 1 / (2 * r) * den_2
        x = (down / s) * x + (1 - down / s) * mix + noise(s, s1) * s_noise * up
    return x


def ref_dpmpp_2m_sde(D, x, sig, noise, eta=1.0, s_noise=1.0, solver="midpoint"):
    prev, h_prev = None, None
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
        else:
            h = math.log(s / s1)
            a = 1 - math.exp(-(1 + eta) * h)  # 1 - e^{-(1 + eta) h}
            x = (s1 / s) * math.exp(-eta * h) * x + a * den
            if prev is not None:
                q = h / h_prev  # 1 / r
                if solver == "heun":
                    x = x + (a / (-(1 + eta) * h) + 1) * q * (den - prev)
                else:
                    x = x + 0.5 * a * q * (den - prev)
            if eta:
                x = x + noise(s, s1) * s1 * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise
            h_prev = h
        prev = den
    return x


def ref_dpmpp_3m_sde(D, x, sig, noise, eta=1.0, s_noise=1.0):
    hist = []  # (denoised, h) of the previous steps, newest first
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if s1 == 0:
            x = den
            continue
        h = math.log(s / s1)
        he = (1 + eta) * h
        x = math.exp(-he) * x + (1 - math.exp(-he)) * den
        phi2 = (math.exp(-he) - 1) / he + 1
        if len(hist) >= 2:
            (d1, h1), (d2, h2) = hist[0], hist[1]
            r0, r1 = h1 / h, h2 / h
            a = (den - d1) / r0
            b = (d1 - d2) / r1
            first = a + (a - b) * r0 / (r0 + r1)
            second = (a - b) / (r0 + r1)
            x = x + phi2 * first - (phi2 / he - 0.5) * second
        elif hist:
            d1, h1 = hist[0]
            x = x + phi2 * (den - d1) / (h1 / h)
        if eta:
            x = x + noise(s, s1) * s1 * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise
        hist = [(den, h)] + hist[:1]
    return x


def ref_dpm_adaptive(D, x, sigma_min, sigma_max, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                     icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-12/23 with PID step control (Lu et al. 2022, App. / k-diffusion's controller), one
    sample; eps re-evaluated at every attempt as published. Returns (x, nfe, accepts, rejects)."""
    nfe = 0

    def eps(x, lam):
        nonlocal nfe
        nfe += 1
        return (x - D(x, math.exp(-lam))) / math.exp(-lam)

    lam, lam_end = -math.log(sigma_max), -math.log(sigma_min)
    b = [(pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order]
    errs, h, x_prev, acc, rej = None, h_init, x, 0, 0
    while lam < lam_end - 1e-5:
        t = min(lam_end, lam + h)
        hh = t - lam
        e0 = eps(x, lam)
        base = x - math.exp(-t) * math.expm1(hh) * e0
        if order == 2:
            u1 = x - math.exp(-(lam + hh / 2)) * math.expm1(hh / 2) * e0
            low, high = base, base - math.exp(-t) * math.expm1(hh) * (eps(u1, lam + hh / 2) - e0)
        else:
            u1 = x - math.exp(-(lam + hh / 3)) * math.expm1(hh / 3) * e0
            e1 = eps(u1, lam + hh / 3)
            low = base - math.exp(-t) * 1.5 * math.expm1(hh) * (e1 - e0)
            s2 = lam + 2 * hh / 3
            u2 = (x - math.exp(-s2) * math.expm1(2 * hh / 3) * e0
                  - math.exp(-s2) * 2 * (math.expm1(2 * hh / 3) / (2 * hh / 3) - 1) * (e1 - e0))
            high = base - math.exp(-t) * 1.5 * (math.expm1(hh) / hh - 1) * (eps(u2, s2) - e0)
        delta = torch.maximum(torch.tensor(atol, dtype=x.dtype), rtol * torch.maximum(low.abs(), x_prev.abs()))
        err = float(((low - high) / delta).norm() / math.sqrt(x.numel()))
        inv = 1 / (err + 1e-8)
        errs = [inv, inv, inv] if errs is None else [inv] + errs[1:]
        factor = 1 + math.atan(errs[0] ** b[0] * errs[1] ** b[1] * errs[2] ** b[2] - 1)
        if factor >= accept_safety:
            errs = [errs[0], errs[0], errs[1]]
            x_prev, x, lam, acc = low, high, t, acc + 1
        else:
            rej += 1
        h *= factor
    return x, nfe, acc, rej


REFS = {"dpm_2": ref_dpm_2, "dpm_2_ancestral": ref_dpm_2_ancestral, "lms": ref_lms,
        "dpmpp_2s_ancestral": ref_dpmpp_2s_ancestral, "dpmpp_sde": ref_dpmpp_sde, "dpmpp_2m_sde": ref_dpmpp_2m_sde,
        "dpmpp_3m_sde": ref_dpmpp_3m_sde}


class TableNoise:
    """A fixed noise_sampler for both sides: the k-th call returns the k-th standard normal of a seeded
    table (whatever the sigmas), so two implementations that query in the same order see the same noise."""

    def __init__(self, shape, seed=7):
        self.g, self.shape, self.calls = torch.Generator().manual_seed(seed), shape, 0

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        return torch.randn(self.shape, generator=self.g, dtype=torch.float64)


def _noise(n=5, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _run_both(name, den, x0, sigmas, seeds=range(5), **kw):
    """(fastdiff's result, the re-implementation's) with the same noise."""
    sig = [float(s) for s in sigmas]
    fn = sampler_function(name)
    if name in SDE:
        got = fn(den, x0 * sig[0], sigmas, noise_sampler=TableNoise(x0.shape), **kw)
        want = REFS[name](scalar(den), x0 * sig[0], sig, TableNoise(x0.shape), **kw)
    elif name in ANCESTRAL or kw.get("s_churn"):
        got = fn(den, x0 * sig[0], sigmas, generators=rng.seed_generators(seeds), **kw)
        gens = rng.seed_generators(seeds)
        rkw = {{"s_churn": "churn", "s_tmin": "tmin", "s_tmax": "tmax"}.get(k, k): v for k, v in kw.items()}
        want = REFS[name](scalar(den), x0 * sig[0], sig, lambda x: rng.randn_like(x, gens), **rkw)
    else:
        got = fn(den, x0 * sig[0], sigmas, **kw)
        want = REFS[name](scalar(den), x0 * sig[0], sig, **kw)
    return got, want


# --- each sampler = its published algorithm -------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_matches_published_algorithm_on_a_mixture(name):
    got, want = _run_both(name, MIX, _noise(), edm_sigma_steps(9))
    _close(got, want, 1e-9)


@pytest.mark.parametrize("name,kw", [
    ("dpm_2", dict(s_churn=30.0, s_tmin=0.05, s_tmax=20.0, s_noise=1.007)),
    ("dpm_2_ancestral", dict(eta=0.6, s_noise=0.9)), ("dpmpp_2s_ancestral", dict(eta=0.5, s_noise=1.1)),
    ("dpmpp_sde", dict(eta=0.7, s_noise=0.95, r=0.4)), ("dpmpp_2m_sde", dict(eta=0.5, s_noise=1.05)),
    ("dpmpp_2m_sde", dict(solver_type="heun")), ("dpmpp_3m_sde", dict(eta=0.4, s_noise=0.9)),
    ("dpmpp_2m_sde", dict(eta=0.0)), ("lms", dict(order=3)),
])
def test_options_match_published_algorithm(name, kw):
    sigmas = edm_sigma_steps(7)
    if name == "dpmpp_2m_sde" and "solver_type" in kw:
        got = dpm.sample_dpmpp_2m_sde(MIX, _noise() * 80, sigmas, noise_sampler=TableNoise((5, 2)), solver_type="heun")
        want = ref_dpmpp_2m_sde(scalar(MIX), _noise() * 80, [float(s) for s in sigmas], TableNoise((5, 2)), solver="heun")
    else:
        got, want = _run_both(name, MIX, _noise(), sigmas, **kw)
    _close(got, want, 1e-9)


def test_lms_coefficients_are_exact_integrals():
    sig = [float(s) for s in edm_sigma_steps(6)]
    for i in range(3, 6):
        for j in range(4):
            c = dpm.lms_coefficient(4, sig, i, j)
            # the Lagrange basis sums to 1: the coefficients sum to the step length
            assert math.isfinite(c)
        assert abs(sum(dpm.lms_coefficient(4, sig, i, j) for j in range(4)) - (sig[i + 1] - sig[i])) < 1e-9
    with pytest.raises(ValueError, match="earlier steps"):
        dpm.lms_coefficient(4, sig, 1, 0)


def test_adaptive_matches_published_algorithm_per_sample():
    """Each sample of a batch follows the published controller run on that sample alone; the evaluation
    at the start of an attempt is kept across rejections (the published code repeats it)."""
    x0 = _noise(4) * 80
    info = {}
    got = sample_dpm_adaptive(MIX, x0, 0.002, 80.0, rtol=0.02, atol=0.002, info=info)
    for k in range(4):
        want, nfe, acc, rej = ref_dpm_adaptive(scalar(MIX), x0[k:k + 1], 0.002, 80.0, 3, rtol=0.02, atol=0.002)
        _close(got[k:k + 1], want, 1e-8)
        assert int(info["n_accept"][k]) == acc and int(info["n_reject"][k]) == rej
        assert int(info["nfe"][k]) == nfe - rej
    assert info["evaluations"] == MIX_calls_of(lambda d: sample_dpm_adaptive(d, x0, 0.002, 80.0, rtol=0.02, atol=0.002))
    got2 = sample_dpm_adaptive(MIX, x0[:1], 0.002, 80.0, order=2, rtol=0.05)
    want2, *_ = ref_dpm_adaptive(scalar(MIX), x0[:1], 0.002, 80.0, 2, rtol=0.05)
    _close(got2, want2, 1e-8)


def MIX_calls_of(run) -> int:
    m = Mixture()
    run(m)
    return m.calls


def test_adaptive_reports_evaluations_and_tolerance_buys_accuracy():
    gauss = Gaussian()
    x0 = _noise(3, 3) * 80
    want = gauss.exact(x0, 80.0, 0.002)
    errors, costs = [], []
    for rtol in (0.1, 0.01, 0.001):
        info = {}
        x = sample(gauss, x0 / 80, "dpm_adaptive", dtype=torch.float64, info=info, rtol=rtol, atol=rtol / 10)
        errors.append(float((x - want).abs().max()))
        costs.append(int(info["nfe"].sum()))
        assert info["evaluations"] > 0
    assert errors[0] > errors[1] > errors[2] and costs[0] < costs[1] < costs[2]


# --- convergence on the Gaussian, where the ODE has a closed form ------------------------------------


def _order(name, steps=(12, 24)):
    gauss = Gaussian()
    x0 = _noise(3, 3)
    errs = []
    for n in steps:
        sig = edm_sigma_steps(n, 0.05, 20.0)[:-1]  # end at sigma_min: no final jump to 0
        x = sampler_function(name)(gauss, x0 * 20.0, sig)
        errs.append(float((x - gauss.exact(x0 * 20.0, 20.0, 0.05)).abs().max()))
    return math.log2(errs[0] / errs[1])


@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpm_2", 2), ("dpmpp_2m", 2), ("lms", 3)])
def test_convergence_order_on_gaussian(name, order):
    """Observed order of the deterministic samplers from halving the step, 12 -> 24 steps (measured: 1.01,
    2.16, 2.2, 1.94, 3.2; LMS of order 4 runs its first steps at lower orders)."""
    p = _order(name)
    assert order - 0.25 < p < order + 1.6, p


def test_sde_samplers_without_noise_are_their_odes():
    """eta = 0 removes the noise: DPM++(2M) SDE is then DPM++(2M) (midpoint form), 3M SDE a 3rd-order
    multistep, and both converge to the ODE solution."""
    gauss = Gaussian()
    x0 = _noise(3, 3)
    sig = edm_sigma_steps(16, 0.05, 20.0)[:-1]
    _close(dpm.sample_dpmpp_2m_sde(gauss, x0 * 20, sig, eta=0.0),
           sampler_function("dpmpp_2m")(gauss, x0 * 20, sig), 1e-9)
    want = gauss.exact(x0 * 20, 20.0, 0.05)
    e2 = float((dpm.sample_dpmpp_2m_sde(gauss, x0 * 20, sig, eta=0.0) - want).abs().max())
    e3 = float((dpm.sample_dpmpp_3m_sde(gauss, x0 * 20, sig, eta=0.0) - want).abs().max())
    assert e3 < e2 < 0.05


def test_sde_samplers_sample_the_data_distribution():
    """With noise, the SDE and ancestral samplers still land on N(mu, s0^2): mean and std of many samples
    (48 steps: with few large steps they are visibly off, e.g. std 0.84 for DPM++(2M) SDE at 12 steps)."""
    gauss = Gaussian(mu=(0.5,), s0=0.7)
    n = 2000
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for name in SDE + ANCESTRAL:
        x = _seeded(gauss, x0, name)
        assert abs(float(x.mean()) - 0.5) < 0.06 and abs(float(x.std()) - 0.7) < 0.05, name


def _seeded(gauss, x0, name):
    torch.manual_seed(11)  # torch's global generator: one batched draw per noise call (fast for 2000 rows)
    return sample(gauss, x0, name, steps=48, dtype=torch.float64)


# --- guidance, seeds, noise -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW + ("dpm_adaptive",))
def test_guidance_is_applied_at_every_evaluation(name):
    """Autoguidance inside the sampler = the sampler on the guided denoiser D0 + w (D1 - D0)."""
    guide = Mixture(s0=0.8)
    w = 1.8
    guided = lambda x, s, lab: guide(x, s, lab) + w * (MIX(x, s, lab) - guide(x, s, lab))  # noqa: E731
    kw = dict(dtype=torch.float64, steps=6)
    if name in SDE + ANCESTRAL:
        a = sample(MIX, _noise(), name, guidance=Autoguidance(w, guide), generators=rng.seed_generators(range(5)), **kw)
        b = sample(guided, _noise(), name, generators=rng.seed_generators(range(5)), **kw)
    else:
        a = sample(MIX, _noise(), name, guidance=Autoguidance(w, guide), **kw)
        b = sample(guided, _noise(), name, **kw)
    _close(a, b, 1e-9)
    assert not torch.allclose(a, sample(MIX, _noise(), name, generators=rng.seed_generators(range(5)), **kw))


def test_cfg_batched_forward_in_new_samplers():
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).double()
    m = Mixture()
    sample(m, _noise(), "dpm_2", steps=4, guidance=CFG(2.0), labels=labels, dtype=torch.float64)
    assert m.calls == 7  # 2 per step, 1 on the last: each a single batched forward of both branches


@pytest.mark.parametrize("name", [s for s in SAMPLERS if s not in ("dpmpp_2m", "lms")])
def test_a_sample_depends_on_its_seed_only(name):
    seeds = [4, 9, 13]
    noise = _noise(3)
    kw = dict(dtype=torch.float64, steps=5)
    if name in ("heun", "euler", "dpm_2"):
        kw["S_churn"] = 5.0
    if name == "dpm_adaptive":
        kw["eta"] = 0.5
    full = sample(MIX, noise, name, generators=rng.seed_generators(seeds), **kw)
    alone = sample(MIX, noise[1:2], name, generators=rng.seed_generators(seeds[1:2]), **kw)
    _close(full[1:2], alone, 1e-12)
    other = sample(MIX, noise, name, generators=rng.seed_generators([4, 10, 13]), **kw)
    assert not torch.allclose(other[1], full[1])


def test_brownian_noise_is_a_brownian_path():
    """Increments of a sub-step and of its whole step are correlated as on one path: with z1, z2 the
    draws, noise(s, m) = z1 and noise(s, s') = (sqrt(s - m) z1 + sqrt(m - s') z2) / sqrt(s - s'); a new
    start draws afresh; a point between two known ones comes from the bridge."""
    draws = iter([torch.tensor([1.5]), torch.tensor([-0.5]), torch.tensor([0.25]), torch.tensor([2.0])])
    b = BrownianNoise(torch.zeros(1, dtype=torch.float64), lambda x: next(draws))
    assert float(b(4.0, 3.0)) == pytest.approx(1.5)
    assert float(b(4.0, 1.0)) == pytest.approx((1.0 * 1.5 + math.sqrt(2.0) * -0.5) / math.sqrt(3.0))
    w1 = 1.5 + math.sqrt(2.0) * -0.5  # W(1) - W(4); W(3) - W(4) = 1.5
    w_mid = float(b(4.0, 2.0)) * math.sqrt(2.0)  # W(2) from the bridge between W(3) and W(1)
    assert w_mid == pytest.approx(1.5 + 0.5 * (w1 - 1.5) + math.sqrt(0.5) * 0.25)
    assert float(b(1.0, 0.5)) == pytest.approx(2.0)  # the next step starts afresh
    # the law: unit variance, and the right correlation between the two queries of a step
    gens = rng.seed_generators(range(4000))
    x = torch.zeros(4000, 1, dtype=torch.float64)
    b = BrownianNoise(x, lambda like: rng.randn_like(like, gens))
    n1, n2 = b(2.0, 1.5), b(2.0, 0.5)
    assert abs(float(n1.std()) - 1) < 0.05 and abs(float(n2.std()) - 1) < 0.05
    assert abs(float((n1 * n2).mean()) - math.sqrt(0.5 / 1.5)) < 0.05


# --- options ----------------------------------------------------------------------------------------------


def test_option_errors():
    x = _noise()
    with pytest.raises(ValueError, match="no use for S_churn"):
        sample(MIX, x, "dpmpp_2m", steps=3, S_churn=1.0)
    with pytest.raises(ValueError, match="no use for S_churn"):
        sample(MIX, x, "euler_ancestral", steps=3, S_churn=1.0)
    with pytest.raises(ValueError, match="no use for eta"):
        sample(MIX, x, "lms", steps=3, eta=0.5)
    with pytest.raises(ValueError, match="no use for S_noise"):
        sample(MIX, x, "dpmpp_2m", steps=3, S_noise=1.1)
    with pytest.raises(ValueError, match="takes no option 'rtol'"):
        sample(MIX, x, "heun", steps=3, rtol=0.1)
    with pytest.raises(ValueError, match="S_churn must be a finite number >= 0"):
        sample(MIX, x, "heun", steps=3, S_churn=-1.0)
    with pytest.raises(ValueError, match="S_noise must be"):
        sample(MIX, x, "euler", steps=3, S_noise=float("nan"))
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        sample(MIX, x, "dpm_adaptive", order=4)
    with pytest.raises(ValueError, match="solver_type"):
        sample(MIX, x, "dpmpp_2m_sde", steps=3, solver_type="rk4")
    # the CLI's defaults (S_churn 0, S_min 0, S_max inf, S_noise 1) are fine with every sampler
    for name in SAMPLERS:
        sample(MIX, x, name, steps=2, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, dtype=torch.float64)
