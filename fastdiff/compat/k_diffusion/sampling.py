"""k-diffusion's ``k_diffusion.sampling`` on fastdiff: the same function names and signatures, the same
schedules and the same numbers, so code written against k-diffusion 0.1.1 changes one import::

    from fastdiff.compat.k_diffusion import sampling as K   # was: from k_diffusion import sampling as K
    sigmas = K.get_sigmas_karras(32, 0.002, 80.0)
    x = K.sample_dpmpp_2m(model, noise * sigmas[0], sigmas, extra_args={"cond": labels})

``model(x, sigma, **extra_args) -> denoised`` is k-diffusion's denoiser (``sigma`` a per-sample ``[N]``
tensor). Each ``sample_*`` runs fastdiff's sampler of the same name (:mod:`fastdiff.sampling`: its loop and
the fused solver step) on the model, and keeps k-diffusion's conventions around it:

* ``callback`` receives k-diffusion's dict ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step, right
  after the step's first model call (after the churn of ``s_churn``; ``sigma_hat`` the noise level of that
  call), as k-diffusion calls it;
* ``disable`` hides the progress bar (``tqdm``, one tick per step), as k-diffusion's ``trange`` does;
* the churn noise of ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` is drawn from torch's global
  generator at the same points as k-diffusion (one ``randn_like`` per step, used or not), so the same seed
  gives the same trajectory; the ancestral samplers call ``noise_sampler(sigma, sigma_next)`` (default
  ``randn_like``) for the same steps (with ``eta=0``, where the noise is multiplied by 0, k-diffusion still
  calls it and fastdiff does not: the same trajectory, fewer draws); the SDE samplers call ``noise_sampler`` (0-d tensors in the sigmas'
  dtype) in the same order. Without a ``noise_sampler`` the SDE samplers use fastdiff's Brownian motion
  (the law of k-diffusion's ``torchsde`` Brownian tree, not its numbers; :class:`BrownianTreeNoiseSampler`
  here is the same motion, seeded);
* ``sample_dpm_fast`` and ``sample_dpm_adaptive`` take one step size for the whole batch, as k-diffusion does
  (``fastdiff.sampling.sample_dpm_adaptive`` chooses it per sample); the adaptive one keeps the evaluation at
  the start of a rejected attempt instead of repeating it, so its ``info['nfe']`` counts the evaluations made.

Not provided: ``log_likelihood`` (it needs ``torchdiffeq``), ``DPMSolver`` / ``PIDStepSizeController`` as
classes, ``BatchedBrownianTree``.
"""

from __future__ import annotations

import math

import torch

from fastdiff.sampling import dpm as _dpm
from fastdiff.sampling import samplers as _samplers
from fastdiff.sampling._loop import BrownianNoise, Loop

__all__ = [
    "append_zero", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
    "to_d", "get_ancestral_step", "default_noise_sampler", "BrownianTreeNoiseSampler", "linear_multistep_coeff",
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
]


# --- schedules and helpers (k-diffusion's definitions) ---------------------------------------------------------


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a final 0 appended."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu") -> torch.Tensor:
    """Karras et al. (2022) Eq. 5: ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then 0
    (float32, the ramp from ``torch.linspace`` as k-diffusion computes it)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """``n`` noise levels evenly spaced in ``log sigma`` from ``sigma_max`` to ``sigma_min``, then 0."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu") -> torch.Tensor:
    """``log sigma`` a polynomial of degree ``rho`` in the ramp: ``exp(r^rho (ln s_max - ln s_min) + ln s_min)``
    with ``r`` from 1 to 0, then 0."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu") -> torch.Tensor:
    """The continuous VP schedule (Song et al. 2021) as noise levels: ``sqrt(exp(beta_d t^2 / 2 + beta_min t)
    - 1)`` for ``t`` from 1 to ``eps_s``, then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    return append_zero(torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1))


def to_d(x, sigma, denoised):
    """The probability-flow ODE's derivative ``(x - D) / sigma`` (Karras et al. 2022, Eq. 4 with sigma(t) = t)."""
    sigma = torch.as_tensor(sigma)
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """``(sigma_down, sigma_up)`` of an ancestral step (see ``fastdiff.sampling._loop.ancestral_step``); works on
    numbers and tensors alike."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x):
    """``noise_sampler(sigma, sigma_next)`` drawing ``torch.randn_like(x)`` (torch's global generator)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


class BrownianTreeNoiseSampler:
    """k-diffusion's Brownian noise sampler's interface on fastdiff's Brownian motion
    (``fastdiff.sampling._loop.BrownianNoise``): ``noise(sigma, sigma_next)`` is the increment of a Brownian
    motion in ``transform(sigma)`` between the two levels over the square root of their distance, a standard
    normal like ``x``. ``seed``: an int (one generator for the batch), a list of ints (one per sample) or None
    (torch's global generator). Same law as k-diffusion's ``torchsde`` tree, not the same numbers.
    ``sigma_min`` / ``sigma_max`` are taken for compatibility (the motion needs no interval)."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda v: v):
        self.transform = transform
        if seed is None:
            draw = torch.randn_like
        elif isinstance(seed, (list, tuple)):
            if len(seed) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler: {len(seed)} seeds for a batch of {x.shape[0]}")
            gens = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seed]

            def draw(like):
                return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype)
                                    for g in gens])
        else:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))

            def draw(like):
                return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
        self.motion = BrownianNoise(x, draw)

    def __call__(self, sigma, sigma_next):
        t0 = float(self.transform(torch.as_tensor(sigma)))
        t1 = float(self.transform(torch.as_tensor(sigma_next)))
        return self.motion(t0, t1)


def linear_multistep_coeff(order, t, i, j) -> float:
    """The LMS coefficient of the ``j``-th past derivative on step ``i`` of the grid ``t`` (the integral of its
    Lagrange basis polynomial over the step, exactly: ``fastdiff.sampling.dpm.lms_coefficient``)."""
    return _dpm.lms_coefficient(int(order), [float(v) for v in t], int(i), int(j))


# --- one k-diffusion call on fastdiff's loop ---------------------------------------------------------------------


class _Call:
    """The model as a fastdiff denoiser ``D(x, sigma, labels)`` (labels unused: the condition is in
    ``extra_args``) that reports each step's first evaluation to the callback (k-diffusion's dict, at the same
    point of the step: after the model call, before the update), the progress bar, and noise indexed by the
    current step."""

    def __init__(self, model, x, sigmas, extra_args, callback, disable, steps=None):
        self.model, self.extra = model, dict(extra_args or {})
        self.sigmas = sigmas
        self.user_callback = callback
        self.reported = False  # the current step's first evaluation went to the callback
        self.i = 0
        self.eps = None
        self.churn_noise = False
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps if steps is not None else len(sigmas) - 1, disable=disable)

    def denoiser(self, x, sigma, labels=None):
        out = self.model(x, sigma, **self.extra)
        if not self.reported:
            self.reported = True
            if self.user_callback is not None:
                level = self.sigmas[self.i]
                hat = sigma[0] if isinstance(sigma, torch.Tensor) and sigma.ndim else sigma
                sigma_hat = level if float(hat) == float(level) else hat
                self.user_callback({"x": x, "i": self.i, "sigma": level, "sigma_hat": sigma_hat, "denoised": out})
        return out

    def step_done(self, i, x, denoised):
        self.reported = False
        self.i = i + 1
        self.bar.update(1)
        if self.churn_noise and self.i < len(self.sigmas) - 1:
            self.eps = torch.randn_like(x)  # k-diffusion draws the churn noise of every step at its start

    def with_churn_noise(self, x):
        """The ``randn_like`` of a churn sampler: this step's noise, drawn where k-diffusion draws it."""
        self.churn_noise = True
        self.eps = torch.randn_like(x)
        return lambda like: self.eps

    def step_noise(self, noise_sampler, x):
        """The ``randn_like`` of an ancestral sampler: ``noise_sampler(sigmas[i], sigmas[i + 1])`` on step i."""
        ns = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        return lambda like: ns(self.sigmas[self.i], self.sigmas[self.i + 1])

    def tensor_noise(self, noise_sampler):
        """An SDE sampler's ``noise_sampler``, called with 0-d tensors in the sigmas' dtype as k-diffusion does."""
        if noise_sampler is None:
            return None
        kw = dict(dtype=self.sigmas.dtype, device=self.sigmas.device)
        return lambda s, s1: noise_sampler(torch.tensor(s, **kw), torch.tensor(s1, **kw))

    def close(self):
        self.bar.close()


def _sigmas(sigmas, x):
    return torch.as_tensor(sigmas, device=x.device)


def _run(fn, model, x, sigmas, extra_args, callback, disable, setup=None, **kw):
    sigmas = _sigmas(sigmas, x)
    call = _Call(model, x, sigmas, extra_args, callback, disable)
    try:
        if setup is not None:
            kw.update(setup(call))
        return fn(call.denoiser, x, sigmas, callback=call.step_done, **kw)
    finally:
        call.close()


# --- the samplers ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2 with Euler steps (``fastdiff.sampling.sample_euler``)."""
    return _run(_samplers.sample_euler, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.with_churn_noise(x)), s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                s_noise=s_noise)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps (``fastdiff.sampling.sample_euler_ancestral``)."""
    return _run(_samplers.sample_euler_ancestral, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.step_noise(noise_sampler, x)), eta=eta, s_noise=s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. (2022) Algorithm 2, Heun steps (``fastdiff.sampling.sample_heun``)."""
    return _run(_samplers.sample_heun, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.with_churn_noise(x)), s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                s_noise=s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 steps in sigma (``fastdiff.sampling.sample_dpm_2``)."""
    return _run(_dpm.sample_dpm_2, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.with_churn_noise(x)), s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                s_noise=s_noise)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 steps (``fastdiff.sampling.sample_dpm_2_ancestral``)."""
    return _run(_dpm.sample_dpm_2_ancestral, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.step_noise(noise_sampler, x)), eta=eta, s_noise=s_noise)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep of ``order`` (``fastdiff.sampling.sample_lms``)."""
    return _run(_dpm.sample_lms, model, x, sigmas, extra_args, callback, disable, order=order)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """Ancestral DPM-Solver++(2S) (``fastdiff.sampling.sample_dpmpp_2s_ancestral``)."""
    return _run(_dpm.sample_dpmpp_2s_ancestral, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(randn_like=c.step_noise(noise_sampler, x)), eta=eta, s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ SDE (``fastdiff.sampling.sample_dpmpp_sde``)."""
    return _run(_dpm.sample_dpmpp_sde, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(noise_sampler=c.tensor_noise(noise_sampler)), eta=eta, s_noise=s_noise, r=r)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (``fastdiff.sampling.sample_dpmpp_2m``)."""
    return _run(_samplers.sample_dpmpp_2m, model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (``fastdiff.sampling.sample_dpmpp_2m_sde``)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    return _run(_dpm.sample_dpmpp_2m_sde, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(noise_sampler=c.tensor_noise(noise_sampler)), eta=eta, s_noise=s_noise,
                solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE (``fastdiff.sampling.sample_dpmpp_3m_sde``)."""
    return _run(_dpm.sample_dpmpp_3m_sde, model, x, sigmas, extra_args, callback, disable,
                lambda c: dict(noise_sampler=c.tensor_noise(noise_sampler)), eta=eta, s_noise=s_noise)


# --- DPM-Solver with fixed and adaptive steps, one step size for the batch ----------------------------------------


class _Solver:
    """DPM-Solver-1, -2 and -3 steps (Lu et al. 2022, "DPM-Solver", Eq. 3.7 and Algorithms 4-5 for the VE
    process: ``alpha = 1``, ``t = lambda = -ln sigma``, ``eps = (x - D) / sigma``), the evaluations through
    fastdiff's sampling loop (``fastdiff.sampling._loop.Loop``), ``t`` the same for the whole batch."""

    def __init__(self, model, x, sigma_min, sigma_max, extra_args):
        self.call = _Call(model, x, torch.tensor([float(sigma_max), float(sigma_min)]), extra_args, None, True)
        self.run = Loop(self.call.denoiser, x, torch.tensor([float(sigma_max), float(sigma_min)], dtype=torch.float64),
                        schedule=(float(sigma_min), float(sigma_max), 7.0))
        self.evaluations = 0

    def eps(self, x, t, step, correction=False):
        """``(x - D(x; sigma)) / sigma`` at ``sigma = exp(-t)``."""
        self.evaluations += 1
        sigma = math.exp(-float(t))
        return (x - self.run.denoise(x, sigma, step, correction)) / sigma

    def _stage(self, x, s, r, h, eps0, step, prev=None, r_prev=None):
        """The intermediate point at ``s + r h`` (first order, plus the second-order term from ``prev`` =
        ``(eps at s + r_prev h) - eps0``) and its eps."""
        e = math.expm1(r * h)
        sigma = math.exp(-(s + r * h))
        u = x - (sigma * e) * eps0
        if prev is not None:
            u = u - (sigma * (r / r_prev) * (e / (r * h) - 1)) * prev
        return self.eps(u, s + r * h, step, True)

    def steps(self, x, s, t, eps0, order, step):
        """``(x_low, x_high)`` from ``s`` to ``t``: DPM-Solver-1 and -2 (``r1 = 1/2``), or -2 (``r1 = 1/3``) and
        -3 (``r1, r2 = 1/3, 2/3``), sharing their evaluations."""
        s, t = float(s), float(t)
        h = t - s
        em = math.expm1(h)
        sigma_t = math.exp(-t)
        x_1 = x - (sigma_t * em) * eps0
        if order == 2:
            d1 = self._stage(x, s, 0.5, h, eps0, step) - eps0
            return x_1, x_1 - (sigma_t / (2 * 0.5) * em) * d1
        r1, r2 = 1 / 3, 2 / 3
        d1 = self._stage(x, s, r1, h, eps0, step) - eps0
        x_low = x_1 - (sigma_t / (2 * r1) * em) * d1
        d2 = self._stage(x, s, r2, h, eps0, step, prev=d1, r_prev=r1) - eps0
        return x_low, x_1 - (sigma_t / r2 * (em / h - 1)) * d2

    def step(self, x, s, t, eps0, order, step):
        """DPM-Solver-``order`` from ``s`` to ``t``."""
        if order == 1:
            return x - (math.exp(-float(t)) * math.expm1(float(t) - float(s))) * eps0
        return self.steps(x, s, t, eps0, order, step)[1]


def _t(sigma):
    return -torch.as_tensor(sigma).log()


def _sigma(t):
    return torch.as_tensor(t).neg().exp()


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): ``n`` evaluations on steps evenly spaced in ``t = -ln sigma``
    from ``sigma_max`` to ``sigma_min``, third-order steps and a last one or two of lower order."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    solver = _Solver(model, x, sigma_min, sigma_max, extra_args)
    from tqdm.auto import tqdm

    with tqdm(total=n, disable=disable) as bar:
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, _t(sd))
                su = (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0
            before = solver.evaluations
            eps = solver.eps(x, t, i)
            denoised = x - float(_sigma(t)) * eps
            if callback is not None:
                callback({"x": x, "i": i, "t": t, "t_up": t, "denoised": denoised, "sigma": _sigma(t),
                          "sigma_hat": _sigma(t)})
            x = solver.step(x, t, t_next_, eps, order, i)
            x = x + su * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
            bar.update(solver.evaluations - before)
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, Sec. 3.3 and Appendix C), one step size for the
    batch: the error ``||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))|| / sqrt(numel)`` drives a
    PID controller (factor ``1 + atan(f - 1)``), an attempt is accepted when the factor reaches
    ``accept_safety``."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    h = abs(h_init) * (1 if forward else -1)
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    k = 1.5 if eta else order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k
    errs: list[float] = []
    solver = _Solver(model, x, sigma_min, sigma_max, extra_args)
    s, x_prev = t_start, x
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    eps, eps_at = None, None
    from tqdm.auto import tqdm

    with tqdm(disable=disable) as bar:
        while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
            t = torch.minimum(t_end, s + h) if forward else torch.maximum(t_end, s + h)
            if eta:
                sd, su = get_ancestral_step(_sigma(s), _sigma(t), eta)
                t_ = torch.minimum(t_end, _t(sd))
                su = (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            before = solver.evaluations
            if eps_at is None or float(eps_at) != float(s):  # the evaluation at s, kept across rejected attempts
                eps, eps_at = solver.eps(x, s, info["steps"]), s
            denoised = x - float(_sigma(s)) * eps
            x_low, x_high = solver.steps(x, s, t_, eps, order, info["steps"])
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            inv = 1 / (float(error) + 1e-8)
            if not errs:
                errs = [inv, inv, inv]
            errs[0] = inv
            factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
            accept = factor >= accept_safety
            if accept:
                errs[2], errs[1] = errs[1], errs[0]
            h *= factor
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(_sigma(s), _sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += solver.evaluations - before
            info["steps"] += 1
            bar.update(solver.evaluations - before)
            if callback is not None:
                callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised, "error": error,
                          "h": h, **info, "sigma": _sigma(s), "sigma_hat": _sigma(s)})
    return (x, info) if return_info else x

