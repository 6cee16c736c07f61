"""Expert denoisers by noise level: one network per sigma range, as in eDiff-I's ensemble of expert denoisers
(Balaji et al. 2022).

``Experts([(lo, hi, net), ...])`` is itself a denoiser: each evaluation of a sample goes to the network whose
range ``(lo, hi]`` holds its sigma, so it composes with every sampler and guidance method (a guide may be an
ensemble too) and costs what sampling with one of its networks does. See :class:`Experts`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from fastdiff.diffusion import sigma_per_sample

__all__ = ["Experts", "parse_sigma_range", "fill_gaps", "format_range"]

_ATTRS = ("img_channels", "img_resolution", "label_dim")


def parse_sigma_range(text: str, what: str = "sigma range") -> tuple[float, float]:
    """``'lo,hi'`` -> ``(lo, hi)`` with ``0 <= lo < hi <= inf`` (``hi`` may be ``inf``)."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed {what} {text!r}: expected 'lo,hi', e.g. 0,1.5 or 1.5,inf") from None
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo < hi:
        raise ValueError(f"bad {what} {text!r}: expected 0 <= lo < hi (hi may be inf)")
    return lo, hi


def format_range(lo: float, hi: float) -> str:
    return f"({lo:g}, {hi:g}]"


def _check_ranges(ranges: Sequence[tuple[float, float]]) -> None:
    for lo, hi in ranges:
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or math.isnan(lo) or math.isnan(hi) \
                or not 0 <= lo < hi:
            raise ValueError(f"Experts: bad sigma range ({lo!r}, {hi!r}]: expected 0 <= lo < hi (hi may be inf)")
    ordered = sorted(ranges)
    if ordered[0][0] != 0:
        raise ValueError(f"Experts: the ranges leave (0, {ordered[0][0]:g}] uncovered; the lowest range must start "
                         f"at 0")
    if ordered[-1][1] != math.inf:
        raise ValueError(f"Experts: the ranges leave ({ordered[-1][1]:g}, inf) uncovered; the highest range must end "
                         f"at inf")
    for (lo0, hi0), (lo1, hi1) in zip(ordered, ordered[1:]):
        if hi0 > lo1:
            raise ValueError(f"Experts: ranges {format_range(lo0, hi0)} and {format_range(lo1, hi1)} overlap; "
                             f"every sigma needs exactly one expert")
        if hi0 < lo1:
            raise ValueError(f"Experts: no expert for sigma in {format_range(hi0, lo1)} (between "
                             f"{format_range(lo0, hi0)} and {format_range(lo1, hi1)})")


def fill_gaps(experts: Sequence[tuple[float, float, Callable]], fallback: Callable) -> list:
    """``experts`` plus ``(lo, hi, fallback)`` for every part of ``(0, inf)`` that none of them covers (for
    experts fine-tuned on some ranges of a base network that serves the rest). Overlaps stay an error."""
    items = sorted(((float(lo), float(hi), net) for lo, hi, net in experts), key=lambda e: (e[0], e[1]))
    out, at = [], 0.0
    for lo, hi, net in items:
        if lo > at:
            out.append((at, lo, fallback))
        out.append((lo, hi, net))
        at = max(at, hi)
    if at < math.inf:
        out.append((at, math.inf, fallback))
    return out


class Experts(torch.nn.Module):
    """A denoiser made of networks for disjoint sigma ranges ``(lo, hi]`` covering ``(0, inf)`` (below).
    ``experts``: ``[(lo, hi, net), ...]`` in any order; the networks must agree on
    ``img_channels``, ``img_resolution`` and ``label_dim`` (and ``sigma_data`` where they have one).

    ``Experts([(lo, hi, net), ...])`` is itself a denoiser: each evaluation ``D(x; sigma)`` of a sample is done
    by the one network whose range ``(lo, hi]`` holds the sample's sigma (the first range also takes
    ``sigma = 0``). The ranges must cover ``(0, inf)`` without gap or overlap. It has what the samplers and the
    guidance methods expect of a network (``img_channels``, ``img_resolution``, ``label_dim``,
    ``forward(x, sigma, class_labels)``), so it composes with every sampler and guidance method, and a guide may
    itself be an ensemble (``Autoguidance(w, Experts(...))``). Each sample costs one network evaluation, whichever
    expert makes it: sampling with experts costs what sampling with one of them does.

    A batch whose samples fall into several ranges is split, each part evaluated by its expert, and the results
    put back in order; the samplers evaluate a whole batch at one sigma, so there each call goes to one expert
    with the whole batch. Keyword arguments (e.g. ``return_logvar=True``) are passed on; tensors among them
    with one row per sample are split with the batch. TSG reaches an ensemble through its generic route (the
    guiding branch at a perturbed sigma), since the embedding hook of one network does not apply to another.
    """

    def __init__(self, experts: Sequence[tuple[float, float, Callable]]):
        super().__init__()
        items = list(experts)
        if not items:
            raise ValueError("Experts: needs at least one (lo, hi, net)")
        for e in items:
            if not (isinstance(e, (tuple, list)) and len(e) == 3 and callable(e[2])):
                raise ValueError(f"Experts: each expert must be (lo, hi, net) with a callable net, got {e!r:.100}")
        items = [(float(lo), float(hi), net) for lo, hi, net in items]
        _check_ranges([(lo, hi) for lo, hi, _ in items])
        items.sort(key=lambda e: e[0])
        first = items[0][2]
        for attr in _ATTRS:
            values = []
            for lo, hi, net in items:
                if not hasattr(net, attr):
                    raise ValueError(f"Experts: the network for {format_range(lo, hi)} has no attribute {attr!r} "
                                     f"(expected a Precond-like network)")
                values.append(int(getattr(net, attr) or 0))
            if len(set(values)) > 1:
                listed = ", ".join(f"{format_range(lo, hi)}: {v}" for (lo, hi, _), v in zip(items, values))
                raise ValueError(f"Experts: the networks disagree on {attr} ({listed})")
        sds = {float(net.sigma_data) for _, _, net in items if hasattr(net, "sigma_data")}
        if len(sds) > 1:
            raise ValueError(f"Experts: the networks disagree on sigma_data ({sorted(sds)})")
        self.ranges = [(lo, hi) for lo, hi, _ in items]
        modules = [net for _, _, net in items]
        if all(isinstance(n, torch.nn.Module) for n in modules):
            self.nets = torch.nn.ModuleList(modules)
        else:  # e.g. cuda_graphed networks: plain callables
            self.nets = list(modules)
        self.img_channels = int(first.img_channels)
        self.img_resolution = int(first.img_resolution)
        self.label_dim = int(first.label_dim or 0)
        if sds:
            self.sigma_data = sds.pop()
        # Upper bounds of all but the last range: bucketize(sigma, bounds) = k with bounds[k-1] < sigma <= bounds[k].
        # A plain list, not a buffer: Module.half() must not round the bounds.
        self._bounds = [hi for _, hi in self.ranges[:-1]]

    def __len__(self) -> int:
        return len(self.ranges)

    def extra_repr(self) -> str:
        return "ranges=" + ", ".join(format_range(lo, hi) for lo, hi in self.ranges)

    def route(self, sigma: torch.Tensor) -> torch.Tensor:
        """The expert index of each sample: ``k`` with ``sigma`` in ``(lo_k, hi_k]`` (int64, ``sigma``'s shape)."""
        sigma = torch.as_tensor(sigma)
        if bool(torch.isnan(sigma).any()):
            raise ValueError("Experts: sigma is NaN; no expert can be chosen")
        if sigma.numel() and float(sigma.min()) < 0:
            raise ValueError(f"Experts: negative sigma {float(sigma.min())}")
        bounds = torch.tensor(self._bounds, dtype=torch.float64, device=sigma.device)
        return torch.bucketize(sigma.to(torch.float64), bounds, right=False)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **kwargs):
        n = x.shape[0]
        s = sigma_per_sample(sigma, n, device=x.device, image_shaped=True, who="Experts")
        idx = self.route(s)
        if n == 0 or len(self.ranges) == 1 or bool((idx == idx[0]).all()):
            return self.nets[int(idx[0]) if n else 0](x, sigma, class_labels, **kwargs)
        out = None
        for k in torch.unique(idx).tolist():
            rows = (idx == k).nonzero().flatten()
            part = self.nets[k](x[rows], s[rows], _rows(class_labels, rows, n),
                                **{key: _rows(v, rows, n) for key, v in kwargs.items()})
            if out is None:
                out = _empty_like_batch(part, n)
            _scatter(out, part, rows)
        return out


def _rows(v, rows: torch.Tensor, n: int):
    if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n:
        return v[rows]
    if callable(v) and not isinstance(v, torch.Tensor):
        raise ValueError("Experts: a callable keyword argument (e.g. TSG's embedding hook) cannot be split across "
                         "experts; evaluate a batch whose samples share one sigma range")
    return v


def _empty_like_batch(part, n: int):
    if isinstance(part, tuple):
        return tuple(_empty_like_batch(p, n) for p in part)
    return part.new_empty((n,) + tuple(part.shape[1:]))


def _scatter(out, part, rows: torch.Tensor) -> None:
    if isinstance(out, tuple):
        for o, p in zip(out, part):
            _scatter(o, p, rows)
    else:
        out[rows] = part.to(out.dtype)
