"""Guidance as small composable objects, applied on the denoised prediction ``D`` inside every network
evaluation of every sampler (the Heun correction included).

A guidance object turns ``(denoiser, x, sigma, labels, ctx)`` into a :class:`Guided` result: a linear
combination ``D = d0 + w (d1 - d0)`` that the fused solver step takes as it is, or an already combined ``D``
(:class:`APG`). ``w = 1`` evaluates the main network only; where both branches are the same network they run
as one batched forward; random draws come from the per-sample generators. Each class declares its
command-line name and parameters (:class:`Param`), which ``fastdiff generate`` reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from fastdiff._runtime import nvtx_range
from fastdiff.diffusion import edm_time_of_sigma
from fastdiff.sampling import rng
from fastdiff.sampling.hostreads import host_list

__all__ = [
    "Guided", "EvalContext", "Guidance", "CFG", "Autoguidance", "Interval", "APG", "ICG", "TSG", "CADS",
    "Param", "METHODS", "noise_embedding_layer",
]


@dataclasses.dataclass
class Guided:
    """Result of one guided evaluation: ``D = d0 + w (d1 - d0)``, or ``d1`` itself when ``d0`` is None.

    ``w`` is a number or a per-sample ``[N]`` tensor."""

    d1: torch.Tensor
    d0: torch.Tensor | None = None
    w: float | torch.Tensor = 1.0

    @property
    def linear(self) -> bool:
        return self.d0 is not None

    def combine(self) -> torch.Tensor:
        """The guided ``D`` in plain PyTorch (the fused solver step forms it itself)."""
        if self.d0 is None:
            return self.d1
        w = self.w
        if isinstance(w, torch.Tensor) and w.ndim == 1:
            w = w.reshape((-1,) + (1,) * (self.d1.ndim - 1))
        return (self.d0 + w * (self.d1 - self.d0)).to(self.d1.dtype)


class EvalContext:
    """What a guidance object may know about the evaluation in progress, and per-run memory.

    ``step`` is the solver step ``i`` (the Heun correction of step ``i`` is also ``i``, with
    ``correction`` True); ``num_steps`` N; ``sigmas`` the schedule ``t_0 > ... > t_N = 0``;
    ``generators`` the per-sample generators (or None); ``index`` the batch rows being evaluated when
    only part of the batch is (None: all); ``memory`` a per-run dict (e.g. APG's momentum).

    ``host_sigmas``: the schedule as Python floats; ``host_sigma``: the noise level of the evaluation in
    progress as a Python float when every sample is at that level (None: per-sample levels, or not
    known). Guidance decides from these, so that it never reads a device value (a GPU sync) in the loop.
    """

    def __init__(self, *, num_steps: int, sigmas: torch.Tensor, sigma_min: float, sigma_max: float,
                 rho: float, generators=None, dtype=torch.float32, batch: int = 0,
                 host_sigmas: list[float] | None = None):
        self.num_steps = num_steps
        self.sigmas = sigmas
        self.host_sigmas = host_sigmas
        self.host_sigma: float | None = None
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.generators = generators
        self.dtype = dtype
        self.batch = batch
        self.step = 0
        self.correction = False
        self.index: torch.Tensor | None = None
        self.memory: dict[Any, Any] = {}
        self._count = [0]  # shared with the views made by select()

    @property
    def evaluations(self) -> int:
        """Network forwards issued through :meth:`call` so far in this run."""
        return self._count[0]

    def call(self, net: Callable, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        """One network forward inside an NVTX range; the output is cast to the sampling dtype."""
        self._count[0] += 1
        with nvtx_range("network"):
            out = net(x, sigma, labels)
        return out.to(self.dtype)

    def t_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Normalized time in [0, 1] (1 = pure noise): the position of ``sigma`` on this run's EDM schedule
        (:func:`fastdiff.diffusion.edm_time_of_sigma`); equals ``1 - i/(N-1)`` at step i."""
        return edm_time_of_sigma(sigma, self.sigma_min, self.sigma_max, self.rho)

    def select(self, index: torch.Tensor, rows: list[int] | None = None) -> "EvalContext":
        """A view of this context for the batch rows ``index`` (same memory, subset of generators); ``rows``:
        ``index`` as a list of Python ints when the caller has it (else it is read from ``index``)."""
        sub = copy_context(self)
        base = self.index if self.index is not None else None
        sub.index = base[index] if base is not None else index
        if self.generators is not None:
            sub.generators = [self.generators[int(i)] for i in (rows if rows is not None else index.tolist())]
        return sub


def copy_context(ctx: EvalContext) -> EvalContext:
    new = EvalContext.__new__(EvalContext)
    new.__dict__.update(ctx.__dict__)
    return new


def _pair(ctx: EvalContext, net, x, sigma, labels_a, labels_b, sigma_b=None):
    """The same network on two branches in one batched forward; returns (out_a, out_b)."""
    n = x.shape[0]
    labels = None
    if labels_a is not None or labels_b is not None:
        labels = torch.cat([labels_a, labels_b])
    out = ctx.call(net, torch.cat([x, x]), torch.cat([sigma, sigma if sigma_b is None else sigma_b]), labels)
    return out[:n], out[n:]


def _one_hot_like(index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-hot rows like ``labels`` (a scatter: ``F.one_hot`` range-checks its input on the host)."""
    out = torch.zeros(labels.shape, dtype=labels.dtype, device=labels.device)
    return out.scatter_(1, index.to(labels.device).reshape(-1, 1), 1)


def _host_mask(fn: Callable[[torch.Tensor], torch.Tensor], host: float, like: torch.Tensor) -> torch.Tensor:
    """``fn`` of the per-sample noise levels, all equal to ``host``, computed on a CPU copy of ``like``'s
    shape and dtype: the same numbers the device would compute, without reading them back."""
    return fn(torch.full(like.shape, host, dtype=like.dtype))



def finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def nonnegative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def nonpositive(v: float) -> str | None:
    return None if math.isfinite(v) and v <= 0 else "must be a finite number <= 0 (a momentum beta < 0; 0 = none)"


def unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must lie in [0, 1]"


@dataclasses.dataclass(frozen=True)
class Param:
    """A tunable parameter of a guidance class, declared next to its constructor.

    ``name``: the constructor keyword; ``type`` and ``default``: the constructor's; ``check(value)``: what
    is wrong with a value (None: fine); ``help``: one line; ``flag``: its name after the method's on a
    command line (``apg`` + ``momentum``: ``--apg-momentum``; default ``name`` with ``-`` for ``_``).
    ``applies(net)``: whether it has an effect with the main network ``net`` (None: always); where it has
    none, ``no_effect`` says why, naming other parameters as ``{name}``."""

    name: str
    type: type
    default: Any
    check: Callable[[Any], str | None]
    help: str
    flag: str = ""
    applies: Callable[[Callable], bool] | None = None
    no_effect: str = ""

    @property
    def cli_name(self) -> str:
        return self.flag or self.name.replace("_", "-")


class Guidance:
    """No guidance: ``D = D_1``, one forward of the main network. The base class of all guidance.

    A guidance object turns ``(denoiser, x, sigma, labels, ctx)`` into a :class:`Guided` result: either a
    plain linear combination ``D = d0 + w (d1 - d0)`` of the main output ``d1`` and a guiding output
    ``d0`` (no guidance, CFG, autoguidance, ICG, TSG, and any of them inside :class:`Interval` or
    :class:`CADS`) that the samplers hand to the fused solver step as it is, or an already combined ``D``
    (:class:`APG`, whose projection is not linear).

    Conventions:

    - ``denoiser(x, sigma, labels)`` with ``sigma`` a per-sample ``[N]`` tensor and ``labels`` one-hot
      class vectors ``[N, label_dim]`` (or None), like ``fastdiff.nn.Precond``.
    - ``w = 1`` means no guidance: only the main network is evaluated (as in the official EDM2 sampler).
    - Where the main and the guiding branch are the same network (CFG with a null label, ICG, TSG) both
      branches run as ONE forward of the concatenated batch ``[2N, ...]``.
    - Random draws (ICG labels, TSG and CADS noise) come from the per-sample generators of the context,
      so a sample's result depends on its own seed only.
    """

    weight: float = 1.0
    #: The method's name in ``METHODS`` and on command lines (None: not a method of its own).
    method: str | None = None
    #: Its tunable parameters (see :class:`Param`); the constructor takes each as a keyword.
    params: tuple[Param, ...] = ()
    #: The constructor keyword taking a guiding network (None: guides with the main network itself), and
    #: whether that network is required.
    guide_arg: str | None = None
    guide_required: bool = False
    #: Why the main network must be class-conditional where :attr:`needs_labels` says so (``{net}`` and
    #: ``{guide}`` name the networks).
    labels_reason: str = "needs a class-conditional {net}"

    @property
    def needs_labels(self) -> bool:
        """Whether it compares the class condition with something else (the main network must be conditional)."""
        return False

    @property
    def uses_null_label(self) -> bool:
        """Whether a branch is the main network with the null label (learned only with label dropout)."""
        return False

    def branch(self, net: Callable) -> str:
        """What the guiding branch is, in a few words (``{net}`` and ``{guide}`` name the networks)."""
        return "none"

    @classmethod
    def check_params(cls, values: dict) -> str | None:
        """What is wrong with the parameter values together (each one's own check aside); ``{name}`` marks
        a parameter's name. ``values`` holds every parameter (defaults filled in)."""
        return None

    def evaluate(self, net: Callable, x: torch.Tensor, sigma: torch.Tensor, labels, ctx: EvalContext) -> Guided:
        return Guided(ctx.call(net, x, sigma, labels))

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if not callable(v) and not isinstance(v, torch.nn.Module)}
        fields = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{type(self).__name__}({fields})"


class CFG(Guidance):
    """Classifier-free guidance ``D = D_u + w (D_c - D_u)``.

    The unconditional branch is ``uncond(x, sigma, None)`` (a separate unconditional network) or, when
    ``uncond`` is None, the main network with the null label ``null_label`` (default: all-zero label
    vectors), both branches in one batched forward."""

    method, guide_arg = "cfg", "uncond"

    def __init__(self, weight: float, uncond: Callable | None = None, null_label: torch.Tensor | None = None):
        self.weight = float(weight)
        self.uncond = uncond
        self.null_label = null_label

    needs_labels = True

    @property
    def uses_null_label(self) -> bool:
        return self.uncond is None

    def branch(self, net) -> str:
        return "unconditional {guide}" if self.uncond is not None else "null label of {net}"

    def _null(self, labels: torch.Tensor) -> torch.Tensor:
        if self.null_label is None:
            return torch.zeros_like(labels)
        return self.null_label.to(device=labels.device, dtype=labels.dtype).expand_as(labels)

    def branches(self, net, x, sigma, labels, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uncond is not None:
            return ctx.call(net, x, sigma, labels), ctx.call(self.uncond, x, sigma, None)
        if labels is None:
            raise ValueError(
                "CFG with a null label needs class labels; pass labels=, or an unconditional network as uncond="
            )
        return _pair(ctx, net, x, sigma, labels, self._null(labels))

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if self.weight == 1:
            return Guided(ctx.call(net, x, sigma, labels))
        d1, d0 = self.branches(net, x, sigma, labels, ctx)
        return Guided(d1, d0, self.weight)


class Autoguidance(Guidance):
    """Autoguidance ``D = D_0 + w (D_1 - D_0)`` with ``D_0 = guide(x, sigma, labels)`` a smaller or less
    trained version of the main network (the official EDM2 ``gnet``). With an unconditional ``guide``
    this is CFG with a separate unconditional network."""

    method, guide_arg, guide_required = "autoguidance", "guide", True

    def __init__(self, weight: float, guide: Callable):
        if callable(weight) or isinstance(guide, (int, float)):
            raise TypeError("Autoguidance(weight, guide): the weight comes first, then the guide network")
        if guide is None:
            raise ValueError("Autoguidance needs a guide network")
        self.weight = float(weight)
        self.guide = guide

    def branch(self, net) -> str:
        as_cfg = int(getattr(net, "label_dim", 0) or 0) > 0 and not int(getattr(self.guide, "label_dim", 0) or 0)
        return "guide {guide}" + (" (unconditional: CFG)" if as_cfg else "")

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if self.weight == 1:
            return Guided(ctx.call(net, x, sigma, labels))
        return Guided(ctx.call(net, x, sigma, labels), ctx.call(self.guide, x, sigma, labels), self.weight)


class Interval(Guidance):
    """Applies ``inner`` guidance only inside an interval; elsewhere ``D = D_1`` from the main network
    alone, and the guiding network is not evaluated at all.

    ``sigma=(lo, hi)``: samples whose noise level lies in ``(lo, hi]``. ``steps``: a pair
    ``(first, last)`` of step indices (inclusive), or any collection of step indices (the Heun
    correction of step i counts as step i). If only part of the batch is inside (per-sample noise
    levels that differ), the inner guidance runs on that part only."""

    def __init__(self, inner: Guidance, sigma: tuple[float, float] | None = None, steps=None):
        if (sigma is None) == (steps is None):
            raise ValueError("Interval: give exactly one of sigma=(lo, hi) or steps=")
        if sigma is not None:
            lo, hi = (float(v) for v in sigma)
            if not lo < hi:
                raise ValueError(f"Interval: expected sigma=(lo, hi) with lo < hi, got {sigma}")
            sigma = (lo, hi)
        if steps is not None and isinstance(steps, tuple) and len(steps) == 2:
            steps = range(int(steps[0]), int(steps[1]) + 1)
        self.inner = inner
        self.sigma = sigma
        self.steps = set(int(s) for s in steps) if steps is not None else None

    @property
    def needs_labels(self) -> bool:
        return self.inner.needs_labels

    def inside(self, sigma: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        if self.steps is not None:
            return torch.full(sigma.shape, ctx.step in self.steps, dtype=torch.bool, device=sigma.device)
        lo, hi = self.sigma
        return (sigma > lo) & (sigma <= hi)

    def _decide(self, sigma: torch.Tensor, ctx: EvalContext) -> bool | None:
        """True / False when every sample is inside / outside, decided on the host (a step index, or the
        evaluation's noise level as a Python float compared as the device compares it); None when unknown."""
        if self.steps is not None:
            return ctx.step in self.steps
        host = getattr(ctx, "host_sigma", None)
        if host is None:
            return None
        return host_list(_host_mask(lambda s: self.inside(s, ctx), host, sigma[:1]))[0]

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        decided = self._decide(sigma, ctx)
        if decided is None:  # per-sample noise levels (dpm_adaptive): decided from the device values
            mask = self.inside(sigma, ctx)
            decided = True if bool(mask.all()) else (False if not bool(mask.any()) else None)
        if decided is True:
            return self.inner.evaluate(net, x, sigma, labels, ctx)
        if decided is False:
            return Guided(ctx.call(net, x, sigma, labels))
        # Mixed batch: inner guidance on the rows inside, the main network alone on the others.
        idx_in, idx_out = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        sel = (lambda t, i: None if t is None else t[i])
        g_in = self.inner.evaluate(net, x[idx_in], sigma[idx_in], sel(labels, idx_in), ctx.select(idx_in)).combine()
        d_out = ctx.call(net, x[idx_out], sigma[idx_out], sel(labels, idx_out))
        D = torch.empty_like(x, dtype=g_in.dtype)
        D[idx_in] = g_in
        D[idx_out] = d_out.to(g_in.dtype)
        return Guided(D)


class APG(Guidance):
    """Adaptive projected guidance. With ``delta = D_c - D_u``: momentum ``delta <- delta + beta *
    running`` (running average over the evaluations of a run, ``beta < 0``), rescale ``delta *= min(1,
    r / ||delta||)`` per sample (``r=None``: no rescale), split into the part parallel to ``D_c`` and
    the orthogonal rest (in float64), ``U = delta_perp + eta * delta_par``, ``D = D_c + (w - 1) U``.

    The unconditional branch is chosen as in :class:`CFG` (``uncond`` network or null label) or, with
    ``guide=``, a guide network as in :class:`Autoguidance`."""

    method, guide_arg = "apg", "guide"
    params = (
        Param("eta", float, 0.0, finite, "weight eta of the update's part parallel to D_c"),
        Param("beta", float, -0.5, nonpositive, "momentum beta (< 0; 0 = no momentum)", flag="momentum"),
        Param("r", float, None, positive, "rescale radius r, ||D_c - D_u|| clipped to r per sample (none = no "
              "rescale)", flag="rescale"),
    )
    labels_reason = ("without {guide} uses the null label of {net}, so it needs a class-conditional {net}; "
                     "{unconditional} (or give a guiding network with {guide})")

    def __init__(self, weight: float, uncond: Callable | None = None, null_label: torch.Tensor | None = None,
                 guide: Callable | None = None, eta: float = 0.0, r: float | None = None, beta: float = -0.5):
        self.weight = float(weight)
        self.source = Autoguidance(2.0, guide) if guide is not None else CFG(2.0, uncond, null_label)
        self.eta, self.r, self.beta = float(eta), (None if r is None else float(r)), float(beta)

    @property
    def needs_labels(self) -> bool:
        return isinstance(self.source, CFG)

    @property
    def uses_null_label(self) -> bool:
        return self.source.uses_null_label

    def branch(self, net) -> str:
        return "guide {guide}" if isinstance(self.source, Autoguidance) else self.source.branch(net)

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if self.weight == 1:
            return Guided(ctx.call(net, x, sigma, labels))
        if isinstance(self.source, CFG):
            d_c, d_u = self.source.branches(net, x, sigma, labels, ctx)
        else:
            d_c, d_u = ctx.call(net, x, sigma, labels), ctx.call(self.source.guide, x, sigma, labels)
        with nvtx_range("guidance"):
            n = x.shape[0]
            delta = (d_c.double() - d_u.double()).reshape(n, -1)
            if self.beta != 0:
                key = (id(self), "running")
                running = ctx.memory.get(key)
                if running is None:
                    running = torch.zeros((ctx.batch or n, delta.shape[1]), dtype=torch.float64, device=delta.device)
                    ctx.memory[key] = running
                rows = ctx.index if ctx.index is not None else slice(None)
                delta = delta + self.beta * running[rows]
                running[rows] = delta
            if self.r is not None:
                norm = delta.norm(dim=1, keepdim=True)
                delta = delta * torch.clamp(self.r / norm.clamp_min(1e-30), max=1.0)
            v = d_c.double().reshape(n, -1)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            par = (delta * v).sum(dim=1, keepdim=True) * v
            update = (delta - par) + self.eta * par
            D = d_c.double().reshape(n, -1) + (self.weight - 1.0) * update
            return Guided(D.reshape(x.shape).to(d_c.dtype))


class ICG(Guidance):
    """Independent condition guidance: CFG whose unconditional branch uses an independent random class
    (one-hot, drawn per sample and per evaluation from the sample's generator) instead of a null
    label. Both branches in one batched forward."""

    method = "icg"
    needs_labels = True

    def branch(self, net) -> str:
        return "random class"

    def __init__(self, weight: float, num_classes: int | None = None):
        self.weight = float(weight)
        self.num_classes = num_classes

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if self.weight == 1:
            return Guided(ctx.call(net, x, sigma, labels))
        if labels is None:
            raise ValueError("ICG needs class labels (labels=)")
        k = self.num_classes or labels.shape[1]
        idx = rng.randint(ctx.generators, x.shape[0], k, device=labels.device)
        d1, d0 = _pair(ctx, net, x, sigma, labels, _one_hot_like(idx, labels))
        return Guided(d1, d0, self.weight)


def noise_embedding_layer(net: Callable) -> torch.nn.Module | None:
    """The module whose output is ``net``'s noise embedding: the one submodule named ``emb_noise`` (the
    EDM2 U-Net's, in fastdiff's networks and official pickles loaded by fastdiff), looked for in ``net``
    and in what it wraps (``net.net`` of a wrapper such as ``cuda_graphed``). None when there is not
    exactly one."""
    seen = set()
    while net is not None and id(net) not in seen:
        seen.add(id(net))
        if isinstance(net, torch.nn.Module):
            found = [m for name, m in net.named_modules() if name.split(".")[-1] == "emb_noise"]
            return found[0] if len(found) == 1 else None
        net = getattr(net, "net", None)
    return None


def _eager(net: Callable) -> Callable:
    """``net`` without a graph-replaying wrapper: a forward hook has to run in the eager forward."""
    from fastdiff.sampling.graphs import GraphedDenoiser

    while isinstance(net, GraphedDenoiser):
        net = net.net
    return net


class TSG(Guidance):
    """Time-step guidance: the guiding branch is the main network with a perturbed noise embedding
    ``e~ = e + s * std(e) * n`` (``n ~ N(0, I)`` per sample, std over the embedding of each sample).

    How the embedding is reached: if the denoiser has a noise-embedding layer (see
    :func:`noise_embedding_layer`), a forward hook on that layer, registered for the one batched
    forward of both branches and removed after it, perturbs the guiding half of its ``[2N, C]`` output.
    Otherwise (a generic callable) the noise conditioning itself is perturbed: the guiding branch is
    evaluated at ``c_noise~ = c_noise + c_noise_scale * n`` with ``c_noise = ln(sigma) / 4``, i.e. at
    ``sigma * exp(4 c_noise_scale n)``, which also changes the network's preconditioning and is only an
    approximation of TSG. Both branches in one batched forward."""

    method = "tsg"
    params = (
        Param("scale", float, 1.0, nonnegative, "s in e~ = e + s std(e) n, for networks with a noise embedding "
              "layer (fastdiff's, and official pickles loaded by fastdiff)",
              applies=lambda net: noise_embedding_layer(net) is not None,
              no_effect="it has no noise embedding layer, so TSG perturbs its noise conditioning c_noise instead "
                        "(set that with {c_noise_scale})"),
        Param("c_noise_scale", float, 0.1, nonnegative, "on networks without that layer (other callables): std of "
              "the perturbation of c_noise = ln(sigma)/4",
              applies=lambda net: noise_embedding_layer(net) is None,
              no_effect="it has a noise embedding layer, so TSG perturbs its noise embedding (set that with {scale})"),
    )

    def branch(self, net) -> str:
        return "perturbed noise embedding" if noise_embedding_layer(net) is not None else "perturbed c_noise"

    def __init__(self, weight: float, scale: float = 1.0, c_noise_scale: float = 0.1):
        self.weight = float(weight)
        self.scale = float(scale)
        self.c_noise_scale = float(c_noise_scale)

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if self.weight == 1:
            return Guided(ctx.call(net, x, sigma, labels))
        n = x.shape[0]
        layer = noise_embedding_layer(net)
        if layer is not None:
            gens, scale = ctx.generators, self.scale

            def perturb(module, inputs, e: torch.Tensor) -> torch.Tensor:
                if e.shape[0] != 2 * n:
                    raise ValueError(f"TSG: expected the noise embedding of both branches, [{2 * n}, ...], got "
                                     f"{tuple(e.shape)}")
                noise = rng.randn(gens, n, e.shape[1:], device=e.device, dtype=torch.float32)
                guide = e[n:].float()
                std = guide.reshape(n, -1).std(dim=1).reshape((n,) + (1,) * (e.ndim - 1))
                return torch.cat([e[:n], (guide + scale * std * noise).to(e.dtype)])

            handle = layer.register_forward_hook(perturb)
            try:
                d1, d0 = _pair(ctx, _eager(net), x, sigma, labels, labels)
            finally:
                handle.remove()
        else:
            noise = rng.randn(ctx.generators, n, (), device=sigma.device, dtype=torch.float64)
            sigma_b = (sigma.double() * torch.exp(4.0 * self.c_noise_scale * noise)).to(sigma.dtype)
            d1, d0 = _pair(ctx, net, x, sigma, labels, labels, sigma_b=sigma_b)
        return Guided(d1, d0, self.weight)


class CADS(Guidance):
    """Condition-annealed sampling around ``inner`` guidance: the class condition is replaced by
    ``c~ = sqrt(g(t)) c + s sqrt(1 - g(t)) n`` (``n ~ N(0, I)`` per sample and evaluation), with
    ``g = 1`` for ``t < tau1``, linear down to 0 at ``tau2``, 0 above; then rescaled to the mean and
    std of ``c`` (per sample) and mixed ``psi * rescaled + (1 - psi) * c~``.

    ``t`` is the normalized position of the evaluation's sigma on the EDM schedule (see
    :meth:`EvalContext.t_of`): 1 at ``sigma_max`` (pure noise), 0 at ``sigma_min``; at step i of N it
    is ``1 - i/(N-1)``. The annealed condition goes to every branch that takes the condition."""

    method = "cads"
    params = (
        Param("tau1", float, 0.6, unit, "full condition below t = tau1 (t in [0, 1], 1 = noise)"),
        Param("tau2", float, 0.9, unit, "pure noise condition above t = tau2"),
        Param("s", float, 0.25, nonnegative, "noise scale s of the annealed condition"),
        Param("psi", float, 1.0, unit, "mix psi of the condition rescaled to the original mean/std (0 = no rescale)"),
    )
    needs_labels = True
    labels_reason = "anneals the class condition, so it needs a class-conditional {net}; {unconditional}"

    @classmethod
    def check_params(cls, values: dict) -> str | None:
        if not values["tau1"] <= values["tau2"]:
            return f"{{tau1}} ({values['tau1']}) must not exceed {{tau2}} ({values['tau2']})"
        return None

    def __init__(self, inner: Guidance | None = None, tau1: float = 0.6, tau2: float = 0.9, s: float = 0.25,
                 psi: float = 1.0, rescale: bool = True):
        if not 0 <= tau1 <= tau2 <= 1:
            raise ValueError(f"CADS: expected 0 <= tau1 <= tau2 <= 1, got tau1={tau1}, tau2={tau2}")
        self.inner = inner if inner is not None else Guidance()
        self.tau1, self.tau2, self.s, self.psi, self.rescale = float(tau1), float(tau2), float(s), float(psi), rescale

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        if self.tau2 == self.tau1:
            return (t < self.tau1).double()
        return ((self.tau2 - t) / (self.tau2 - self.tau1)).clamp(0.0, 1.0)

    def anneal(self, labels: torch.Tensor, sigma: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        host = getattr(ctx, "host_sigma", None)
        if host is not None:  # decided on the host, from the same computation on a CPU copy
            if host_list(_host_mask(lambda s: (self.gamma(ctx.t_of(s)) >= 1).all(), host, sigma)):
                return labels
            g = self.gamma(ctx.t_of(sigma)).to(labels.device)
        else:  # per-sample noise levels: one read
            g = self.gamma(ctx.t_of(sigma)).to(labels.device)
            if bool((g >= 1).all()):
                return labels
        n = labels.shape[0]
        c = labels.double()
        shape = (n,) + (1,) * (c.ndim - 1)
        g = g.reshape(shape)
        noise = rng.randn(ctx.generators, n, c.shape[1:], device=c.device, dtype=torch.float64)
        c_new = g.sqrt() * c + self.s * (1 - g).sqrt() * noise
        if self.rescale and c.ndim > 1 and c[0].numel() > 1:
            dims = tuple(range(1, c.ndim))
            mean_in, std_in = c.mean(dims, keepdim=True), c.std(dims, keepdim=True)
            mean_new, std_new = c_new.mean(dims, keepdim=True), c_new.std(dims, keepdim=True)
            rescaled = (c_new - mean_new) / std_new.clamp_min(1e-30) * std_in + mean_in
            c_new = self.psi * rescaled + (1 - self.psi) * c_new
        return c_new.to(labels.dtype)

    def evaluate(self, net, x, sigma, labels, ctx) -> Guided:
        if labels is None:
            raise ValueError("CADS needs class labels (labels=) to anneal")
        with nvtx_range("guidance"):
            labels = self.anneal(labels, sigma, ctx)
        return self.inner.evaluate(net, x, sigma, labels, ctx)


#: The guidance methods by name: each class's :attr:`Guidance.method` (CADS wraps any of them).
METHODS: dict[str, type[Guidance]] = {cls.method: cls for cls in (CFG, Autoguidance, APG, ICG, TSG)}


def as_guidance(guidance) -> Guidance:
    if guidance is None:
        return Guidance()
    if not isinstance(guidance, Guidance):
        raise TypeError(f"expected a fastdiff.sampling.guidance.Guidance object or None, got {type(guidance).__name__}")
    return guidance

