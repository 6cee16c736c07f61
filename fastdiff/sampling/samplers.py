"""Samplers for EDM-parameterized denoisers ``D(x; sigma)``, each a small public function in the
k-diffusion manner, ``sample_NAME(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None,
callback=None, ...)``, and :func:`sample`, a dispatcher over the registry :data:`SAMPLERS`.

This module holds EDM's Heun, Euler, Euler ancestral and DPM-Solver++(2M); :mod:`fastdiff.sampling.dpm` the
DPM-Solver family, LMS and the SDE samplers; :mod:`fastdiff.sampling.adaptive` the adaptive DPM-Solver. Every
sampler composes with every guidance object and draws its noise from the per-sample generators; the keywords
they share are listed at :func:`sample`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from fastdiff._runtime import nvtx_range
from fastdiff.diffusion import edm_sigma_steps
from fastdiff.sampling import adaptive, dpm, rng
from fastdiff.sampling._loop import Loop, ancestral_step
from fastdiff.sampling.hostreads import host_list
from fastdiff.sampling.guidance import Autoguidance

__all__ = [
    "SAMPLERS", "REGISTRY", "edm_sigma_steps", "sample", "edm_sampler", "sampler_function", "sampler_options",
    "sampler_kwargs", "check_churn_options", "sample_heun", "sample_euler", "sample_euler_ancestral",
    "sample_dpmpp_2m",
]


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, randn_like=None, schedule=None, info=None):
    """EDM's 2nd-order Heun sampler (EDM Algorithm 2): an Euler step and a trapezoidal correction per
    step (none on the last, to sigma = 0), 2N - 1 evaluations; with ``s_churn > 0`` each step in
    ``[s_tmin, s_tmax]`` first raises the noise level to ``sigma_hat = (1 + gamma) sigma`` with fresh
    noise ``sqrt(sigma_hat^2 - sigma^2) s_noise n``."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    t_steps, num_steps = run.sigmas, len(run.sigmas) - 1
    gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_churn > 0 else 0.0
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        h_hat = run.host[i]
        if gamma > 0 and s_tmin <= h_hat <= s_tmax:
            h_hat = run.host_op(lambda t: t + gamma * t, h_hat)
            t_hat = run.scalar(h_hat)
            x_hat = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * run.noise(x)
        else:
            t_hat, x_hat = t_cur, x
        s_hat, s_next = run.sig(t_hat), run.sig(t_next)
        x_next, d_cur, denoised = run.step(x_hat, run.evaluate(x_hat, s_hat, i, host=h_hat), s_hat, s_next)
        if i < num_steps - 1:
            g2 = run.evaluate(x_next, s_next, i, correction=True, host=run.host[i + 1])
            x_next, _, denoised = run.step(x_next, g2, s_hat, s_next, d_prev=d_cur, x_base=x_hat)
        x = x_next
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, randn_like=None, schedule=None, info=None):
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D) / sigma`` (EDM Eq. 4), one
    evaluation per step; with ``s_churn > 0``, EDM's churn before each step in ``[s_tmin, s_tmax]``:
    ``sigma_hat = (1 + gamma) sigma``, ``x += sqrt(sigma_hat^2 - sigma^2) s_noise n``, and the step is
    taken from ``sigma_hat``."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    num_steps = len(run.sigmas) - 1
    for i in range(num_steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        x, sigma, host = run.churn(x, sigma, s_churn, s_tmin, s_tmax, s_noise, run.host[i])
        x, _, denoised = run.step(x, run.evaluate(x, sigma, i, host=host), run.sig(sigma), run.sig(sigma_next))
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None,
                           eta=1.0, s_noise=1.0, randn_like=None, schedule=None, info=None):
    """Ancestral sampling with Euler steps: each step goes down to ``sigma_down`` deterministically and
    adds fresh noise ``s_noise sigma_up n`` (see :func:`fastdiff.sampling._loop.ancestral_step`; ``eta``
    scales ``sigma_up``, 0 is the Euler sampler)."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        target, sigma_up = sigma_next, 0.0
        if run.host[i + 1] > 0:
            target, sigma_up = ancestral_step(run.host[i], run.host[i + 1], eta)
        x, _, denoised = run.step(x, run.evaluate(x, sigma, i, host=run.host[i]), run.sig(sigma), run.sig(target))
        if sigma_up > 0:
            x = x + (s_noise * sigma_up) * run.noise(x)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None,
                    schedule=None, info=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in sigma form: with ``h = ln(s/s')`` and
    ``r = h_prev / h``, ``D_hat = (1 + 1/(2r)) D - 1/(2r) D_prev`` and ``x' = (s'/s) x + (1 - s'/s) D_hat``;
    the first and the last step are first order (``D_hat = D``, which is exactly the Euler step)."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, None, schedule, info)
    denoised_prev, h_prev = None, None
    for i in range(len(run.sigmas) - 1):
        t_cur, t_next = run.sigmas[i], run.sigmas[i + 1]
        s, s1 = run.host[i], run.host[i + 1]
        g = run.evaluate(x, t_cur, i, host=s)
        if denoised_prev is None or s1 == 0:
            x, _, denoised = run.step(x, g, run.sig(t_cur), run.sig(t_next))
        else:
            with nvtx_range("solver_step"):
                h = math.log(s / s1)
                c = h_prev / h
                denoised = g.combine()
                d_hat = (1 + 1 / (2 * c)) * denoised - (1 / (2 * c)) * denoised_prev
                x = ((s1 / s) * x + (1 - s1 / s) * d_hat).to(x.dtype)
        if s1 > 0:
            h_prev = math.log(s / s1)
        denoised_prev = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x


REGISTRY: dict[str, Callable] = {
    "heun": sample_heun,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpm_2": dpm.sample_dpm_2,
    "dpm_2_ancestral": dpm.sample_dpm_2_ancestral,
    "lms": dpm.sample_lms,
    "dpmpp_2s_ancestral": dpm.sample_dpmpp_2s_ancestral,
    "dpmpp_sde": dpm.sample_dpmpp_sde,
    "dpmpp_2m_sde": dpm.sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": dpm.sample_dpmpp_3m_sde,
    "dpm_adaptive": adaptive.sample_dpm_adaptive,
}
SAMPLERS = tuple(REGISTRY)

# sample()'s EDM-style option names -> the samplers' keyword names, with the value that means "unused"
_OPTIONS = {"S_churn": ("s_churn", 0.0), "S_min": ("s_tmin", 0.0), "S_max": ("s_tmax", float("inf")),
            "S_noise": ("s_noise", 1.0), "eta": ("eta", None)}


_RESERVED = ("s_churn", "s_tmin", "s_tmax", "s_noise", "eta")  # given to sample() by their EDM names


def sampler_function(name: str) -> Callable:
    """The sampling function registered as ``name`` (one of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return REGISTRY[name]


def sampler_options(name: str) -> tuple[str, ...]:
    """The keyword options sampler ``name`` takes beyond the common ones (``s_churn``, ``eta``, ``rtol``...)."""
    common = {"denoiser", "x", "sigmas", "guidance", "labels", "generators", "callback", "randn_like", "schedule",
              "info", "sigma_min", "sigma_max"}
    return tuple(p for p in inspect.signature(sampler_function(name)).parameters if p not in common)


def check_churn_options(S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                        S_noise: float = 1.0) -> None:
    """``ValueError`` naming the option unless ``S_churn``, ``S_min``, ``S_noise`` are finite and >= 0 and
    ``S_max`` is >= ``S_min`` (``inf`` allowed: churn at every noise level), as EDM (Alg. 2) defines them."""
    for name, value in (("S_churn", S_churn), ("S_min", S_min), ("S_max", S_max), ("S_noise", S_noise)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if math.isnan(v) or v < 0 or (math.isinf(v) and name != "S_max"):
            allowed = "a number >= 0, or inf" if name == "S_max" else "a finite number >= 0"
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if float(S_min) > float(S_max):
        raise ValueError(f"S_min ({S_min}) > S_max ({S_max}): churn would apply at no noise level")


def _check_eta(v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {v}")


def sampler_kwargs(sampler: str, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                   S_noise: float = 1.0, eta: float | None = None, **options) -> dict:
    """The keyword arguments of sampler ``sampler``'s function for :func:`sample`'s options, checked: a
    value other than "unused" (``S_churn`` 0, ``S_min`` 0, ``S_max`` inf, ``S_noise`` 1, ``eta`` None) for
    an option the sampler has no use for, a negative or non-finite value, or an unknown option is an error."""
    check_churn_options(S_churn, S_min, S_max, S_noise)
    taken = sampler_options(sampler)
    kwargs = {}
    for flag, value in dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, eta=eta).items():
        name, unused = _OPTIONS[flag]
        if value is None or (value == unused and name not in taken):
            continue
        if flag == "eta":
            _check_eta(float(value))
        if name not in taken:
            users = [s for s in SAMPLERS if name in sampler_options(s)]
            raise ValueError(f"sampler {sampler!r} has no use for {flag}={value}; samplers that take it: "
                             f"{', '.join(users)}")
        kwargs[name] = float(value)
    for name in options:
        if name not in taken or name in _RESERVED:
            own = [p for p in taken if p not in _RESERVED]
            raise ValueError(f"sampler {sampler!r} takes no option {name!r}; its own options: {', '.join(own) or 'none'}")
    kwargs.update(options)
    return kwargs


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, sampler: str = "heun", steps: int = 32, guidance=None, labels=None,
           generators=None, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           sigmas: torch.Tensor | None = None, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
           S_noise: float = 1.0, eta: float | None = None, dtype: torch.dtype = torch.float32,
           randn_like: Callable | None = None, callback: Callable | None = None, info: dict | None = None,
           **options) -> torch.Tensor:
    """Draws samples ``x`` from standard-normal ``noise`` ``[N, ...]`` (scaled by ``t_0`` here).

    ``denoiser(x, sigma, labels) -> D`` with ``sigma`` a per-sample ``[N]`` tensor; ``sampler`` one of
    :data:`SAMPLERS` (``'heun'``: EDM, 2N-1 evaluations, stochastic with ``S_churn > 0``; see each
    ``sample_NAME`` function); ``guidance`` a :mod:`fastdiff.sampling.guidance` object (or None);
    ``generators`` one ``torch.Generator`` per sample for every random draw (churn, ancestral and SDE
    noise, random guidance), so that a sample depends on its own generator only (else ``randn_like`` if
    given, else torch's global generator). ``sigmas`` overrides the EDM schedule (decreasing, ending
    with 0). ``S_churn``/``S_min``/``S_max``/``S_noise`` (EDM's churn; ``S_noise`` also scales the noise
    of the ancestral and SDE samplers), ``eta`` (ancestral and SDE samplers) and ``options`` (e.g.
    ``rtol``, ``atol`` of ``'dpm_adaptive'``, ``order`` of ``'lms'``) go to samplers that take them; an
    option a sampler has no use for is an error. ``callback(i, x, denoised)`` runs after each step.
    ``info``: a dict that receives ``'evaluations'`` (network forwards) and the sampler's own report
    (``'dpm_adaptive'``: per-sample ``nfe``, ``n_accept``, ``n_reject``). Returns the final ``x`` in ``dtype``.

    This module holds EDM's Heun (deterministic or stochastic), Euler (with churn), Euler ancestral and
    DPM-Solver++(2M); :mod:`fastdiff.sampling.dpm` the DPM-Solver family, LMS and the SDE samplers;
    :mod:`fastdiff.sampling.adaptive` the adaptive-step DPM-Solver. Every sampler composes with every
    guidance object (the guided ``D`` is used at every evaluation) and draws its noise from the per-sample
    generators, so a sample depends on its own seed only. Euler-type updates go through the batched fused
    solver step ``fastdiff.ops.solver_step`` (one kernel forms the guided ``D`` from the one or two network
    outputs, the derivative and the update); the higher-order updates are a few tensor expressions.

    Keywords every sampler takes: ``guidance`` (a :mod:`fastdiff.sampling.guidance` object or None),
    ``labels`` (one-hot ``[N, label_dim]`` or None), ``generators`` (one per sample, or None for torch's
    global generator / ``randn_like``), ``callback(i, x, denoised)`` after each step, ``schedule`` (the
    ``(sigma_min, sigma_max, rho)`` the sigmas came from, for guidance that reads the normalized time) and
    ``info`` (a dict that receives ``'evaluations'``). A new sampler is a function of this shape added to
    :data:`REGISTRY`.
    """
    fn = sampler_function(sampler)
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise ValueError("noise must be a tensor of shape [N, ...]")
    n, device = noise.shape[0], noise.device
    rng.check_generators(generators, n)
    kwargs = sampler_kwargs(sampler, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, eta=eta, **options)
    # The schedule is made on the host (CPU), so the sampler has it as Python floats without reading the
    # device; the sampler copies it to the device once, before its loop.
    if sigmas is None:
        t_steps = edm_sigma_steps(steps, sigma_min, sigma_max, rho, dtype=torch.float64).to(dtype)
    else:
        t_steps = torch.as_tensor(sigmas)
        if t_steps.ndim != 1 or len(t_steps) < 2:
            raise ValueError("sigmas must be a decreasing 1-D sequence of at least 2 values ending with 0")
        t_steps = t_steps.to(dtype).cpu()  # one read when given on a device
    host = host_list(t_steps)
    if sigmas is not None:
        if host[-1] != 0 or any(b >= a for a, b in zip(host, host[1:])):
            raise ValueError("sigmas must be a decreasing 1-D sequence of at least 2 values ending with 0")
        sigma_min, sigma_max = host[-2], host[0]
    x = noise.to(dtype) * t_steps[0].to(device)
    common = dict(guidance=guidance, labels=labels, generators=generators, callback=callback, info=info,
                  schedule=(sigma_min, sigma_max, rho))
    if "randn_like" in inspect.signature(fn).parameters:
        common["randn_like"] = randn_like
    if sampler == "dpm_adaptive":
        return fn(denoiser, x, host[-2], host[0], **common, **kwargs)
    return fn(denoiser, x, t_steps, **common, **kwargs)


@torch.no_grad()
def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
                S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32, randn_like=torch.randn_like):
    """Drop-in for the official EDM2 ``edm_sampler``: 2nd-order Heun with optional churn; with
    ``guidance != 1`` the guided ``D = gnet_out + guidance (net_out - gnet_out)`` (autoguidance, or CFG
    with an unconditional ``gnet``); ``guidance == 1`` never evaluates ``gnet``. The time steps are
    computed in ``dtype`` as the official function does; ``net`` and ``gnet`` are called as
    ``net(x, sigma, labels)`` with a per-sample ``sigma`` ``[N]``."""
    if guidance != 1 and gnet is None:
        raise ValueError(f"guidance={guidance} needs a guiding network (gnet); guidance=1 means no guidance")
    g = Autoguidance(guidance, gnet) if guidance != 1 else None
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    return sample_heun(net, noise.to(dtype) * t_steps[0], t_steps, guidance=g, labels=labels, s_churn=S_churn,
                       s_tmin=S_min, s_tmax=S_max, s_noise=S_noise, randn_like=randn_like,
                       schedule=(sigma_min, sigma_max, rho))
