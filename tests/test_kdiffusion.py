"""k-diffusion interop: wrappers in both directions, round trips, samplers of each side driving the other."""

import pytest
import torch

from fastdiff.sampling import CFG, Autoguidance, Interval, edm_sigma_steps, sample
from fastdiff.sampling.kdiffusion import KDiffusionDenoiser, KDiffusionModel, as_kdiffusion
from fastdiff.toy import ToyDenoiser, tree_mixture

NUM_CLASSES = 3


class KModel(torch.nn.Module):
    """A k-diffusion-style stand-in: ``model(x, sigma, cond=None, scale=1.0)``, ``cond`` integer class
    indices with index NUM_CLASSES meaning 'unconditional' (as in models trained with label dropout)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, 4, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3)
        self.calls = 0

    def forward(self, x, sigma, cond=None, scale=1.0):
        self.calls += 1
        assert sigma.shape == (x.shape[0],), "k-diffusion models get a per-sample sigma [N]"
        s2 = (sigma.to(x.dtype) ** 2)[:, None]
        base = torch.tanh(x @ self.mix) * s2 / (1 + s2)
        if cond is not None:
            assert not cond.is_floating_point() and cond.shape == (x.shape[0],)
            base = base + scale * self.emb[cond] / (1 + s2)
        return x / (1 + s2) + base


def native_equivalent(model: KModel):
    """The same function written in fastdiff's convention (one-hot labels, zero row = unconditional)."""

    def denoiser(x, sigma, labels):
        s2 = (sigma.to(x.dtype) ** 2)[:, None]
        base = torch.tanh(x @ model.mix) * s2 / (1 + s2)
        if labels is not None:
            null = (labels.sum(1, keepdim=True) == 0).to(x.dtype)
            full = torch.cat([labels.to(x.dtype), null], 1)
            base = base + full @ model.emb / (1 + s2)
        return x / (1 + s2) + base

    return denoiser


def kd_sample_heun(model, x, sigmas, extra_args=None):
    """A minimal sampler in k-diffusion's calling convention (``model(x, sigma * s_in, **extra_args)``):
    Heun's method, Euler for the last step to sigma = 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def onehot(idx, k=NUM_CLASSES):
    return torch.nn.functional.one_hot(idx, k).double()


def test_kdiffusion_denoiser_passes_labels_in_the_models_format():
    model = KModel()
    x, sigma = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.1
    idx = torch.tensor([0, 1, 2, 0, 1, 2])
    den = KDiffusionDenoiser(model, label_arg="cond", label_format="index", null_class=NUM_CLASSES)
    assert torch.equal(den(x, sigma, onehot(idx)), model(x, sigma, cond=idx))
    null = torch.zeros(6, NUM_CLASSES, dtype=torch.float64)
    assert torch.equal(den(x, sigma, null), model(x, sigma, cond=torch.full((6,), NUM_CLASSES)))
    assert torch.equal(den(x, sigma, None), model(x, sigma))
    assert torch.equal(den(x, 0.5, None), model(x, torch.full((6,), 0.5, dtype=torch.float64)))  # scalar sigma
    extra = KDiffusionDenoiser(model, "cond", "index", NUM_CLASSES, extra_args={"scale": 2.0})
    assert torch.equal(extra(x, sigma, onehot(idx)), model(x, sigma, cond=idx, scale=2.0))
    assert len(list(den.parameters())) == 2  # the wrapped module's parameters are reachable
    with pytest.raises(ValueError, match="null_class"):
        KDiffusionDenoiser(model, "cond", "index")(x, sigma, null)


def test_fastdiff_samplers_and_guidance_drive_a_kdiffusion_model():
    model = KModel()
    den = KDiffusionDenoiser(model, label_arg="cond", label_format="index", null_class=NUM_CLASSES)
    native = native_equivalent(model)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(8, 4, generator=g, dtype=torch.float64)
    labels = onehot(torch.arange(8) % NUM_CLASSES)
    kw = dict(steps=8, labels=labels, dtype=torch.float64)
    for sampler in ("heun", "euler", "dpmpp_2m"):
        for guidance in (None, CFG(2.0), Interval(CFG(3.0), sigma=(0.3, 5.0))):
            a = sample(den, noise, sampler=sampler, guidance=guidance, **kw)
            b = sample(native, noise, sampler=sampler, guidance=guidance, **kw)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Autoguidance with a second wrapped k-diffusion model as the guide.
    guide = KDiffusionDenoiser(KModel().requires_grad_(False), "cond", "index", NUM_CLASSES,
                               extra_args={"scale": 0.5})
    a = sample(den, noise, guidance=Autoguidance(2.0, guide), **kw)
    assert torch.isfinite(a).all()
    calls = model.calls
    sample(den, noise, guidance=CFG(2.0), **kw)
    assert model.calls - calls == 2 * 8 - 1  # CFG with a null label: one batched forward per evaluation


def test_as_kdiffusion_drives_a_fastdiff_network_in_a_kdiffusion_sampler():
    tree = tree_mixture()  # a fastdiff denoiser: tree(x, sigma, labels) with one-hot labels
    model = as_kdiffusion(tree, label_dim=2)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(64, 2, generator=g, dtype=torch.float64)
    idx = torch.arange(64) % 2
    sigmas = edm_sigma_steps(12, dtype=torch.float64)
    ours = sample(tree, noise, sigmas=sigmas, labels=onehot(idx, 2), dtype=torch.float64)
    for extra in ({"class_labels": onehot(idx, 2)}, {"cond": idx}, {"labels": idx}):
        theirs = kd_sample_heun(model, noise * sigmas[0], sigmas, extra_args=extra)
        torch.testing.assert_close(theirs, ours, rtol=1e-9, atol=1e-9)
    uncond = kd_sample_heun(model, noise * sigmas[0], sigmas)
    torch.testing.assert_close(uncond, sample(tree, noise, sigmas=sigmas, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    sig = model.get_sigmas(12)
    assert sig.shape == (13,) and float(sig[-1]) == 0 and abs(float(sig[0]) - 80) < 1e-3


def test_round_trips_are_exact():
    # fastdiff -> k-diffusion -> fastdiff
    net = ToyDenoiser(channels=16, blocks=1, label_dim=2, seed=3).eval()
    with torch.no_grad():
        net.out_gain.fill_(0.7)
        for b in net.blocks:
            b.emb_gain.fill_(0.3)
    x, sigma = torch.randn(5, 2), torch.rand(5) + 0.05
    labels = onehot(torch.tensor([0, 1, 1, 0, 1]), 2).float()
    back = KDiffusionDenoiser(as_kdiffusion(net), label_arg="class_labels")
    with torch.no_grad():
        assert torch.equal(back(x, sigma, labels), net(x, sigma, labels))
        assert torch.equal(back(x, sigma, None), net(x, sigma, None))
    assert {id(p) for p in back.parameters()} == {id(p) for p in net.parameters()}
    # k-diffusion -> fastdiff -> k-diffusion (integer classes survive the one-hot detour)
    model = KModel()
    x64, s64 = x.double().repeat(1, 2), sigma.double()
    idx = torch.tensor([0, 2, 1, 3, 2])  # 3 = the unconditional class
    there = as_kdiffusion(KDiffusionDenoiser(model, "cond", "index", null_class=NUM_CLASSES),
                          label_dim=NUM_CLASSES + 1)
    with torch.no_grad():
        assert torch.equal(there(x64, s64, cond=idx), model(x64, s64, cond=idx))
        assert torch.equal(there(x64, s64, cond=idx, scale=3.0), model(x64, s64, cond=idx, scale=3.0))
        assert torch.equal(there(x64, s64), model(x64, s64))


def test_as_kdiffusion_argument_checks():
    tree = tree_mixture()
    model = as_kdiffusion(tree)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="twice"):
        model(x, 1.0, cond=torch.tensor([0, 1, 0]), class_labels=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="label_dim"):
        model(x, 1.0, cond=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.ones(2))
    assert isinstance(model, KDiffusionModel)
    out = model(x, torch.tensor(1.0, dtype=torch.float64))  # 0-d sigma is broadcast
    assert out.shape == (3, 2)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster on a busy machine
