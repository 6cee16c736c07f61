"""Small magnitude-preserving MLP denoisers for 2-D data, built from ``fastdiff.ops``, and their training.

:class:`ToyDenoiser` follows the EDM2 recipe on a small scale (MP layers, forced weight normalization, EDM
preconditioning, learned uncertainty; the architecture is at the class); :func:`train_denoiser` trains it
with the EDM2 loss, Adam, label dropout (one network is both the conditional and the unconditional model
that CFG needs) and a power-function EMA.
"""

from __future__ import annotations

import copy
import math

import torch

from fastdiff import ops

__all__ = ["MPLinear", "ToyDenoiser", "train_denoiser", "power_ema_exponent"]


class MPLinear(torch.nn.Module):
    """``y = gain * x @ (N(W) / sqrt(fan_in))^T`` with forced weight normalization in training."""

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=generator))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        if self.training:
            ops.weight_norm_(self.weight)
        return ops.mp_linear(x, self.weight, gain)


class _Block(torch.nn.Module):
    def __init__(self, channels: int, generator):
        super().__init__()
        self.linear1 = MPLinear(channels, channels, generator)
        self.emb_linear = MPLinear(channels, channels, generator)
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.linear2 = MPLinear(channels, channels, generator)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.linear1(ops.mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.linear2(ops.mp_silu(y * c))
        return ops.mp_sum(x, y, t=0.3)


class ToyDenoiser(torch.nn.Module):
    """A preconditioned MP-MLP denoiser ``D(x; sigma, labels)`` for 2-D points.

    Called as ``net(x, sigma, labels)`` with ``x`` ``[N, 2]``, ``sigma`` a number or ``[N]`` tensor and
    ``labels`` one-hot ``[N, label_dim]`` or None (unconditional), like ``fastdiff.nn.Precond``.

    The network ``F`` follows the EDM2 recipe on a small scale (SPEC sections 1-3):

    - input ``[c_in x, 1]`` (a constant channel, as the EDM2 UNet appends) -> MP linear to ``C`` features;
    - embedding: MP Fourier features of ``c_noise = ln(sigma)/4`` -> MP linear to ``C``, summed with an MP
      linear of the one-hot label times ``sqrt(label_dim)`` (``mp_sum``, ``t=0.5``; a zero label gives the
      unconditional model), then ``mp_silu``;
    - ``blocks`` residual blocks: ``y = W1 mp_silu(x)``; ``c = W_emb(emb, gain=emb_gain) + 1``;
      ``y = mp_silu(y * c)``; ``y = W2 y``; ``x = mp_sum(x, y, t=0.3)``;
    - output: MP linear to 2 with the learned ``out_gain`` (initialised to 0, so the untrained network is
      ``D = c_skip x``);
    - EDM preconditioning ``D = c_skip x + c_out F(c_in x, c_noise, label)`` with ``sigma_data`` of the data,
      and a learned uncertainty ``u(sigma)`` (MP linear of the Fourier features) for the loss
      ``lambda / exp(u) * (D - x0)^2 + u``.

    All MP linears use forced weight normalization (``W <- N(W)`` before each training forward).
    Training: ``ln sigma ~ N(P_mean, P_std^2)``, Adam (0.9, 0.99), learning rate ``lr / sqrt(max(t / t_ref, 1))``
    with a short warm-up, label dropout (so one network is both the conditional and the unconditional
    model that CFG needs) and a power-function EMA of the weights (``sigma_rel``).
    """

    def __init__(self, channels: int = 64, blocks: int = 3, label_dim: int = 2, sigma_data: float = 0.5,
                 fourier: int = 32, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.channels, self.label_dim, self.sigma_data = channels, label_dim, float(sigma_data)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(fourier, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(fourier, generator=g))
        self.inp = MPLinear(3, channels, g)
        self.emb_noise = MPLinear(fourier, channels, g)
        self.emb_label = MPLinear(label_dim, channels, g) if label_dim else None
        self.blocks = torch.nn.ModuleList([_Block(channels, g) for _ in range(blocks)])
        self.out = MPLinear(channels, 2, g)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.logvar_linear = MPLinear(fourier, 1, g)

    def fourier(self, c_noise: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2) * torch.cos(torch.outer(c_noise.float(), self.freqs) + self.phases)

    def forward(self, x: torch.Tensor, sigma, labels=None, return_logvar: bool = False):
        x32 = x.float()
        n = x32.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        s = sigma[:, None]
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        four = self.fourier(c_noise)
        emb = self.emb_noise(four)
        if self.emb_label is not None and labels is not None:
            lab = torch.as_tensor(labels, device=x.device).float().reshape(n, -1)
            emb = ops.mp_sum(emb, self.emb_label(lab * math.sqrt(self.label_dim)), t=0.5)
        emb = ops.mp_silu(emb)
        h = self.inp(torch.cat([c_in * x32, torch.ones_like(x32[:, :1])], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        f = self.out(h, gain=self.out_gain)
        d = (c_skip * x32 + c_out * f).to(x.dtype)
        if return_logvar:
            return d, self.logvar_linear(four).squeeze(1)
        return d


def power_ema_exponent(sigma_rel: float) -> float:
    """The power-function EMA exponent ``g`` for a relative width ``sigma_rel`` (SPEC section 3)."""
    roots = torch.linalg.eigvals(torch.tensor([[-7.0, -(16 - sigma_rel**-2), -(12 - sigma_rel**-2)],
                                               [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64))
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def train_denoiser(net: ToyDenoiser, mixture, steps: int, batch: int = 512, lr: float = 0.01,
                   P_mean: float = -1.6, P_std: float = 1.6, label_dropout: float = 0.1, ema_std: float = 0.1,
                   seed: int = 0, pool_size: int = 1 << 18, progress=None) -> ToyDenoiser:
    """Trains ``net`` on fresh samples of ``mixture`` (a :class:`GaussianMixture`) for ``steps`` Adam steps
    with the EDM2 loss; returns the power-function-EMA copy in eval mode (``net`` keeps the raw weights).
    ``progress(step, loss)`` is called every step when given."""
    g = torch.Generator().manual_seed(int(seed))
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    gamma = power_ema_exponent(ema_std)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8)
    t_ref, warmup = max(steps // 4, 1), max(steps // 20, 1)
    sd = net.sigma_data
    pool = min(steps * batch, pool_size)  # training data: a pool of exact samples, drawn once
    pool_labels = mixture.sample_labels(pool, g).float()
    pool_x = mixture.sample(pool, pool_labels, g).float()
    for step in range(steps):
        idx = torch.randint(pool, (batch,), generator=g)
        labels, x0 = pool_labels[idx], pool_x[idx]
        if label_dropout > 0:
            labels = labels * (torch.rand(batch, 1, generator=g) >= label_dropout).float()
        sigma = (torch.randn(batch, generator=g) * P_std + P_mean).exp()
        noise = torch.randn(batch, 2, generator=g)
        d, logvar = net(x0 + sigma[:, None] * noise, sigma, labels, return_logvar=True)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        loss = (weight[:, None] / logvar.exp()[:, None] * (d - x0) ** 2 + logvar[:, None]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        for group in opt.param_groups:
            group["lr"] = lr / math.sqrt(max(step / t_ref, 1.0)) * min((step + 1) / warmup, 1.0)
        opt.step()
        beta = (1 - 1 / (step + 1)) ** (gamma + 1)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p.detach(), 1 - beta)
        if progress is not None:
            progress(step, loss.detach().item())
    return ema
