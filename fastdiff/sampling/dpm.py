"""The DPM-Solver family, LMS and the SDE samplers, as k-diffusion publishes them, for EDM denoisers.

Same calling convention as :mod:`fastdiff.sampling.samplers`. Notation: ``t = -ln sigma`` (``lambda`` in the
DPM-Solver papers), ``h = t_next - t``, ``D`` the guided denoiser output. Every random draw comes from the
per-sample generators; the SDE samplers take their noise from a Brownian motion in sigma drawn from them
(:class:`fastdiff.sampling._loop.BrownianNoise`: k-diffusion's law, not its numbers), or from
``noise_sampler(sigma, sigma_next)``.
"""

from __future__ import annotations

import math

import torch

from fastdiff.sampling._loop import Loop, ancestral_step

__all__ = [
    "sample_dpm_2", "sample_dpm_2_ancestral", "sample_lms", "lms_coefficient", "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
]


def _midpoint_step(run: Loop, x, g, sigma, target, i: int, host: float, host_target: float):
    """DPM-Solver-2's step from ``sigma`` to ``target`` (0-d tensors; ``host``, ``host_target``: their values
    as Python floats) with the evaluation ``g`` at ``sigma``: an Euler half step to ``sigma_mid = sqrt(sigma
    target)``, then the full step with the derivative there; to 0 plain Euler. Returns ``(x, denoised)``."""
    if host_target == 0:
        x, _, denoised = run.step(x, g, run.sig(sigma), run.sig(target))
        return x, denoised
    host_mid = run.host_op(lambda s, t: s.log().lerp(t.log(), 0.5).exp(), host, host_target)
    sigma_mid = run.scalar(host_mid)
    x_2, _, denoised = run.step(x, g, run.sig(sigma), run.sig(sigma_mid))
    d_2 = (x_2 - run.denoise(x_2, sigma_mid, i, correction=True, host=host_mid)) / sigma_mid
    return x + d_2 * (target - sigma), denoised


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0, randn_like=None, schedule=None, info=None):
    """DPM-Solver-2 in sigma form (the midpoint method in log sigma; Karras et al. 2022, Algorithm 2's
    structure with k-diffusion's midpoint): from ``sigma`` an Euler half step to ``sigma_mid =
    sqrt(sigma sigma_next)``, then the full step with the derivative there; the step to 0 is Euler.
    Two evaluations per step; EDM's churn as in :func:`~fastdiff.sampling.samplers.sample_euler`."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    num_steps = len(run.sigmas) - 1
    for i in range(num_steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        x, sigma, host = run.churn(x, sigma, s_churn, s_tmin, s_tmax, s_noise, run.host[i])
        g = run.evaluate(x, sigma, i, host=host)
        x, denoised = _midpoint_step(run, x, g, sigma, sigma_next, i, host, run.host[i + 1])
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None,
                           eta=1.0, s_noise=1.0, randn_like=None, schedule=None, info=None):
    """Ancestral sampling with DPM-Solver-2 steps: the midpoint step of :func:`sample_dpm_2` down to
    ``sigma_down``, then fresh noise ``s_noise sigma_up n`` (``eta`` scales ``sigma_up``)."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        g = run.evaluate(x, sigma, i, host=run.host[i])
        down, up = ancestral_step(run.host[i], run.host[i + 1], eta)
        x, denoised = _midpoint_step(run, x, g, sigma, run.scalar(down), i, run.host[i], run.host_op(lambda d: d, down))
        if down != 0:
            x = x + run.noise(x) * s_noise * up
        if callback is not None:
            callback(i, x, denoised)
    return x


def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """The linear multistep coefficient ``int_{s_i}^{s_{i+1}} prod_{k != j} (tau - s_{i-k}) / (s_{i-j} - s_{i-k})
    dtau``: the integral of the Lagrange basis polynomial of the ``j``-th past derivative over step
    ``i``. The polynomial is integrated exactly (from its coefficients), in float64."""
    if order - 1 > i:
        raise ValueError(f"LMS of order {order} needs {order - 1} earlier steps at step {i}")
    poly = [1.0]  # coefficients, lowest degree first
    for k in range(order):
        if k == j:
            continue
        root, scale = sigmas[i - k], sigmas[i - j] - sigmas[i - k]
        poly = [((poly[m - 1] if m > 0 else 0.0) - root * (poly[m] if m < len(poly) else 0.0)) / scale
                for m in range(len(poly) + 1)]
    a, b = sigmas[i], sigmas[i + 1]
    return sum(c * (b ** (m + 1) - a ** (m + 1)) / (m + 1) for m, c in enumerate(poly))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, order=4,
               schedule=None, info=None):
    """Linear multistep (Adams-Bashforth on the non-uniform sigma grid) of ``order`` (default 4): the
    derivatives ``d_k = (x - D) / sigma_k`` of the last ``order`` steps, weighted by
    :func:`lms_coefficient`; lower orders on the first steps. One evaluation per step."""
    if int(order) != order or order < 1:
        raise ValueError(f"LMS order must be a positive integer, got {order!r}")
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, None, schedule, info)
    grid = run.host
    ds: list[torch.Tensor] = []
    for i in range(len(grid) - 1):
        denoised = run.denoise(x, run.sigmas[i], i, host=grid[i])
        ds = (ds + [(x - denoised) / run.sigmas[i]])[-int(order):]
        cur = min(i + 1, int(order))
        coeffs = [lms_coefficient(cur, grid, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None,
                              eta=1.0, s_noise=1.0, randn_like=None, schedule=None, info=None):
    """Ancestral sampling with DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with ``r = 1/2``): a
    first-order data-prediction step to the midpoint ``s = t + h/2`` in ``t = -ln sigma``, the full step
    to ``sigma_down`` with ``D`` there, then fresh noise ``s_noise sigma_up n``; the step to 0 is Euler."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        g = run.evaluate(x, sigma, i, host=run.host[i])
        down, up = ancestral_step(run.host[i], run.host[i + 1], eta)
        if down == 0:
            x, _, denoised = run.step(x, g, run.sig(sigma), run.sig(0.0))
        else:
            denoised = g.combine()
            t, t_next = -math.log(run.host[i]), -math.log(down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = math.exp(t - s) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = run.denoise(x_2, math.exp(-s), i, correction=True)
            x = math.exp(t - t_next) * x - math.expm1(-h) * denoised_2
        if run.host[i + 1] > 0:
            x = x + run.noise(x) * s_noise * up
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, eta=1.0,
                     s_noise=1.0, r=0.5, noise_sampler=None, randn_like=None, schedule=None, info=None):
    """DPM-Solver++ SDE (k-diffusion's stochastic DPM-Solver++(2S)): per step, an ancestral
    first-order step to ``s = t + r h``, a second evaluation there, and an ancestral step to ``t_next``
    with ``D_d = (1 - 1/(2r)) D + 1/(2r) D_2``; the step to 0 is Euler. Noise: ``noise_sampler`` (default
    a per-sample Brownian motion in sigma), scaled by ``s_noise``."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    noise = noise_sampler or run.brownian(x)
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.host[i], run.host[i + 1]
        g = run.evaluate(x, run.sigmas[i], i, host=sigma)
        if sigma_next == 0:
            x, _, denoised = run.step(x, g, run.sig(sigma), run.sig(0.0))
        else:
            denoised = g.combine()
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            # Step 1: to sigma(s), ancestral
            down, up = ancestral_step(sigma, math.exp(-s), eta)
            s_ = -math.log(down)
            x_2 = math.exp(t - s_) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise(sigma, math.exp(-s)) * s_noise * up
            denoised_2 = run.denoise(x_2, math.exp(-s), i, correction=True)
            # Step 2: to sigma_next, ancestral, with the combined denoised
            down, up = ancestral_step(sigma, sigma_next, eta)
            t_next_ = -math.log(down)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = math.exp(t - t_next_) * x - math.expm1(t - t_next_) * denoised_d
            x = x + noise(sigma, sigma_next) * s_noise * up
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, eta=1.0,
                        s_noise=1.0, solver_type="midpoint", noise_sampler=None, randn_like=None, schedule=None,
                        info=None):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, the SDE solver of DPM-Solver++): with ``eta h``
    the noise share of the step, ``x' = (s'/s) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D`` plus the
    second-order correction from ``D_prev`` (``solver_type`` ``'midpoint'`` or ``'heun'``) and noise
    ``s' sqrt(1 - e^{-2 eta h}) s_noise n``; the step to 0 returns ``D``."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    noise = noise_sampler or run.brownian(x)
    old_denoised, h_last = None, None
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.host[i], run.host[i + 1]
        denoised = run.denoise(x, run.sigmas[i], i, host=sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma * math.exp(-eta_h)) * x + (-math.expm1(-h - eta_h)) * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + (0.5 * -math.expm1(-h - eta_h) * (1 / r)) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, guidance=None, labels=None, generators=None, callback=None, eta=1.0,
                        s_noise=1.0, noise_sampler=None, randn_like=None, schedule=None, info=None):
    """DPM-Solver++(3M) SDE: the multistep SDE step of :func:`sample_dpmpp_2m_sde` with third-order
    corrections from the last two denoised outputs (``phi_2 = (e^{-h'} - 1)/h' + 1``, ``phi_3 = phi_2/h' -
    1/2`` with ``h' = (1 + eta) h``; second order on the second step, first on the first) and noise
    ``s' sqrt(1 - e^{-2 eta h}) s_noise n``; the step to 0 returns ``D``."""
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like, schedule, info)
    noise = noise_sampler or run.brownian(x)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(run.sigmas) - 1):
        sigma, sigma_next = run.host[i], run.host[i + 1]
        denoised = run.denoise(x, run.sigmas[i], i, host=sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (math.expm1(-h_eta) / h_eta + 1) * d
            if eta:
                x = x + noise(sigma, sigma_next) * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            denoised_1, denoised_2 = denoised, denoised_1
            h_1, h_2 = h, h_1
        if callback is not None:
            callback(i, x, denoised)
    return x
