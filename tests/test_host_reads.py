"""The sampling loop never makes the host wait for the device: no read of a device value (``.item()``,
``float(t)``, ``bool(t)``, ``nonzero``, boolean-mask indexing) and no tensor made from Python data (a blocking
host-to-device copy) inside any sampler's loop, with every guidance method, with and without ``Interval``.

Counted on the CPU with a ``TorchDispatchMode`` (:mod:`fastdiff.sampling.hostreads`), which sees these ops on
every device. ``dpm_adaptive`` reads by design (which samples still integrate sets the shapes of its next
network calls): once per round, checked exactly."""

from __future__ import annotations

import pytest
import torch

from fastdiff.sampling import (
    APG, CADS, CFG, ICG, SAMPLERS, TSG, Autoguidance, Guidance, Interval, generate_images, rng, sample,
)
from fastdiff.sampling.hostreads import count_host_reads, host_list


class Net(torch.nn.Module):
    """An elementwise stand-in for Precond that reads nothing on the host itself, with a noise-embedding
    layer (``emb_noise``) for TSG's hook; ``embedding=False`` leaves TSG its generic route."""

    def __init__(self, shift=0.0, embedding=True):
        super().__init__()
        self.emb_noise = torch.nn.Identity() if embedding else None
        self.register_buffer("colour", torch.linspace(-0.6, 0.6, 12).reshape(4, 3) + shift)
        self.img_resolution, self.img_channels, self.label_dim = 4, 3, 4

    def forward(self, x, sigma, labels=None):
        s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip = 0.25 / (s**2 + 0.25)
        target = 0.5 * torch.tanh(x.float())
        if self.emb_noise is not None:
            e = self.emb_noise(torch.log(s.reshape(-1, 1)) * torch.ones(1, 6, device=x.device))
            target = target + 0.01 * e.mean(1).reshape(-1, 1, 1, 1)
        if labels is not None:
            target = target + (labels.float() @ self.colour)[:, :, None, None]
        return (c_skip * x.float() + (1 - c_skip) * target).to(x.dtype)


NET, GNET, UNCOND, PLAIN = Net(), Net(0.3), Net(-0.2), Net(embedding=False)

GUIDANCE = {
    "none": lambda: None,
    "cfg": lambda: CFG(2.0),
    "cfg-uncond": lambda: CFG(2.0, uncond=UNCOND),
    "autoguidance": lambda: Autoguidance(2.0, GNET),
    "apg": lambda: APG(2.0, r=5.0),
    "icg": lambda: ICG(2.0),
    "tsg": lambda: TSG(2.0, scale=0.5),
    "cads": lambda: CADS(CFG(2.0)),
    "interval-autoguidance": lambda: Interval(Autoguidance(2.0, GNET), sigma=(0.28, 2.9)),
    "interval-steps": lambda: Interval(Autoguidance(2.0, GNET), steps=(1, 2)),
    "interval-icg": lambda: Interval(ICG(2.0), sigma=(0.5, 10.0)),
    "interval-apg": lambda: Interval(APG(2.0), sigma=(0.5, 10.0)),
    "interval-tsg": lambda: Interval(TSG(2.0), sigma=(0.5, 10.0)),
    "interval-cads": lambda: Interval(CADS(CFG(2.0)), sigma=(0.5, 10.0)),
    "cads-interval": lambda: CADS(Interval(Autoguidance(2.0, GNET), sigma=(0.28, 2.9))),
}


def _inputs(n=2, seed=0):
    noise = rng.randn(rng.seed_generators(range(seed, seed + n)), n, (3, 4, 4))
    labels = torch.nn.functional.one_hot(torch.arange(n) % 4, 4).float()
    return noise, labels


def _count(sampler, guidance, steps=4, net=NET, **kw):
    noise, labels = _inputs()
    with count_host_reads(trace=True) as reads:
        x = sample(net, noise, sampler, steps=steps, guidance=guidance, labels=labels,
                   generators=rng.seed_generators(range(2)), **kw)
    assert torch.isfinite(x).all()
    return reads


@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "dpm_adaptive"])
def test_no_host_reads_in_any_sampler_with_any_guidance(sampler):
    for name, make in GUIDANCE.items():
        reads = _count(sampler, make())
        assert (reads.reads, reads.uploads) == (0, 0), (sampler, name, dict(reads.where))
    reads = _count(sampler, TSG(2.0), net=PLAIN)  # TSG's generic route (the guide at a perturbed sigma)
    assert (reads.reads, reads.uploads) == (0, 0), (sampler, "tsg-generic", dict(reads.where))


@pytest.mark.parametrize("options", [dict(S_churn=10.0), dict(S_churn=10.0, S_min=0.5, S_max=5.0),
                                     dict(dtype=torch.float64), dict(dtype=torch.bfloat16)])
def test_no_host_reads_with_churn_and_other_dtypes(options):
    for sampler in ("heun", "euler", "dpm_2"):
        if "S_churn" not in options:
            sampler = {"euler": "euler_ancestral", "dpm_2": "dpmpp_2m"}.get(sampler, sampler)
        for name in ("interval-autoguidance", "cads", "icg"):
            reads = _count(sampler, GUIDANCE[name](), **options)
            assert (reads.reads, reads.uploads) == (0, 0), (sampler, name, options, dict(reads.where))


def test_heun_32_steps_interval_autoguidance_reads_nothing():
    """The issue's case: before, 112 reads (3.5 per step) for 32 steps."""
    reads = _count("heun", Interval(Autoguidance(2.0, GNET), sigma=(0.28, 2.9)), steps=32)
    assert (reads.reads, reads.uploads) == (0, 0), dict(reads.where)


def test_the_counter_sees_reads():
    """The mode counts what it must: item/float/bool, data-dependent sizes, tensors from Python data."""
    t = torch.tensor([1.0, 2.0])
    with count_host_reads() as reads:
        float(t[0]), bool(t[1] > 0), t.sum().item(), t.nonzero(), t[t > 1], t.tolist(), t.numpy()
        assert host_list(t) == [1.0, 2.0]  # a CPU replica read on purpose: not counted
    assert reads.reads == 7 and reads.uploads == 0 and t.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="CPU tensor"):
        host_list(t.to("meta"))
    with count_host_reads() as reads:
        torch.as_tensor(0.5), torch.tensor([1, 2]), t * 2, torch.full((2,), 0.5), t[torch.tensor([0])]
    assert reads.reads == 0 and reads.uploads == 3
    # An Interval evaluated without a host noise level (per-sample levels) still decides, from the device.
    noise, labels = _inputs(3)
    from fastdiff.diffusion import edm_sigma_steps
    from fastdiff.sampling.guidance import EvalContext

    ctx = EvalContext(num_steps=4, sigmas=edm_sigma_steps(4), sigma_min=0.002, sigma_max=80, rho=7, batch=3)
    with count_host_reads() as reads:
        Interval(Autoguidance(2.0, GNET), sigma=(0.28, 2.9)).evaluate(NET, noise, torch.tensor([0.1, 1.0, 5.0]),
                                                                      labels, ctx)
    assert reads.reads > 0


class _Spy(Guidance):
    """Records, at every evaluation, the host noise level the loop declares and the device's."""

    def __init__(self, inner=None):
        self.inner, self.seen = inner or Guidance(), []

    def evaluate(self, net, x, sigma, labels, ctx):
        self.seen.append((ctx.host_sigma, sigma.tolist()))
        return self.inner.evaluate(net, x, sigma, labels, ctx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_host_noise_level_is_the_device_noise_level(dtype):
    """At every evaluation of every sampler (churned sigma_hat, DPM-Solver-2's midpoint, the ancestral
    targets, the SDE sub-steps included) the host value equals every sample's device value exactly, so a
    decision made on the host is the one the device values would give."""
    for sampler in [s for s in SAMPLERS if s != "dpm_adaptive"]:
        options = dict(S_churn=10.0) if sampler in ("heun", "euler", "dpm_2") else {}
        spy = _Spy()
        _count(sampler, spy, steps=5, dtype=dtype, **options)
        assert spy.seen, sampler
        for host, device in spy.seen:
            assert host is not None and all(v == host for v in device), (sampler, host, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_interval_host_decision_matches_the_device_comparison(dtype):
    """Noise levels at and next to the interval's ends (in the sampling dtype, where ``lo`` is not
    representable): the decision from the host value equals the comparison of the device tensor."""
    from fastdiff.diffusion import edm_sigma_steps
    from fastdiff.sampling.guidance import EvalContext

    lo, hi = 0.28, 2.9
    g = Interval(Guidance(), sigma=(lo, hi))
    ctx = EvalContext(num_steps=4, sigmas=edm_sigma_steps(4), sigma_min=0.002, sigma_max=80, rho=7, batch=1)
    for edge in (lo, hi):
        v = torch.tensor(edge, dtype=dtype)
        for s in (v, torch.nextafter(v.float(), torch.tensor(0.0)).to(dtype), v.float().mul(1.01).to(dtype),
                  v.float().mul(0.99).to(dtype)):
            sigma = s.reshape(1)
            ctx.host_sigma = sigma.tolist()[0]
            assert g._decide(sigma, ctx) == bool(g.inside(sigma, ctx).all()), (dtype, edge, sigma)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_adaptive_reads_once_per_round(eta):
    """dpm_adaptive decides on the host which samples still integrate (the shapes of the next network
    calls): one read per round of attempts and one to stop, a second per round with eta > 0 (whose
    generators draw), as its docstring says; nothing else is read or uploaded (but the [2] schedule
    tensor made on the CPU before the loop)."""
    noise, labels = _inputs(3)
    info = {}
    with count_host_reads(trace=True) as reads:
        sample(NET, noise, "dpm_adaptive", guidance=Autoguidance(2.0, GNET), labels=labels, eta=eta,
               generators=rng.seed_generators(range(3)), info=info, rtol=0.01)
    rounds = int((info["n_accept"] + info["n_reject"]).max())
    assert rounds > 3 and int(info["n_reject"].sum()) > 0  # rejections happened: the masked updates ran
    assert reads.reads == (rounds + 1) + (rounds if eta else 0), dict(reads.where)
    assert reads.uploads == 1, dict(reads.where)


def test_generators_on_the_sampling_device():
    """generate_images seeds its generators on the sampling device (the CPU here: the same numbers as
    before); generator_device='cpu' keeps the CPU's numbers on any device."""
    net = Net()
    a = {s: i for seeds, imgs in generate_images(net, [3, 5], batch=2, steps=3, S_churn=5.0)
         for s, i in zip(seeds, imgs)}
    b = {s: i for seeds, imgs in generate_images(net, [5, 3, 8], batch=3, steps=3, S_churn=5.0, generator_device="cpu")
         for s, i in zip(seeds, imgs)}
    assert torch.equal(a[3], b[3]) and torch.equal(a[5], b[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_images_depend_on_their_seed_only():
    """On CUDA the per-seed generators live on the GPU: an image still depends on its seed only."""
    net, gnet = Net().cuda(), Net(0.3).cuda()
    kw = dict(steps=4, S_churn=5.0, gnet=gnet, guidance=2.0, interval=(0.28, 2.9), device="cuda")
    a = {s: i for seeds, imgs in generate_images(net, [7], batch=1, **kw) for s, i in zip(seeds, imgs)}
    b = {s: i for seeds, imgs in generate_images(net, [1, 7, 9], batch=3, **kw) for s, i in zip(seeds, imgs)}
    assert (a[7].int() - b[7].int()).abs().max() <= 1
    c = {s: i for seeds, imgs in generate_images(net, [7], batch=1, **kw) for s, i in zip(seeds, imgs)}
    assert torch.equal(a[7], c[7])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde"])
def test_cuda_loop_never_synchronizes(sampler):
    """On a GPU, with per-seed generators on the device: from the first network call to the end of the
    loop, CUDA's sync debug mode (set to error) sees no synchronizing call (a read, a blocking copy)."""
    net, gnet = Net().cuda(), Net(0.3).cuda()
    noise, labels = (t.cuda() for t in _inputs(2))
    for make in (lambda: Interval(Autoguidance(2.0, gnet), sigma=(0.28, 2.9)), lambda: CADS(ICG(2.0)),
                 lambda: Interval(TSG(2.0), sigma=(0.5, 10.0)), lambda: APG(2.0, r=5.0)):
        calls = [0]

        def strict(x, sigma, labels=None):
            if calls[0] == 0:  # the loop has begun: everything from here on must not wait for the GPU
                torch.cuda.set_sync_debug_mode("error")
            calls[0] += 1
            return net(x, sigma, labels)

        try:
            x = sample(strict, noise, sampler, steps=8, guidance=make(), labels=labels,
                       generators=rng.seed_generators(range(2), device="cuda"), S_churn=0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert calls[0] > 0 and torch.isfinite(x).all()
