"""The cases of ``fastdiff bench``: each one a set of implementations of the same work, timed side by side.

Suites: ``ops`` (every fused op and the MP convolution vs the plain-PyTorch reference, GB/s or TFLOP/s),
``attention`` (fused cosine attention vs einsum vs SDPA), ``network`` (the denoiser forward vs the plain
EDM2 of ``fastdiff.bench.plain_edm2``; with ``--peers`` also ONNX Runtime / OpenVINO on its ONNX export),
``sampling`` (32-step Heun with autoguidance and an interval, then every sampler) and ``training`` (one step
with EMAs under autocast). Each ``*_cases`` function says what it times; ``Options.quick`` shrinks everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.bench import plain_edm2
from fastdiff.ops import reference as R

SUITES = ("ops", "attention", "network", "sampling", "training")
GUIDE_W, INTERVAL = 2.0, (0.28, 2.9)  # autoguidance weight; guidance interval in sigma, (lo, hi]


@dataclass
class Options:
    """What every suite takes (``quick`` shrinks everything to a smoke test).

    Suites (sizes are the defaults; ``Options.quick`` shrinks everything to a smoke test):

    - ``ops``: every fused elementwise op, forced weight normalization and the MP convolution vs the
      plain-PyTorch reference (and its ``torch.compile`` with ``--compile``); achieved GB/s (the bytes an op must
      read and write at least) or TFLOP/s. A device-to-device copy of the same size is the bandwidth yardstick.
    - ``attention``: fused cosine attention vs the einsum reference vs SDPA after a separate pixel norm, forward
      and forward+backward at the EDM2-S attention shapes; TFLOP/s (4 N heads L^2 64 per forward, 3.5x that
      for forward+backward, the usual flash-attention count).
    - ``network``: the preconditioned denoiser forward, fastdiff.nn vs the plain-PyTorch EDM2 of
      ``fastdiff.bench.plain_edm2`` (weights normalized on every call, like the official code), in the chosen
      dtype; images/s and model FLOP utilization (FLOPs per image counted by torch's FLOP counter on the plain
      network).
    - ``sampling``: 32-step Heun with autoguidance and a guidance interval: fastdiff.sampling vs the same loop in
      plain PyTorch (guide evaluated at every step, its result discarded outside the interval); images/s. On
      CUDA also fastdiff with both networks replayed from CUDA graphs (``fastdiff.sampling.cuda_graphed``).
      Then every sampler of ``fastdiff.sampling.SAMPLERS`` on the same work, with its network forwards.
    - ``training``: one training step (EDM2 loss with learned uncertainty, backward, non-finite gradients
      zeroed, Adam, two power-function EMAs) under autocast: fastdiff vs plain; images/s and peak memory.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch: int | None = None                 # overrides every suite's batch
    presets: tuple[str, ...] | None = None   # network suite presets (default per device)
    compile: str = "none"                    # none | default | max-autotune | reduce-overhead ...
    quick: bool = False
    steps: int = 32                          # sampler steps
    peers: tuple[str, ...] = ()              # network suite: other runtimes (fastdiff.bench.peers.PEERS)

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


@dataclass
class Case:
    """One piece of work and its implementations (the first is the baseline that speed-ups refer to)."""

    suite: str
    name: str
    impls: dict[str, Callable]
    unit: str                      # "GB/s", "TFLOP/s" or "img/s"
    work: float                    # bytes, FLOPs or images per call, matching ``unit``
    flops: float | None = None     # FLOPs per call, for utilization when the unit is img/s
    memory: bool = False           # record peak memory per implementation (CUDA)
    check: Callable[[], str] | None = None  # agreement of the implementations, as a short text
    notes: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _compiled(fn: Callable, opt: Options) -> Callable:
    return torch.compile(fn, mode=None if opt.compile == "default" else opt.compile, dynamic=False)


def _with_compiled(impls: dict[str, Callable], baseline: str, opt: Options) -> dict[str, Callable]:
    """Insert '<baseline> (torch.compile ...)' right after the baseline when --compile asks for it."""
    if opt.compile == "none":
        return impls
    out = {}
    for name, fn in impls.items():
        out[name] = fn
        if name == baseline:
            out[f"{name} (torch.compile {opt.compile})"] = _compiled(fn, opt)
    return out


def _randn(shape, opt: Options, seed: int = 0, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(opt.device, dtype or opt.dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _agreement(fns: dict[str, Callable], ref: str) -> Callable[[], str]:
    def check() -> str:
        with torch.no_grad():
            want = fns[ref]()
            errs = [f"{n} {_rel_err(f(), want):.1e}" for n, f in fns.items() if n != ref]
        return f"rel. error vs {ref}: " + ", ".join(errs)
    return check


# --- ops ---------------------------------------------------------------------------------------------------

def _op_shapes(opt: Options) -> list[tuple[int, int, int, int]]:
    if opt.quick:
        return [(opt.batch or 2, 8, 8, 8)]
    if opt.cuda:  # EDM2-S level 0 (64x64, C=192) and the bottom level (8x8, C=768), batch 64
        return [(opt.batch or 64, 192, 64, 64), (opt.batch or 64, 768, 8, 8)]
    return [(opt.batch or 4, 128, 32, 32), (opt.batch or 4, 256, 8, 8)]


def ops_cases(opt: Options) -> Iterator[Case]:
    es = torch.tensor([], dtype=opt.dtype).element_size()
    for shape in _op_shapes(opt):
        n, c, h, w = shape
        numel = math.prod(shape)
        tag = f"{'x'.join(map(str, shape))} {_dtype_name(opt.dtype)}"
        x, b = _randn(shape, opt, 0), _randn(shape, opt, 1)
        cmod = _randn((n, c), opt, 2)
        yield Case("ops", f"copy (bandwidth yardstick) {tag}", {"torch clone": lambda x=x: x.clone()}, "GB/s",
                   2 * numel * es)
        elementwise = [
            ("mp_silu", lambda f, x=x: f.mp_silu(x), 2),
            ("mp_sum t=0.3", lambda f, x=x, b=b: f.mp_sum(x, b, 0.3), 3),
            ("mp_cat t=0.5", lambda f, x=x, b=b: f.mp_cat(x, b, t=0.5), 4),
            ("pixel_norm", lambda f, x=x: f.pixel_norm(x), 2),
            ("mp_silu_modulate (block chain)", lambda f, x=x, cm=cmod: f.mp_silu_modulate(x, cm), 2),
            ("clip(mp_sum) (block end)", lambda f, x=x, b=b: f.clip(f.mp_sum(x, b, 0.3)), 3),
            ("mp_sum_clip (block end, one pass)", lambda f, x=x, b=b: f.mp_sum_clip(x, b, 0.3, 256.0), 3),
            ("mp_sum_clip silu=True (+ next mp_silu)",
             lambda f, x=x, b=b: f.mp_sum_clip(x, b, 0.3, 256.0, silu=True)[1], 4),  # both made; silu checked
        ]
        if opt.dtype != torch.float32:  # the network's case: float32 embedding, c cast inside the kernel
            elementwise.append(("mp_silu_modulate, float32 c", lambda f, x=x, cm=cmod.float(): f.mp_silu_modulate(x, cm), 2))
        for name, call, passes in elementwise:
            impls = {"reference": lambda call=call: call(R), "fastdiff": lambda call=call: call(ops)}
            impls = _with_compiled(impls, "reference", opt)
            yield Case("ops", f"{name} {tag}", impls, "GB/s", passes * numel * es, check=_agreement(impls, "reference"))
        # The MP convolution at this level's width (3x3, C -> C), float32 master weight as in training.
        wt = _randn((c, c, 3, 3), opt, 3, dtype=torch.float32)
        gain = torch.tensor(1.0, device=opt.device)
        conv = {"reference": lambda x=x, wt=wt: R.mp_conv(x, wt.to(x.dtype), gain),
                "fastdiff": lambda x=x, wt=wt: ops.mp_conv(x, wt.to(x.dtype), gain)}
        conv = _with_compiled(conv, "reference", opt)
        yield Case("ops", f"mp_conv 3x3 {c}->{c} {tag}", conv, "TFLOP/s", 2 * n * c * c * 9 * h * w,
                   check=_agreement(conv, "reference"))
    # Forced weight normalization of the widest 3x3 weight of the network, in place, float32.
    c = 8 if opt.quick else (768 if opt.cuda else 256)
    wn = _randn((c, c, 3, 3), opt, 4, dtype=torch.float32)
    impls = _with_compiled({"reference": lambda: R.weight_norm_(wn), "fastdiff": lambda: ops.weight_norm_(wn)},
                           "reference", opt)
    yield Case("ops", f"weight_norm_ (in place) {c}x{c}x3x3 float32", impls, "GB/s", 2 * wn.numel() * 4)


# --- attention ---------------------------------------------------------------------------------------------

def sdpa_cosine_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The same maths through PyTorch's own fused attention: pixel norm of q, k, v, then SDPA."""
    n, c3, h, w = qkv.shape
    x = R.normalize(qkv.reshape(n, heads, 64, 3, h * w), dim=2)
    q, k, v = (t.transpose(-1, -2) for t in x.unbind(3))  # [n, heads, HW, 64]
    y = F.scaled_dot_product_attention(q, k, v)
    return y.transpose(-1, -2).reshape(n, c3 // 3, h, w)


def _attention_shapes(opt: Options) -> list[tuple[int, int, int]]:
    """(batch, heads, resolution)."""
    if opt.quick:
        return [(opt.batch or 1, 1, 4)]
    if opt.cuda:  # EDM2-S: 16x16 at 576 channels (9 heads), 8x8 at 768 (12 heads); one long sequence
        return [(opt.batch or 64, 9, 16), (opt.batch or 64, 12, 8), (4, 4, 64)]
    return [(opt.batch or 8, 9, 16), (opt.batch or 8, 12, 8)]


def attention_cases(opt: Options) -> Iterator[Case]:
    for n, heads, r in _attention_shapes(opt):
        tag = f"b{n} h{heads} {r}x{r} {_dtype_name(opt.dtype)}"
        qkv = _randn((n, 3 * 64 * heads, r, r), opt)
        flops = 4.0 * n * heads * (r * r) ** 2 * 64
        fns = {"reference": R.cosine_attention, "sdpa": sdpa_cosine_attention, "fastdiff": ops.cosine_attention}
        if ops.attention_impl(qkv, heads) != "kernel" and ops.uses_kernel("cosine_attention", qkv):
            # fastdiff's route here is q/k/v norm + SDPA (CUDA); time its own tiled kernel beside it
            fns["fastdiff (tiled kernel)"] = lambda q, h: ops.cosine_attention(q, h, impl="kernel")
        fwd = {name: (lambda f=f: f(qkv, heads)) for name, f in fns.items()}
        fwd = _with_compiled(fwd, "reference", opt)
        yield Case("attention", f"forward {tag}", fwd, "TFLOP/s", flops, check=_agreement(fwd, "reference"),
                   memory=True)
        q = qkv.detach().clone().requires_grad_(True)
        g = _randn((n, 64 * heads, r, r), opt, 5)

        def fwd_bwd(f):
            return lambda: torch.autograd.grad(f(q, heads), q, g)[0]

        both = {name: fwd_bwd(f) for name, f in fns.items()}
        yield Case("attention", f"forward+backward {tag}", both, "TFLOP/s", 3.5 * flops, memory=True)


# --- networks ----------------------------------------------------------------------------------------------

def build_net(preset: str, opt: Options, seed: int = 0, **overrides):
    """A fastdiff network on the device with every learned gain at 1 (so every branch does real work)."""
    from fastdiff import nn as fnn

    torch.manual_seed(seed)
    kw = dict(use_fp16=False)
    if opt.dtype != torch.float32:
        kw["dtype"] = opt.dtype
    net = fnn.build(preset, **kw, **overrides)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net.to(opt.device)


def _plain(net, opt: Options, training: bool = False):
    compute = opt.dtype if opt.dtype != torch.float32 else None
    return plain_edm2.PlainEDM2.from_module(dict(net.init_kwargs), net, training=training, requires_grad=training,
                                            compute_dtype=compute)


def _inputs(net, batch: int, opt: Options, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r, c = net.img_resolution, net.img_channels
    x = torch.randn(batch, c, r, r, generator=g).to(opt.device)
    sigma = torch.exp(torch.randn(batch, generator=g)).to(opt.device)
    labels = None
    if net.label_dim:
        idx = torch.randint(0, net.label_dim, (batch,), generator=g)
        labels = F.one_hot(idx, net.label_dim).float().to(opt.device)
    return x, sigma, labels


def _network_presets(opt: Options) -> tuple[str, ...]:
    if opt.presets:
        return opt.presets
    if opt.quick:
        return ("tiny-16",)
    return ("edm2-img64-s", "edm2-img512-s") if opt.cuda else ("small-32",)


def _default_batch(opt: Options, cuda: int, cpu: int, quick: int) -> int:
    return opt.batch or (quick if opt.quick else (cuda if opt.cuda else cpu))


def network_cases(opt: Options) -> Iterator[Case]:
    batch = _default_batch(opt, 64, 8, 2)
    for preset in _network_presets(opt):
        net = build_net(preset, opt).eval().requires_grad_(False)
        pnet = _plain(net, opt)
        x, sigma, labels = _inputs(net, batch, opt)
        impls = {"plain": lambda pnet=pnet, x=x, s=sigma, y=labels: pnet(x, s, y),
                 "fastdiff": lambda net=net, x=x, s=sigma, y=labels: net(x, s, y)}
        impls = {k: torch.no_grad()(f) for k, f in _with_compiled(impls, "plain", opt).items()}
        notes = []
        if opt.peers:
            if opt.cuda or opt.dtype != torch.float32:
                notes.append("peers run on the CPU in float32 only: skipped")
            else:
                from fastdiff.bench.peers import peer_runners

                runners, notes = peer_runners(pnet, (x, sigma) + ((labels,) if labels is not None else ()), opt.peers)
                impls.update(runners)
        with torch.no_grad():
            flops = _count(impls["plain"])
        yield Case("network", f"denoiser forward {preset} b{batch} {_dtype_name(opt.dtype)}", impls, "img/s", batch,
                   flops=flops, memory=True, check=_agreement(impls, "plain"), notes=notes)


def _count(fn: Callable) -> float | None:
    from fastdiff.bench.timing import count_flops

    try:
        return count_flops(fn)
    except Exception:  # a FLOP count is a nicety; never fail the benchmark for it
        return None


# --- sampling ----------------------------------------------------------------------------------------------

def plain_heun_loop(net, gnet, noise, labels=None, w=GUIDE_W, interval=INTERVAL, num_steps=32):
    """32-step EDM Heun with autoguidance in plain PyTorch: no fused ops, and the guide evaluated at every
    step, its result thrown away outside the interval (what a straightforward implementation does)."""
    from fastdiff.sampling import edm_sigma_steps

    t = edm_sigma_steps(num_steps, dtype=torch.float32, device=noise.device)
    lo, hi = interval

    def denoise(x, s):
        sig = s.expand(x.shape[0])
        d1, d0 = net(x, sig, labels), gnet(x, sig, labels)
        guided = d0 + w * (d1 - d0)
        return guided if lo < float(s) <= hi else d1

    x = noise * t[0]
    for i in range(num_steps):
        tc, tn = t[i], t[i + 1]
        d = (x - denoise(x, tc)) / tc
        x_next = x + (tn - tc) * d
        if i < num_steps - 1:
            d2 = (x_next - denoise(x_next, tn)) / tn
            x_next = x + (tn - tc) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def fastdiff_heun_loop(net, gnet, noise, labels=None, w=GUIDE_W, interval=INTERVAL, num_steps=32):
    """The same sampling with fastdiff.sampling: fused solver step, guide skipped outside the interval."""
    from fastdiff.sampling import Autoguidance, Interval, sample

    return sample(net, noise, "heun", steps=num_steps, guidance=Interval(Autoguidance(w, gnet), sigma=interval),
                  labels=labels)


def sampling_pair(opt: Options) -> tuple[str, str, dict]:
    """(main preset, guide preset, guide overrides) of the sampling suite."""
    if opt.presets:
        return opt.presets[0], opt.presets[-1] if len(opt.presets) > 1 else opt.presets[0], (
            {} if len(opt.presets) > 1 else dict(model_channels=16, logvar_channels=16))
    if opt.cuda and not opt.quick:
        return "edm2-img64-s", "edm2-img64-xs", {}
    return "tiny-16", "tiny-16", dict(model_channels=16, logvar_channels=16)  # guide: the same at half width


def sampling_cases(opt: Options) -> Iterator[Case]:
    batch = _default_batch(opt, 64, 8, 2)
    steps = 4 if opt.quick else opt.steps
    main, guide, overrides = sampling_pair(opt)
    net = build_net(main, opt, 0).eval().requires_grad_(False)
    gnet = build_net(guide, opt, 1, **overrides).eval().requires_grad_(False)
    pnet, pgnet = _plain(net, opt), _plain(gnet, opt)
    noise, _, labels = _inputs(net, batch, opt, seed=2)
    impls = {"plain": lambda: plain_heun_loop(pnet, pgnet, noise, labels, num_steps=steps),
             "fastdiff": lambda: fastdiff_heun_loop(net, gnet, noise, labels, num_steps=steps)}
    if opt.compile != "none":  # the plain loop with both plain networks compiled
        cn, cg = _compiled(pnet, opt), _compiled(pgnet, opt)
        impls = {"plain": impls["plain"],
                 f"plain (torch.compile {opt.compile})": lambda: plain_heun_loop(cn, cg, noise, labels, num_steps=steps),
                 "fastdiff": impls["fastdiff"]}
    if opt.cuda:  # the same sampling with both networks replayed from CUDA graphs
        from fastdiff.sampling import cuda_graphed

        gn, gg = cuda_graphed(net), cuda_graphed(gnet)
        impls["fastdiff + CUDA graphs"] = lambda: fastdiff_heun_loop(gn, gg, noise, labels, num_steps=steps)
    impls = {k: torch.no_grad()(f) for k, f in impls.items()}
    name = (f"Heun {steps} steps, autoguidance w={GUIDE_W} + interval {INTERVAL}, main {main}, guide {guide}"
            f"{' (half width)' if overrides else ''}, b{batch} {_dtype_name(opt.dtype)}")
    yield Case("sampling", name, impls, "img/s", batch, memory=True, check=_agreement(impls, "plain"))
    yield every_sampler_case(opt, net, gnet, pnet, pgnet, noise, labels, steps, name)


def every_sampler_case(opt: Options, net, gnet, pnet, pgnet, noise, labels, steps: int, name: str) -> Case:
    """Every sampler of fastdiff.sampling.SAMPLERS on the same work (networks, guidance, noise, steps), after the
    plain Heun loop as the baseline; the check reports Heun's agreement with it and each sampler's network
    evaluations per image."""
    from fastdiff.sampling import SAMPLERS, Autoguidance, Interval, rng, sample

    def run(sampler: str, info=None):
        g = Interval(Autoguidance(GUIDE_W, gnet), sigma=INTERVAL)
        gens = rng.seed_generators(range(noise.shape[0]), device=noise.device)
        return sample(net, noise, sampler, steps=steps, guidance=g, labels=labels, generators=gens, info=info)

    impls = {"plain": lambda: plain_heun_loop(pnet, pgnet, noise, labels, num_steps=steps)}
    impls.update({s: (lambda s=s: run(s)) for s in SAMPLERS})
    impls = {k: torch.no_grad()(f) for k, f in impls.items()}

    def check() -> str:
        heun = _agreement({"plain": impls["plain"], "heun": impls["heun"]}, "plain")()
        counts = []
        for s in SAMPLERS:
            info: dict = {}
            with torch.no_grad():
                run(s, info)
            counts.append(f"{s} {info['evaluations']}")
        return f"{heun}; network forwards per batch: " + ", ".join(counts)

    return Case("sampling", name.replace("Heun ", "every sampler, ", 1), impls, "img/s", noise.shape[0], check=check)


# --- training ----------------------------------------------------------------------------------------------

def _autocast(opt: Options):
    return torch.autocast(torch.device(opt.device).type, dtype=opt.dtype, enabled=opt.dtype != torch.float32)


class PlainTrainer:
    """The EDM2 training step in plain PyTorch over a ``PlainEDM2`` in training mode: loss with learned
    uncertainty (fresh noise from ``generator``), backward, non-finite gradients zeroed, Adam (0.9, 0.99,
    1e-8), power-function EMAs (one fused lerp over all tensors per std)."""

    def __init__(self, pnet, lr: float, P_mean: float, P_std: float, stds=(0.05, 0.10), autocast_dtype=None):
        from fastdiff.training import std_to_exp

        self.pnet, self.P_mean, self.P_std = pnet, P_mean, P_std
        self.params = pnet.parameters()
        self.adam = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.99), eps=1e-8)
        self.emas = [(std_to_exp(std), [t.detach().clone() for t in self.params]) for std in stds]
        self.autocast_dtype = autocast_dtype
        self.nimg = 0

    def step(self, images: torch.Tensor, labels, generator: torch.Generator) -> None:
        sd, batch, dev = 0.5, images.shape[0], images.device
        sigma = (torch.randn(batch, 1, 1, 1, generator=generator, device=dev) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        noise = torch.randn(images.shape, generator=generator, device=dev) * sigma
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None):
            d, logvar = self.pnet(images + noise, sigma, labels, return_logvar=True)
        loss = (weight / logvar.float().exp()) * (d.float() - images) ** 2 + logvar.float()
        self.adam.zero_grad(set_to_none=True)
        loss.sum().mul(1.0 / batch).backward()
        for t in self.params:
            if t.grad is not None:
                torch.nan_to_num(t.grad, nan=0.0, posinf=0.0, neginf=0.0, out=t.grad)
        self.adam.step()
        self.nimg += batch
        with torch.no_grad():
            for exp, ema in self.emas:
                beta = (1 - batch / self.nimg) ** (exp + 1)
                torch._foreach_lerp_(ema, [t.detach() for t in self.params], 1 - beta)


def training_cases(opt: Options) -> Iterator[Case]:
    from fastdiff import nn as fnn
    from fastdiff.diffusion import EDM2Loss
    from fastdiff.training import PowerFunctionEMA

    batch = _default_batch(opt, 256, 32, 2)
    presets = opt.presets or (("tiny-16",) if opt.quick or not opt.cuda else ("edm2-img64-s",))
    for preset in presets:
        tr = fnn.get_preset(preset)["training"]
        fopt = Options(**{**opt.__dict__, "dtype": torch.float32})  # float32 master weights on both sides
        net = build_net(preset, fopt)
        pnet = _plain(net, fopt, training=True)
        pnet.compute_dtype = None  # autocast decides, as for fastdiff
        images, _, labels = _inputs(net, batch, opt, seed=3)
        images = images.clamp(-1, 1)

        net.train().requires_grad_(True)
        params = [p for p in net.parameters() if p.requires_grad]
        adam = torch.optim.Adam(params, lr=tr["lr"], betas=(0.9, 0.99), eps=1e-8)
        loss_fn = EDM2Loss(tr["P_mean"], tr["P_std"])
        ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
        state = {"nimg": 0}
        gen = torch.Generator(device=opt.device)

        def fastdiff_step():
            gen.manual_seed(state["nimg"])
            adam.zero_grad(set_to_none=True)
            with _autocast(opt):
                loss = loss_fn(net, images, labels, generator=gen)
            loss.float().sum().mul(1.0 / batch).backward()
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
            adam.step()
            state["nimg"] += batch
            ema.update(cur_nimg=state["nimg"], batch_size=batch)

        amp = opt.dtype if opt.dtype != torch.float32 else None
        trainer = PlainTrainer(pnet, tr["lr"], tr["P_mean"], tr["P_std"], autocast_dtype=amp)
        pgen = torch.Generator(device=opt.device)

        def plain_step():
            pgen.manual_seed(trainer.nimg)
            trainer.step(images, labels, pgen)

        name = f"train step {preset} b{batch} {'autocast ' + _dtype_name(opt.dtype) if opt.dtype != torch.float32 else 'float32'}"
        yield Case("training", name, {"plain": plain_step, "fastdiff": fastdiff_step}, "img/s", batch, memory=True,
                   notes=["weights float32 (master), Adam (0.9, 0.99, 1e-8), EMAs 0.05 and 0.10"])


def check_suites(suites) -> list[str]:
    """The suite names, or a ValueError naming the unknown ones and the choices."""
    suites = list(suites)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; expected some of: {', '.join(SUITES)}")
    return suites


CASES = {"ops": ops_cases, "attention": attention_cases, "network": network_cases, "sampling": sampling_cases,
         "training": training_cases}
