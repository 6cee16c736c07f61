"""Samplers for EDM-parameterized denoisers ``D(x; sigma)``: EDM Heun (deterministic or stochastic),
Euler, Euler ancestral and DPM-Solver++(2M), all composable with any guidance object.

Every step goes through the batched solver step ``fastdiff.ops.solver_step`` (one fused kernel forms
the guided ``D`` from the one or two network outputs, the derivative and the update), except the
second-order DPM-Solver++ steps, which are a few tensor expressions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fastdiff._runtime import nvtx_range
from fastdiff import ops
from fastdiff.diffusion import edm_sigma_steps
from fastdiff.sampling import rng
from fastdiff.sampling.guidance import Autoguidance, EvalContext, Guidance, Guided, as_guidance

__all__ = ["SAMPLERS", "edm_sigma_steps", "sample", "edm_sampler"]

SAMPLERS = ("heun", "euler", "euler_ancestral", "dpmpp_2m")


class _Runner:
    """Shared plumbing of the sampling loops: guided evaluation and the fused step."""

    def __init__(self, denoiser, guidance: Guidance, labels, ctx: EvalContext, n: int, dtype, device):
        self.denoiser, self.guidance, self.labels, self.ctx = denoiser, guidance, labels, ctx
        self.n, self.dtype, self.device = n, dtype, device

    def sig(self, t) -> torch.Tensor:
        """A noise level as the per-sample [N] tensor the denoiser and the solver step take."""
        if isinstance(t, torch.Tensor):
            return t.to(device=self.device, dtype=self.dtype).reshape(()).expand(self.n)
        return torch.full((self.n,), float(t), dtype=self.dtype, device=self.device)

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, step: int, correction: bool = False) -> Guided:
        self.ctx.step, self.ctx.correction = step, correction
        return self.guidance.evaluate(self.denoiser, x, sigma, self.labels, self.ctx)

    @staticmethod
    def step(x, g: Guided, sigma_cur, sigma_next, d_prev=None, x_base=None):
        with nvtx_range("solver_step"):
            return ops.solver_step(x, g.d1, g.d0, g.w, sigma_cur, sigma_next, d_prev, x_base)


def _heun(r: _Runner, x, t_steps, S_churn, S_min, S_max, S_noise, noise_like, callback):
    num_steps = len(t_steps) - 1
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        if gamma_max > 0 and S_min <= float(t_cur) <= S_max:
            t_hat = t_cur + gamma_max * t_cur
            x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise_like(x)
        else:
            t_hat, x_hat = t_cur, x
        s_hat, s_next = r.sig(t_hat), r.sig(t_next)
        g = r.evaluate(x_hat, s_hat, i)
        x_next, d_cur, denoised = r.step(x_hat, g, s_hat, s_next)
        if i < num_steps - 1:
            g2 = r.evaluate(x_next, s_next, i, correction=True)
            x_next, _, denoised = r.step(x_next, g2, s_hat, s_next, d_prev=d_cur, x_base=x_hat)
        x = x_next
        if callback is not None:
            callback(i, x, denoised)
    return x


def _euler(r: _Runner, x, t_steps, callback, ancestral=False, eta=1.0, noise_like=None):
    num_steps = len(t_steps) - 1
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        target, sigma_up = t_next, 0.0
        if ancestral and float(t_next) > 0:
            s, s1 = float(t_cur), float(t_next)
            sigma_up = min(s1, eta * math.sqrt(max(s1**2 * (s**2 - s1**2) / s**2, 0.0)))
            target = math.sqrt(s1**2 - sigma_up**2)
        g = r.evaluate(x, r.sig(t_cur), i)
        x, _, denoised = r.step(x, g, r.sig(t_cur), r.sig(target))
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x)
        if callback is not None:
            callback(i, x, denoised)
    return x


def _dpmpp_2m(r: _Runner, x, t_steps, callback):
    """DPM-Solver++(2M) in sigma form: with ``h = ln(s/s')`` and ``r = h_prev / h``,
    ``D_hat = (1 + 1/(2r)) D - 1/(2r) D_prev`` and ``x' = (s'/s) x + (1 - s'/s) D_hat``; the first and
    the last step are first order (``D_hat = D``, which is exactly the Euler step)."""
    num_steps = len(t_steps) - 1
    denoised_prev, h_prev = None, None
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        s, s1 = float(t_cur), float(t_next)
        g = r.evaluate(x, r.sig(t_cur), i)
        if denoised_prev is None or s1 == 0:
            x, _, denoised = r.step(x, g, r.sig(t_cur), r.sig(t_next))
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


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, sampler: str = "heun", steps: int = 32, guidance=None, labels=None,
           generators=None, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           sigmas: torch.Tensor | None = None, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
           S_noise: float = 1.0, eta: float = 1.0, dtype: torch.dtype = torch.float32,
           randn_like: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Draws samples ``x`` from standard-normal ``noise`` ``[N, ...]`` (scaled by ``t_0`` here).

    ``denoiser(x, sigma, labels) -> D`` with ``sigma`` a per-sample ``[N]`` tensor; ``sampler`` one of
    ``'heun'`` (EDM, 2N-1 evaluations; stochastic with ``S_churn > 0``), ``'euler'``,
    ``'euler_ancestral'`` (``eta`` scales the fresh noise) or ``'dpmpp_2m'``; ``guidance`` a
    :mod:`fastdiff.sampling.guidance` object (or None); ``generators`` one ``torch.Generator`` per
    sample for churn / ancestral noise and random guidance, so that a sample depends on its own
    generator only (else ``randn_like`` if given, else torch's global generator). ``sigmas`` overrides
    the EDM schedule (decreasing, ending with 0). ``callback(i, x, denoised)`` runs after each step.
    Returns the final ``x`` in ``dtype``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1:
        raise ValueError("noise must be a tensor of shape [N, ...]")
    n, device = noise.shape[0], noise.device
    rng.check_generators(generators, n)
    guidance = as_guidance(guidance)
    if sigmas is None:
        t_steps = edm_sigma_steps(steps, sigma_min, sigma_max, rho, dtype=torch.float64, device=device).to(dtype)
    else:
        t_steps = torch.as_tensor(sigmas, device=device).to(dtype)
        bad = t_steps.ndim != 1 or len(t_steps) < 2
        if bad or float(t_steps[-1]) != 0 or bool((t_steps[1:] >= t_steps[:-1]).any()):
            raise ValueError("sigmas must be a decreasing 1-D sequence of at least 2 values ending with 0")
        sigma_min, sigma_max = float(t_steps[-2]), float(t_steps[0])
    return _run(denoiser, noise, sampler, t_steps, guidance, labels, generators, sigma_min, sigma_max, rho,
                S_churn, S_min, S_max, S_noise, eta, dtype, randn_like, callback)


def _run(denoiser, noise, sampler, t_steps, guidance, labels, generators, sigma_min, sigma_max, rho, S_churn, S_min,
         S_max, S_noise, eta, dtype, randn_like, callback):
    n, device = noise.shape[0], noise.device
    ctx = EvalContext(num_steps=len(t_steps) - 1, sigmas=t_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                      generators=generators, dtype=dtype, batch=n)
    if generators is not None:
        noise_like = lambda x: rng.randn_like(x, generators)  # noqa: E731
    else:
        noise_like = randn_like or torch.randn_like
    r = _Runner(denoiser, guidance, labels, ctx, n, dtype, device)
    x = noise.to(dtype) * t_steps[0]
    if sampler == "heun":
        return _heun(r, x, t_steps, S_churn, S_min, S_max, S_noise, noise_like, callback)
    if sampler in ("euler", "euler_ancestral"):
        return _euler(r, x, t_steps, callback, ancestral=sampler == "euler_ancestral", eta=eta, noise_like=noise_like)
    return _dpmpp_2m(r, x, t_steps, callback)


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
    g = Autoguidance(gnet, guidance) if guidance != 1 else None
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    return _run(net, noise, "heun", t_steps, as_guidance(g), labels, None, sigma_min, sigma_max, rho, S_churn, S_min,
                S_max, S_noise, 1.0, dtype, randn_like, None)
