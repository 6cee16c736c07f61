"""Guidance whose weight and interval differ per batch row, so that every setting of a sweep runs in one
batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fastdiff.experiments.sweep.grid import IntervalSpec
from fastdiff.sampling.guidance import EvalContext, Guidance, Guided

__all__ = ["PerRowGuidance"]


class PerRowGuidance(Guidance):
    """Guidance whose weight and interval differ per batch row: autoguidance by ``guide`` or, with
    ``guide=None``, CFG with the main network's all-zero null label. Row ``r`` is guided,
    ``D = D_0 + w_r (D_1 - D_0)``, only where ``w_r != 1`` and the evaluation lies inside the row's
    interval; the guiding branch is evaluated on those rows only. ``rows_main`` / ``rows_guide`` count the
    image-evaluations of each network."""

    def __init__(self, weights: torch.Tensor, intervals: Sequence[IntervalSpec | None], guide: Callable | None = None):
        self.w = weights.to(torch.float32)
        n = len(self.w)
        if len(intervals) != n:
            raise ValueError(f"PerRowGuidance: {len(intervals)} intervals for {n} weights")
        inf = float("inf")
        self.sig_lo = torch.tensor([iv.lo if iv and iv.kind == "sigma" else -inf for iv in intervals])
        self.sig_hi = torch.tensor([iv.hi if iv and iv.kind == "sigma" else inf for iv in intervals])
        self.step_lo = torch.tensor([int(iv.lo) if iv and iv.kind == "steps" else -1 for iv in intervals])
        self.step_hi = torch.tensor([int(iv.hi) if iv and iv.kind == "steps" else 1 << 30 for iv in intervals])
        self.guide = guide
        self.rows_main = 0
        self.rows_guide = 0

    def active(self, sigma: torch.Tensor, step: int) -> torch.Tensor:
        s = sigma.detach().double().cpu()
        inside = (s > self.sig_lo) & (s <= self.sig_hi) & (self.step_lo <= step) & (step <= self.step_hi)
        return inside & (self.w != 1)

    def evaluate(self, net, x, sigma, labels, ctx: EvalContext) -> Guided:
        mask = self.active(sigma, ctx.step)
        idx = mask.nonzero().flatten().to(x.device)
        m = len(idx)
        self.rows_main += len(x)
        self.rows_guide += m
        if m == 0:
            return Guided(ctx.call(net, x, sigma, labels))
        if self.guide is None:
            if labels is None:
                raise ValueError("CFG needs class labels; give a guide network for an unconditional model")
            out = ctx.call(net, torch.cat([x, x[idx]]), torch.cat([sigma, sigma[idx]]),
                           torch.cat([labels, torch.zeros_like(labels[idx])]))
            d1, d0_part = out[:len(x)], out[len(x):]
        else:
            d1 = ctx.call(net, x, sigma, labels)
            d0_part = ctx.call(self.guide, x[idx], sigma[idx], None if labels is None else labels[idx])
        d0 = d1.clone()
        d0[idx] = d0_part.to(d1.dtype)
        w = torch.where(mask, self.w, torch.ones_like(self.w)).to(device=x.device, dtype=d1.dtype)
        return Guided(d1, d0, w)
