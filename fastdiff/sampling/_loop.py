"""What every sampling loop shares: the guided evaluation, the fused step, per-sample noise, the ancestral
and churn formulas, and a per-sample Brownian motion for the SDE samplers."""

from __future__ import annotations

import math
from typing import Callable

import torch

from fastdiff import ops
from fastdiff.sampling import rng
from fastdiff._runtime import nvtx_range
from fastdiff.diffusion import sigma_per_sample
from fastdiff.sampling.guidance import EvalContext, Guided, as_guidance
from fastdiff.sampling.hostreads import host_list

__all__ = ["Loop", "ancestral_step", "churn_gamma", "BrownianNoise"]


class Loop:
    """The plumbing of one sampling run over ``sigmas`` for the batch ``x``: evaluations go through the
    guidance object (which sees the step index), Euler-type updates through the fused solver step.

    ``schedule``: ``(sigma_min, sigma_max, rho)`` of the EDM schedule the sigmas come from (guidance that
    reads the normalized time, e.g. CADS, uses it); default ``(sigmas[-2], sigmas[0], 7)``.
    ``randn_like``: the noise when ``generators`` is None (default ``torch.randn_like``). ``info``: a dict
    that receives ``'evaluations'``, the network forwards so far.

    No host reads in the loop: the schedule is kept twice, as the device tensor ``sigmas`` (in the
    sampling dtype) that the arithmetic uses and as the list ``host`` of the same values as Python floats
    that every decision uses (a sampler's branches, ``Interval``, ``CADS``), so on a GPU the loop never
    waits for the device. ``host`` is made once here: from a CPU ``sigmas`` (what :func:`sample` passes)
    for free, from a device tensor by one read before the loop. A noise level a sampler derives inside
    the loop (a churned ``sigma_hat``, a midpoint) is computed once on the host, in the sampling dtype by
    the same torch ops as before (:meth:`host_op`), and filled on the device (:meth:`scalar`): the device
    and the host hold the same number, and no value is copied either way."""

    def __init__(self, denoiser: Callable, x: torch.Tensor, sigmas: torch.Tensor, guidance=None, labels=None,
                 generators=None, randn_like: Callable | None = None, schedule=None, info: dict | None = None):
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError("x must be a tensor of shape [N, ...]")
        self.n, self.dtype, self.device = x.shape[0], x.dtype, x.device
        rng.check_generators(generators, self.n)
        s = torch.as_tensor(sigmas)
        if s.ndim != 1 or len(s) < 2:
            raise ValueError("sigmas must be a 1-D sequence of at least 2 noise levels")
        s = s.to(self.dtype)
        # one device read here when sigmas live on a device, none after
        self.host: list[float] = host_list(s) if s.device.type == "cpu" else s.tolist()
        self.sigmas = s.to(self.device)
        if schedule is None:
            host = self.host
            schedule = (host[-2] if host[-1] == 0 else host[-1], host[0], 7.0)
        sigma_min, sigma_max, rho = schedule
        self.denoiser, self.guidance, self.labels = denoiser, as_guidance(guidance), labels
        self.generators, self.randn_like = generators, randn_like or torch.randn_like
        self.info = info
        if info is not None:
            info["evaluations"] = 0
        self.ctx = EvalContext(num_steps=len(self.sigmas) - 1, sigmas=self.sigmas, sigma_min=sigma_min,
                               sigma_max=sigma_max, rho=rho, generators=generators, dtype=self.dtype, batch=self.n,
                               host_sigmas=self.host)

    def sig(self, t) -> torch.Tensor:
        """A noise level as the per-sample [N] tensor the denoiser and the solver step take (a Python number
        is filled on the device, not copied there)."""
        if not isinstance(t, torch.Tensor):
            t = self.scalar(t)
        return sigma_per_sample(t, self.n, device=self.device, dtype=self.dtype, who="sampler")

    def scalar(self, value: float) -> torch.Tensor:
        """The number ``value`` as a 0-d tensor in the sampling dtype on the device: a fill, no host-to-device
        copy (``torch.tensor(value, device=...)`` would be a blocking copy, a stream sync on a GPU)."""
        return torch.full((), float(value), dtype=self.dtype, device=self.device)

    def host_op(self, fn: Callable[..., torch.Tensor], *values: float) -> float:
        """``fn`` applied to ``values`` as 0-d CPU tensors in the sampling dtype, as a Python float: a derived
        noise level computed on the host by the ops the device would run (rounded as the sampling dtype
        rounds), read from CPU memory."""
        out = fn(*(torch.full((), float(v), dtype=self.dtype) for v in values))
        return host_list(out)

    def evaluate(self, x: torch.Tensor, sigma, step: int, correction: bool = False, host: float | None = None) -> Guided:
        """One guided evaluation at ``sigma`` (a number, 0-d or [N] tensor) for solver step ``step``. ``host``:
        the value of a tensor ``sigma`` as a Python float (every sample at that level), for the guidance's
        decisions; None (per-sample levels) leaves them to the device values."""
        self.ctx.step, self.ctx.correction = step, correction
        if not isinstance(sigma, torch.Tensor):  # a number: the device rounds it to the sampling dtype
            host = self.host_op(lambda t: t, sigma)
        if not (isinstance(sigma, torch.Tensor) and sigma.ndim == 1):
            sigma = self.sig(sigma)
        self.ctx.host_sigma = host
        g = self.guidance.evaluate(self.denoiser, x, sigma, self.labels, self.ctx)
        if self.info is not None:
            self.info["evaluations"] = self.ctx.evaluations
        return g

    def denoise(self, x: torch.Tensor, sigma, step: int, correction: bool = False,
                host: float | None = None) -> torch.Tensor:
        """The guided ``D(x; sigma)`` as a tensor."""
        return self.evaluate(x, sigma, step, correction, host).combine()

    @staticmethod
    def step(x, g: Guided, sigma_cur, sigma_next, d_prev=None, x_base=None):
        """Fused Euler step ``x + (sigma_next - sigma_cur) (x - D) / sigma_cur`` (or Heun correction);
        returns ``(x_next, d, D)``."""
        with nvtx_range("solver_step"):
            return ops.solver_step(x, g.d1, g.d0, g.w, sigma_cur, sigma_next, d_prev, x_base)

    def churn(self, x: torch.Tensor, sigma: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float,
              s_noise: float, host: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """EDM's churn before a step from ``sigma`` (``host``: its value as a Python float; EDM Algorithm 2,
        lines 4-6): with ``gamma`` of :func:`churn_gamma`, ``sigma_hat = (1 + gamma) sigma`` and ``x +=
        sqrt(sigma_hat^2 - sigma^2) s_noise n``; returns ``(x, sigma_hat, sigma_hat as a float)`` (unchanged
        where ``gamma`` is 0)."""
        gamma = churn_gamma(host, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax)
        if gamma > 0:
            host = self.host_op(lambda s: s * (gamma + 1), host)
            sigma_hat = self.scalar(host)
            x = x + self.noise(x) * s_noise * (sigma_hat**2 - sigma**2).sqrt()
            sigma = sigma_hat
        return x, sigma, host

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal like ``x``: row i from ``generators[i]`` (else ``randn_like``)."""
        if self.generators is not None:
            return rng.randn_like(x, self.generators)
        return self.randn_like(x)

    def brownian(self, x: torch.Tensor) -> "BrownianNoise":
        """A Brownian motion in sigma from this run's per-sample noise (see :class:`BrownianNoise`)."""
        return BrownianNoise(x, self.noise)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step from ``sigma`` to ``sigma_next`` (DDPM's posterior
    noise for the VE process, scaled by ``eta``): ``sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2))``,
    ``sigma_down = sqrt(s'^2 - sigma_up^2)``; ``eta = 0`` is deterministic."""
    if not eta:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def churn_gamma(sigma: float, num_steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's churn (EDM Algorithm 2): ``gamma = min(S_churn / N, sqrt(2) - 1)`` for ``sigma`` in
    ``[S_tmin, S_tmax]``, else 0; the step then starts from ``sigma_hat = (1 + gamma) sigma``."""
    if s_churn > 0 and s_tmin <= sigma <= s_tmax:
        return min(s_churn / num_steps, math.sqrt(2) - 1)
    return 0.0


class BrownianNoise:
    """A Brownian motion ``W`` in sigma, drawn piece by piece from per-sample standard normals: called as
    ``noise(sigma, sigma_next)`` it returns ``(W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|)``, a
    standard normal like ``x``.

    Queries that start where the last one started reuse that piece of path: a point beyond the known
    ones extends it by an independent increment, a point between two known ones is drawn from the
    Brownian bridge. So the noise of a sub-step and of its whole step are correlated as they are on a
    Brownian path (DPM-Solver++ SDE), and queries on the next step are independent of the past. This is
    the law of k-diffusion's Brownian-tree noise; the numbers come from the per-sample generators, so a
    sample depends on its own seed only."""

    def __init__(self, x: torch.Tensor, randn_like: Callable[[torch.Tensor], torch.Tensor]):
        self.like, self.randn_like = x, randn_like
        self.start: float | None = None
        self.path: dict[float, torch.Tensor] = {}  # sigma -> W(sigma) - W(start)

    def _value(self, s: float, like: torch.Tensor) -> torch.Tensor:
        if s in self.path:
            return self.path[s]
        a = self.start
        known = sorted(self.path, key=lambda p: abs(p - a))
        outer = [p for p in known if abs(p - a) > abs(s - a) and (p - a) * (s - a) > 0]
        inner = [p for p in known if abs(p - a) < abs(s - a) and (p - a) * (s - a) >= 0]
        lo = inner[-1]
        z = self.randn_like(like).to(torch.float64)
        if not outer:  # beyond every known point: an independent increment
            w = self.path[lo] + math.sqrt(abs(s - lo)) * z
        else:  # between lo and hi: the Brownian bridge
            hi = outer[0]
            f = (s - lo) / (hi - lo)
            w = self.path[lo] + f * (self.path[hi] - self.path[lo]) + math.sqrt(abs((s - lo) * (hi - s) / (hi - lo))) * z
        self.path[s] = w
        return w

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        sigma, sigma_next, like = float(sigma), float(sigma_next), self.like
        if sigma == sigma_next:
            raise ValueError("BrownianNoise: the two noise levels must differ")
        if self.start != sigma:
            self.start, self.path = sigma, {sigma: torch.zeros(like.shape, dtype=torch.float64, device=like.device)}
        w = self._value(sigma_next, like)
        return (w / math.sqrt(abs(sigma_next - sigma))).to(like.dtype)
