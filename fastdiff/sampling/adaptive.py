"""The adaptive-step DPM-Solver (DPM-Solver-12 and -23 of Lu et al. 2022, "DPM-Solver"), as k-diffusion
publishes it, for EDM denoisers, with the step size chosen per sample (:func:`sample_dpm_adaptive`, where
the error measure, the PID controller and the differences from k-diffusion's batch-wide version are).

Host reads, by design: each round of attempts reads one small flag tensor from the device (which samples
still integrate and need an evaluation; a second with ``eta > 0``); see :func:`sample_dpm_adaptive`.
"""

from __future__ import annotations

import math

import torch

from fastdiff.sampling import rng
from fastdiff.sampling._loop import Loop

__all__ = ["sample_dpm_adaptive"]


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [n] vector shaped to broadcast against ``x`` [n, ...], in x's dtype."""
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class _Subset:
    """Evaluations for the batch rows ``idx`` only (the samples still integrating; ``rows``: the same as
    Python ints)."""

    def __init__(self, run: Loop, idx: torch.Tensor, rows: list[int]):
        self.run, self.idx = run, idx
        self.labels = None if run.labels is None else run.labels[idx]
        self.ctx = run.ctx.select(idx, rows) if len(rows) < run.n else run.ctx

    def eps(self, x: torch.Tensor, t: torch.Tensor, step: int, correction: bool) -> torch.Tensor:
        """``eps = (x - D(x; sigma)) / sigma`` at ``sigma = exp(-t)`` per sample."""
        run = self.run
        run.ctx.step, run.ctx.correction = step, correction
        self.ctx.step, self.ctx.correction = step, correction
        run.ctx.host_sigma = self.ctx.host_sigma = None  # per-sample noise levels: no single host value
        sigma = (-t).exp().to(x.dtype)
        g = run.guidance.evaluate(run.denoiser, x, sigma, self.labels, self.ctx)
        if run.info is not None:
            run.info["evaluations"] = run.ctx.evaluations
        return (x - g.combine()) / _rows(sigma, x)


def _dpm_solver_steps(sub: _Subset, x, s, t, eps0, order: int, step: int):
    """(x_low, x_high) of one attempt from ``s`` to ``t`` (per-sample [n] vectors in float64) with the
    evaluation ``eps0`` at ``s`` (DPM-Solver-1/2 or -2/3)."""
    h = t - s
    sigma_t = (-t).exp()
    em = torch.expm1(h)
    x_1 = x - _rows(sigma_t * em, x) * eps0
    if order == 2:
        r1 = 0.5
        s1 = s + r1 * h
        u1 = x - _rows((-s1).exp() * torch.expm1(r1 * h), x) * eps0
        eps_r1 = sub.eps(u1, s1, step, True)
        x_2 = x_1 - _rows(sigma_t / (2 * r1) * em, x) * (eps_r1 - eps0)
        return x_1, x_2
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = s + r1 * h, s + r2 * h
    u1 = x - _rows((-s1).exp() * torch.expm1(r1 * h), x) * eps0
    eps_r1 = sub.eps(u1, s1, step, True)
    x_low = x_1 - _rows(sigma_t / (2 * r1) * em, x) * (eps_r1 - eps0)
    e2 = torch.expm1(r2 * h)
    u2 = (x - _rows((-s2).exp() * e2, x) * eps0
          - _rows((-s2).exp() * (r2 / r1) * (e2 / (r2 * h) - 1), x) * (eps_r1 - eps0))
    eps_r2 = sub.eps(u2, s2, step, True)
    x_high = x_1 - _rows(sigma_t / r2 * (em / h - 1), x) * (eps_r2 - eps0)
    return x_low, x_high


@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigma_min, sigma_max, *, guidance=None, labels=None, generators=None,
                        callback=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
                        dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, randn_like=None, schedule=None,
                        info=None, return_info=False):
    """Integrates from ``sigma_max`` down to ``sigma_min`` (both > 0) with adaptive steps (see
    below); ``x`` the start at ``sigma_max``. ``order`` 2 or 3; ``rtol``/``atol`` the error
    tolerances; ``h_init`` the first step in ``t = -ln sigma``; ``pcoeff``/``icoeff``/``dcoeff`` the PID
    coefficients; ``eta > 0`` adds ancestral noise ``s_noise sigma_up n`` after each accepted step.
    ``callback(i, x, denoised)`` after each round of attempts (``denoised`` at each sample's current
    sigma). ``info`` (and the second value returned with ``return_info=True``) receives per-sample
    ``nfe`` (evaluations spent), ``n_accept``, ``n_reject`` ([N] int tensors), and ``evaluations`` (network
    forwards in all).

    In ``t = -ln sigma`` each attempt from ``s`` to ``t = min(t_end, s + h)`` computes a lower- and a
    higher-order DPM-Solver step (orders 1 and 2, or 2 and 3 with ``r1 = 1/3``, ``r2 = 2/3``), measures
    ``E = ||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(M)`` (``M`` the sample's
    element count), and a PID controller (k-diffusion's ``PIDStepSizeController``: factor ``1 + atan(f -
    1)`` with ``f = e_0^b1 e_1^b2 e_2^b3`` of the inverse errors) scales ``h``; the attempt is accepted when
    the factor reaches ``accept_safety``. Differences from k-diffusion's batch-wide version, by design:
    the error, the step size and the accept decision are per sample (one sample's trajectory never
    depends on the others in its batch, nor on the batch size), so every sample follows the published
    algorithm run on it alone; the evaluation at the start of an attempt is kept across rejected attempts
    (it is the same evaluation; k-diffusion repeats it), so fewer network evaluations are spent. The
    noise of ``eta > 0`` comes from the per-sample generators.
    """
    if not (sigma_min > 0 and sigma_max > 0):
        raise ValueError(f"dpm_adaptive: sigma_min and sigma_max must be > 0, got {sigma_min}, {sigma_max}")
    if not sigma_min < sigma_max:
        raise ValueError(f"dpm_adaptive: expected sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order!r}")
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init), ("accept_safety", accept_safety)):
        if not (math.isfinite(v) and v >= 0) or (name in ("h_init",) and v == 0):
            raise ValueError(f"dpm_adaptive: {name} must be a finite number {'> 0' if name == 'h_init' else '>= 0'}, "
                             f"got {v}")
    if rtol == 0 and atol == 0:
        raise ValueError("dpm_adaptive: rtol and atol cannot both be 0")
    sigmas = torch.tensor([float(sigma_max), float(sigma_min)], dtype=torch.float64)
    report = info if info is not None else {}
    run = Loop(denoiser, x, sigmas, guidance, labels, generators, randn_like,
               schedule if schedule is not None else (sigma_min, sigma_max, 7.0), report)
    n, dev = run.n, x.device
    x = x.clone()
    f64 = dict(dtype=torch.float64, device=dev)
    t_end = torch.full((n,), -math.log(sigma_min), **f64)
    s = torch.full((n,), -math.log(sigma_max), **f64)
    h = torch.full((n,), abs(float(h_init)), **f64)
    errs = torch.ones(n, 3, **f64)  # inverse errors e_0, e_1, e_2 (set to the first error at the first attempt)
    first = torch.ones(n, dtype=torch.bool, device=dev)
    b1 = (pcoeff + icoeff + dcoeff) / (1.5 if eta else order)
    b2 = -(pcoeff + 2 * dcoeff) / (1.5 if eta else order)
    b3 = dcoeff / (1.5 if eta else order)
    x_prev = x.clone()
    eps_at_s = torch.zeros_like(x)
    have_eps = torch.zeros(n, dtype=torch.bool, device=dev)
    nfe, n_accept, n_reject = (torch.zeros(n, dtype=torch.int64, device=dev) for _ in range(3))
    denoised = x.clone()
    atol_t = torch.full((), atol, dtype=x.dtype, device=dev)
    step = 0
    while True:
        active = s < t_end - 1e-5
        flags = torch.stack([active, active & ~have_eps]).tolist()  # the round's one read (see the docstring)
        rows = [i for i, a in enumerate(flags[0]) if a]
        if not rows:
            break
        idx = active.nonzero_static(size=len(rows)).flatten()  # no sync: the size is known
        sub = _Subset(run, idx, rows)
        xa, sa = x[idx], s[idx]
        need_rows = [i for i, a in enumerate(flags[1]) if a]
        if need_rows:  # the evaluation at s (kept across rejected attempts)
            need = (active & ~have_eps).nonzero_static(size=len(need_rows)).flatten()
            sub_need = _Subset(run, need, need_rows)
            eps_at_s[need] = sub_need.eps(x[need], s[need], step, False)
            have_eps.index_fill_(0, need, True)  # a fill: `have_eps[need] = True` would copy True to the device
            nfe[need] += 1
        eps0 = eps_at_s[idx]
        denoised[idx] = xa - _rows((-sa).exp(), xa) * eps0
        t = torch.minimum(t_end[idx], sa + h[idx])
        if eta:
            sig_s, sig_t = (-sa).exp(), (-t).exp()
            up = torch.minimum(sig_t, eta * (sig_t**2 * (sig_s**2 - sig_t**2) / sig_s**2).clamp_min(0).sqrt())
            down = (sig_t**2 - up**2).clamp_min(0).sqrt()
            t_ = torch.minimum(t_end[idx], -down.log())
            su = (sig_t**2 - (-t_).exp() ** 2).clamp_min(0).sqrt()
        else:
            t_, su = t, None
        x_low, x_high = _dpm_solver_steps(sub, xa, sa, t_, eps0, order, step)
        nfe[idx] += order - 1
        delta = torch.maximum(atol_t, rtol * torch.maximum(x_low.abs(), x_prev[idx].abs()))
        m = xa[0].numel()
        error = torch.linalg.vector_norm(((x_low - x_high) / delta).reshape(len(rows), -1), dim=1) / math.sqrt(m)
        # PID step-size control, per sample (masked updates: no host decision)
        inv = 1 / (error.double() + 1e-8)
        e = torch.where(first[idx].unsqueeze(1), inv.unsqueeze(1).expand(-1, 3), errs[idx])
        e[:, 0] = inv
        factor = e[:, 0] ** b1 * e[:, 1] ** b2 * e[:, 2] ** b3
        factor = 1 + torch.atan(factor - 1)
        accept = factor >= accept_safety
        e = torch.stack([e[:, 0], torch.where(accept, e[:, 0], e[:, 1]), torch.where(accept, e[:, 1], e[:, 2])], 1)
        errs[idx] = e
        first.index_fill_(0, idx, False)
        h[idx] = h[idx] * factor
        x_new = x_high
        if su is not None:  # the accepted samples' generators draw: a second read
            acc_rows = [r for r, a in zip(rows, accept.tolist()) if a]
            if acc_rows:
                sel = accept.nonzero_static(size=len(acc_rows)).flatten()
                x_acc = x_high[sel]
                gens = None if generators is None else [generators[r] for r in acc_rows]
                noise = (rng.randn(gens, len(acc_rows), x.shape[1:], device=dev, dtype=x.dtype) if gens is not None
                         else run.randn_like(x_acc))
                x_new = x_high.clone()
                x_new[sel] = x_acc + _rows(su[sel] * s_noise, x_acc) * noise
        keep = _rows(accept, x_high).bool()
        x_prev[idx] = torch.where(keep, x_low, x_prev[idx])
        x[idx] = torch.where(keep, x_new, xa)
        s[idx] = torch.where(accept, t, sa)
        have_eps[idx] = have_eps[idx] & ~accept
        n_accept[idx] += accept.long()
        n_reject[idx] += (~accept).long()
        if callback is not None:
            callback(step, x, denoised)
        step += 1
    report.update(nfe=nfe, n_accept=n_accept, n_reject=n_reject)
    return (x, report) if return_info else x
