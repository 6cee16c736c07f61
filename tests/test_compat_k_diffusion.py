"""``fastdiff.compat.k_diffusion.sampling`` against the real ``k_diffusion.sampling`` (k-diffusion 0.1.1,
installed with ``pip install --no-deps k-diffusion==0.1.1.post1``; skipped without it): the same names and
signatures, the same schedules, and the same trajectories (final samples and every callback dict) in float64
for every sampler: the deterministic ones as they are, the churn ones from the same torch seed, the ancestral
and SDE ones given the same ``noise_sampler`` (and the ancestral ones from the same seed with the default).

Without the package, the drop-in is still tested against the published algorithms written out (the ones of
tests/test_samplers_kdiffusion.py and four more here): its plumbing (``extra_args``, the per-step
``noise_sampler``, the callback dict, the churn noise's draws) around fastdiff's samplers.

k-diffusion's package ``__init__`` imports its training stack (``skimage``, ``torchvision``, ``clip``...); only
``k_diffusion.sampling`` is loaded here, with small stand-ins for the three modules it imports and never uses
on these paths (``torchdiffeq``, ``torchsde``, ``torchvision``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import types

import pytest
import torch

from fastdiff.compat.k_diffusion import sampling as F

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def K():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    names = ("torchdiffeq", "torchsde", "torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {k: sys.modules.get(k) for k in names}

    def unused(*args, **kwargs):
        raise AssertionError("a stand-in of k-diffusion's optional dependencies was called")

    stubs = {"torchdiffeq": dict(odeint=unused), "torchsde": dict(BrownianTree=unused), "torchvision": {},
             "torchvision.transforms": {}, "torchvision.transforms.functional": dict(to_tensor=unused)}
    try:
        for name, attrs in stubs.items():
            if saved[name] is None:
                mod = types.ModuleType(name)
                mod.__dict__.update(attrs)
                sys.modules[name] = mod
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
        pkg = types.ModuleType("k_diffusion")  # the package without its __init__ (training-only imports)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = pkg
        try:
            mod = importlib.import_module("k_diffusion.sampling")
        except ImportError as exc:
            pytest.skip(f"k_diffusion.sampling cannot be imported here: {exc}")
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Model:
    """A nonlinear k-diffusion model: the exact denoiser of a Gaussian mixture over the flattened sample, the
    components weighted by ``cond`` (one-hot rows, an extra argument) and sharpened by ``scale``."""

    def __init__(self, d):
        g = torch.Generator().manual_seed(3)
        self.mus = torch.randn(3, d, generator=g, dtype=torch.float64) * 1.5
        self.s0 = 0.4
        self.calls = 0

    def __call__(self, x, sigma, cond=None, scale=1.0):
        self.calls += 1
        n = x.shape[0]
        flat, s = x.reshape(n, -1).double(), sigma.double().reshape(-1, 1)
        var = self.s0**2 + s**2
        logits = -((flat[:, None] - self.mus[None]) ** 2).sum(-1) / (2 * var) * scale
        if cond is not None:
            logits = logits + torch.log(cond.double() * 0.8 + 0.1)
        w = logits.softmax(-1)
        mean = self.mus[None] + (self.s0**2 / var)[:, :, None] * (flat[:, None] - self.mus[None])
        return (w[:, :, None] * mean).sum(1).reshape(x.shape).to(x.dtype)


SHAPE = (3, 2, 4, 4)
COND = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), 3).double()


def _inputs(steps=10, sigma_max=20.0):
    sigmas = F.get_sigmas_karras(steps, 0.02, sigma_max).double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    return x, sigmas


class CountedNoise:
    """A noise sampler by call order (shared by both sides: each gets its own copy)."""

    def __init__(self, seed=5):
        self.g = torch.Generator().manual_seed(seed)
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(SHAPE, generator=self.g, dtype=torch.float64)


def _trace(module, name, seed=None, **kw):
    x, sigmas = _inputs()
    model, steps = Model(32), []
    if seed is not None:
        torch.manual_seed(seed)
    out = getattr(module, name)(model, x, sigmas, extra_args={"cond": COND, "scale": 0.7}, disable=True,
                                callback=lambda d: steps.append({**d, "calls": model.calls}), **kw)
    return out, steps, model.calls, torch.get_rng_state()


def _same(a, b, tol=1e-6):
    out_a, steps_a, calls_a, _ = a
    out_b, steps_b, calls_b, _ = b
    scale = max(out_b.abs().max().item(), 1.0)
    assert (out_a - out_b).abs().max().item() <= tol * scale
    assert calls_a == calls_b
    assert len(steps_a) == len(steps_b)
    for da, db in zip(steps_a, steps_b):
        assert da.keys() == db.keys() and da["i"] == db["i"]
        assert da["calls"] == db["calls"]  # called at the same point: after the step's first model call
        for key in ("x", "denoised"):
            assert (da[key] - db[key]).abs().max().item() <= tol * max(db[key].abs().max().item(), 1.0), key
        for key in ("sigma", "sigma_hat"):
            assert float(da[key]) == pytest.approx(float(db[key]), rel=1e-12, abs=1e-12), key


DETERMINISTIC = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_match_k_diffusion(K, name):
    _same(_trace(F, name), _trace(K, name))


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_churn_matches_k_diffusion_from_the_same_seed(K, name):
    kw = dict(s_churn=4.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)
    ours, theirs = _trace(F, name, seed=11, **kw), _trace(K, name, seed=11, **kw)
    _same(ours, theirs)
    assert any(float(d["sigma_hat"]) != float(d["sigma"]) for d in ours[1])  # churn happened
    assert torch.equal(ours[3], theirs[3])  # the global generator ends in the same state: the same draws


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_ancestral_samplers_match_k_diffusion(K, name, eta):
    a, b = CountedNoise(), CountedNoise()
    _same(_trace(F, name, eta=eta, s_noise=0.9, noise_sampler=a), _trace(K, name, eta=eta, s_noise=0.9,
                                                                        noise_sampler=b))
    assert a.calls and [pytest.approx(c) for c in a.calls] == b.calls
    # the default noise sampler: torch's global generator, drawn at the same steps
    _same(_trace(F, name, seed=4, eta=eta), _trace(K, name, seed=4, eta=eta))


@pytest.mark.parametrize("name, kw", [("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", dict(r=0.3, eta=0.7)),
                                      ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", dict(solver_type="heun")),
                                      ("sample_dpmpp_2m_sde", dict(eta=0.0)), ("sample_dpmpp_3m_sde", {}),
                                      ("sample_dpmpp_3m_sde", dict(eta=0.5, s_noise=1.1))])
def test_sde_samplers_match_k_diffusion_given_the_noise(K, name, kw):
    a, b = CountedNoise(), CountedNoise()
    _same(_trace(F, name, noise_sampler=a, **kw), _trace(K, name, noise_sampler=b, **kw))
    assert len(a.calls) == len(b.calls) == (0 if kw.get("eta") == 0 else len(a.calls)) and (a.calls or kw)


def _dpm(module, name, **kw):
    x, _ = _inputs()
    model, steps = Model(32), []
    out = getattr(module, name)(model, x, 0.02, 20.0, extra_args={"cond": COND}, disable=True,
                                callback=steps.append, **kw)
    return out, steps, model


@pytest.mark.parametrize("n", [9, 10, 11])
def test_dpm_fast_matches_k_diffusion(K, n):
    (a, sa, ma), (b, sb, mb) = _dpm(F, "sample_dpm_fast", n=n), _dpm(K, "sample_dpm_fast", n=n)
    assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()
    assert ma.calls == mb.calls == n and len(sa) == len(sb)
    for da, db in zip(sa, sb):
        assert (da["denoised"] - db["denoised"]).abs().max().item() <= 1e-6 * db["denoised"].abs().max().item()
        assert float(da["sigma"]) == pytest.approx(float(db["sigma"]), rel=1e-6)


@pytest.mark.parametrize("kw", [dict(order=3), dict(order=2, rtol=0.02), dict(order=3, pcoeff=0.3, dcoeff=0.1,
                                                                              h_init=0.5)])
def test_dpm_adaptive_matches_k_diffusion(K, kw):
    (a, info_a), sa, ma = _dpm(F, "sample_dpm_adaptive", return_info=True, **kw)
    (b, info_b), sb, mb = _dpm(K, "sample_dpm_adaptive", return_info=True, **kw)
    assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()
    assert (info_a["steps"], info_a["n_accept"], info_a["n_reject"]) == (info_b["steps"], info_b["n_accept"],
                                                                        info_b["n_reject"])
    # a rejected attempt keeps its evaluation here instead of repeating it
    assert info_a["nfe"] == ma.calls == mb.calls - info_b["n_reject"] and info_b["nfe"] == mb.calls
    assert [d["i"] for d in sa] == [d["i"] for d in sb] and sa[-1].keys() == sb[-1].keys()


def test_dpm_adaptive_ancestral_given_the_noise(K):
    a, b = CountedNoise(), CountedNoise()
    (x_a, _, _), (x_b, _, _) = (_dpm(F, "sample_dpm_adaptive", eta=0.5, noise_sampler=a),
                                _dpm(K, "sample_dpm_adaptive", eta=0.5, noise_sampler=b))
    # k-diffusion computes the DPM-Solver coefficients from float32 times (t = -log(torch.tensor(sigma))),
    # fastdiff in float64 from the same times: ~1e-7 per step, summed over the ~30 ancestral steps
    assert (x_a - x_b).abs().max().item() <= 1e-5 * x_b.abs().max().item() and len(a.calls) == len(b.calls)


def test_schedules_and_helpers_are_k_diffusions(K):
    for name, args in (("get_sigmas_karras", (12, 0.002, 80.0)), ("get_sigmas_karras", (5, 0.03, 14.6, 3.0)),
                       ("get_sigmas_exponential", (9, 0.01, 50.0)), ("get_sigmas_polyexponential", (9, 0.01, 50.0, 2.0)),
                       ("get_sigmas_vp", (7,)), ("get_sigmas_vp", (7, 10.0, 0.2, 1e-2))):
        ours, theirs = getattr(F, name)(*args), getattr(K, name)(*args)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    x, sigmas = _inputs()
    d = torch.randn(SHAPE, dtype=torch.float64)
    assert torch.equal(F.to_d(x, sigmas[2], d), K.to_d(x, sigmas[2], d))
    assert torch.equal(F.to_d(x, sigmas[2] * torch.ones(3), d), K.to_d(x, sigmas[2] * torch.ones(3), d))
    assert F.get_ancestral_step(3.0, 1.5, 0.7) == K.get_ancestral_step(3.0, 1.5, 0.7)
    assert F.get_ancestral_step(3.0, 1.5, 0) == K.get_ancestral_step(3.0, 1.5, 0)
    grid = sigmas.numpy()
    for order, i, j in ((1, 0, 0), (2, 3, 1), (3, 5, 2), (4, 7, 0), (4, 7, 3)):
        assert F.linear_multistep_coeff(order, grid, i, j) == pytest.approx(K.linear_multistep_coeff(order, grid, i, j),
                                                                            rel=1e-9, abs=1e-12)
    torch.manual_seed(0)
    a = F.default_noise_sampler(x)(1.0, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, K.default_noise_sampler(x)(1.0, 0.5))


def test_same_names_and_signatures(K):
    for name in F.__all__:
        theirs = getattr(K, name)
        if name == "BrownianTreeNoiseSampler":
            theirs = theirs.__init__
            ours = F.BrownianTreeNoiseSampler.__init__
        else:
            ours = getattr(F, name)
        po, pt = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        assert list(po) == list(pt), name
        for p in pt:
            if p == "transform":
                continue
            assert po[p].default == pt[p].default, (name, p)


def test_brownian_noise_sampler_seeded_and_per_sample():
    x = torch.zeros(4, 3, dtype=torch.float64)
    a = F.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=3)
    b = F.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=3)
    assert torch.equal(a(5.0, 2.0), b(5.0, 2.0)) and a(5.0, 2.0).shape == x.shape
    per = F.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=[1, 2, 3, 4])
    solo = F.BrownianTreeNoiseSampler(x[2:3], 0.1, 10.0, seed=[3])
    assert torch.equal(per(5.0, 2.0)[2:3], solo(5.0, 2.0))  # a sample's noise depends on its own seed only
    with pytest.raises(ValueError, match="2 seeds for a batch of 4"):
        F.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=[1, 2])


def test_drop_in_runs_a_fastdiff_network_through_as_kdiffusion():
    """The usual k-diffusion setup with a fastdiff network: ``as_kdiffusion(net)`` as the model, class labels
    as an extra argument, equal to fastdiff's own sampler on the same noise."""
    from conftest import tiny_net

    from fastdiff.sampling import as_kdiffusion, sample

    net = tiny_net().eval()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 7])
    sigmas = F.get_sigmas_karras(4, 0.002, 80.0)
    with torch.no_grad():
        got = F.sample_heun(as_kdiffusion(net), noise * sigmas[0], sigmas, extra_args={"class_labels": labels},
                            disable=True)
        want = sample(net, noise, "heun", sigmas=sigmas, labels=torch.nn.functional.one_hot(labels, 10).float())
    assert torch.equal(got, want)


# --- without the package: the published algorithms (these run everywhere) -------------------------------------


def _ref_euler(D, x, sig, randn=None, churn=0.0, s_noise=1.0):
    """Karras et al. (2022) Algorithm 2 with Euler steps; k-diffusion draws the churn noise on every step."""
    n = len(sig) - 1
    for i in range(n):
        s, s1 = sig[i], sig[i + 1]
        gamma = min(churn / n, 2**0.5 - 1) if churn > 0 else 0.0
        eps = randn(x) if randn is not None else None
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + eps * s_noise * (s_hat**2 - s**2) ** 0.5
        x = x + (x - D(x, s_hat)) / s_hat * (s1 - s_hat)
    return x


def _ref_heun(D, x, sig):
    """Karras et al. (2022) Algorithm 1: Heun steps, Euler on the step to 0."""
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        d = (x - D(x, s)) / s
        x2 = x + d * (s1 - s)
        x = x2 if s1 == 0 else x + (d + (x2 - D(x2, s1)) / s1) / 2 * (s1 - s)
    return x


def _ref_euler_ancestral(D, x, sig, randn, eta=1.0, s_noise=1.0):
    from test_samplers_kdiffusion import anc

    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        down, up = anc(s, s1, eta)
        x = x + (x - D(x, s)) / s * (down - s)
        if s1 > 0:
            x = x + randn(x) * s_noise * up
    return x


def _ref_dpmpp_2m(D, x, sig):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) in sigma: first order on the first and last step."""
    prev, h_prev = None, None
    for i in range(len(sig) - 1):
        s, s1 = sig[i], sig[i + 1]
        den = D(x, s)
        if prev is None or s1 == 0:
            x = (s1 / s) * x + (1 - s1 / s) * den
        else:
            h = math.log(s / s1)
            r = h_prev / h
            x = (s1 / s) * x + (1 - s1 / s) * ((1 + 1 / (2 * r)) * den - 1 / (2 * r) * prev)
        if s1 > 0:
            h_prev = math.log(s / s1)
        prev = den
    return x


def _published():
    from test_samplers_kdiffusion import REFS

    refs = {f"sample_{k}": v for k, v in REFS.items()}
    refs.update(sample_euler=_ref_euler, sample_heun=_ref_heun, sample_euler_ancestral=_ref_euler_ancestral,
                sample_dpmpp_2m=_ref_dpmpp_2m)
    return refs


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
                                  "sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_drop_in_matches_the_published_algorithms(name):
    """The drop-in's plumbing (extra_args, noise_sampler by step, the callback dict) around fastdiff's samplers,
    against the published algorithms written out (no k-diffusion needed)."""
    import math as _math

    x, sigmas = _inputs(8)
    sig = [float(s) for s in sigmas]
    model = Model(32)

    def D(x, s):
        return model(x, torch.full((x.shape[0],), float(s), dtype=x.dtype), cond=COND, scale=0.7)

    steps = []
    kw = dict(extra_args={"cond": COND, "scale": 0.7}, disable=True, callback=steps.append)
    ref = _published()[name]
    if "ancestral" in name:
        got = getattr(F, name)(model, x, sigmas, noise_sampler=CountedNoise(), eta=0.8, **kw)
        noise = CountedNoise()
        want = ref(D, x, sig, lambda like: noise(0, 0), eta=0.8)
    elif "sde" in name:
        got = getattr(F, name)(model, x, sigmas, noise_sampler=CountedNoise(), **kw)
        want = ref(D, x, sig, CountedNoise())
    else:
        got = getattr(F, name)(model, x, sigmas, **kw)
        want = ref(D, x, sig)
    assert (got - want).abs().max().item() <= 1e-8 * want.abs().max().item()
    assert [d["i"] for d in steps] == list(range(len(sig) - 1))
    assert all(sorted(d) == ["denoised", "i", "sigma", "sigma_hat", "x"] for d in steps)
    first = steps[0]
    assert torch.equal(first["x"], x) and float(first["sigma"]) == sig[0] and _math.isclose(float(first["sigma_hat"]),
                                                                                            sig[0])
    assert torch.allclose(first["denoised"], D(x, sig[0]))


def test_churn_noise_is_drawn_as_k_diffusion_draws_it():
    """From the same torch seed, the churn of ``sample_euler`` equals Algorithm 2 drawing one normal per step
    (used or not), and the global generator ends where it would."""
    x, sigmas = _inputs(8)
    sig = [float(s) for s in sigmas]
    model = Model(32)

    def D(x, s):
        return model(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))

    torch.manual_seed(3)
    got = F.sample_euler(model, x, sigmas, s_churn=2.0, s_noise=1.01, disable=True)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    want = _ref_euler(D, x, sig, randn=torch.randn_like, churn=2.0, s_noise=1.01)
    assert (got - want).abs().max().item() <= 1e-8 * want.abs().max().item()
    assert torch.equal(after, torch.get_rng_state())


def test_dpm_adaptive_of_one_sample_is_fastdiffs_per_sample_solver():
    """For a batch of one, the batch-wide step size is the sample's own: the drop-in equals
    ``fastdiff.sampling.sample_dpm_adaptive`` (tested against the published algorithm), up to k-diffusion's
    float32 times."""
    from fastdiff.sampling import sample_dpm_adaptive

    x, _ = _inputs()
    x = x[1:2]
    model = Model(32)
    cond = COND[1:2]
    for order in (2, 3):
        got, info = F.sample_dpm_adaptive(model, x, 0.02, 20.0, extra_args={"cond": cond}, order=order, disable=True,
                                          return_info=True)
        want, report = sample_dpm_adaptive(lambda x, s, labels: model(x, s, cond=cond), x, 0.02, 20.0, order=order,
                                           return_info=True)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        assert (info["n_accept"], info["n_reject"], info["nfe"]) == (int(report["n_accept"][0]),
                                                                     int(report["n_reject"][0]), int(report["nfe"][0]))
