"""The grid of a sweep: its axes (main and guide EMA std, guidance weight, guidance interval), its cells,
and the coarse-to-fine refinement around the best cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

from fastdiff.training.phema import MAX_STD

__all__ = ["AXES", "IntervalSpec", "Cell", "SweepSpec", "axis_label", "refine_axes"]


AXES = ("main_std", "guide_std", "weight", "interval")


@dataclasses.dataclass(frozen=True)
class IntervalSpec:
    """A guidance interval: ``kind`` ``"sigma"`` (guide where ``lo < sigma <= hi``) or ``"steps"`` (guide at
    solver steps ``lo..hi`` inclusive, the Heun correction of step i counting as step i)."""

    kind: str
    lo: float
    hi: float

    def __post_init__(self):
        if self.kind not in ("sigma", "steps"):
            raise ValueError(f"interval kind must be 'sigma' or 'steps', got {self.kind!r}")
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)) or not 0 <= self.lo <= self.hi:
            raise ValueError(f"bad {self.kind} interval ({self.lo}, {self.hi}): expected 0 <= lo <= hi")
        if self.kind == "sigma" and not self.lo < self.hi:
            raise ValueError(f"bad sigma interval ({self.lo}, {self.hi}): expected lo < hi")
        if self.kind == "steps" and (self.lo != int(self.lo) or self.hi != int(self.hi)):
            raise ValueError(f"step interval ({self.lo}, {self.hi}) must be integers")

    @property
    def label(self) -> str:
        if self.kind == "steps":
            return f"steps {int(self.lo)}-{int(self.hi)}"
        return f"({self.lo:g}, {self.hi:g}]"

    @property
    def slug(self) -> str:
        return f"s{int(self.lo)}-{int(self.hi)}" if self.kind == "steps" else f"{self.lo:g}-{self.hi:g}"


def axis_label(axis: str, value) -> str:
    if value is None:
        return "none" if axis == "interval" else "file"
    if axis == "interval":
        return value.label
    return f"{value:g}"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One setting. ``main_std`` / ``guide_std`` None: the network given as a file; ``interval`` None:
    guidance at every noise level."""

    main_std: float | None
    guide_std: float | None
    weight: float
    interval: IntervalSpec | None

    def canonical(self) -> "Cell":
        """At ``w = 1`` the guide and the interval play no part: one evaluation serves all of them."""
        if self.weight == 1:
            return Cell(self.main_std, None, 1.0, None)
        return self

    @property
    def key(self) -> str:
        parts = [f"m{axis_label('main_std', self.main_std)}", f"g{axis_label('guide_std', self.guide_std)}",
                 f"w{self.weight:g}", f"i{self.interval.slug if self.interval else 'none'}"]
        return "_".join(parts)

    def as_dict(self) -> dict:
        return dict(main_std=self.main_std, guide_std=self.guide_std, weight=self.weight,
                    interval=None if self.interval is None else dataclasses.asdict(self.interval))

    @staticmethod
    def from_dict(d: dict) -> "Cell":
        iv = d.get("interval")
        return Cell(None if d["main_std"] is None else float(d["main_std"]),
                    None if d["guide_std"] is None else float(d["guide_std"]), float(d["weight"]),
                    None if iv is None else IntervalSpec(iv["kind"], float(iv["lo"]), float(iv["hi"])))


@dataclasses.dataclass
class SweepSpec:
    """The axes of the grid. An empty std axis means: the network file as given (``None``)."""

    main_stds: Sequence[float | None] = (None,)
    guide_stds: Sequence[float | None] = (None,)
    weights: Sequence[float] = (1.0,)
    intervals: Sequence[IntervalSpec | None] = (None,)

    def __post_init__(self):
        self.main_stds = list(self.main_stds) or [None]
        self.guide_stds = list(self.guide_stds) or [None]
        self.weights = [float(w) for w in self.weights]
        self.intervals = list(self.intervals) or [None]
        if not self.weights:
            raise ValueError("the weight axis is empty")
        for w in self.weights:
            if not math.isfinite(w) or w < 1:
                raise ValueError(f"guidance weight {w} must be >= 1 (1 = no guidance)")
        for s in [*self.main_stds, *self.guide_stds]:
            if s is not None and not 0 < s <= MAX_STD:
                raise ValueError(f"EMA std {s} must lie in (0, {MAX_STD:.4f}]")

    def values(self, axis: str) -> list:
        return {"main_std": self.main_stds, "guide_std": self.guide_stds, "weight": self.weights,
                "interval": self.intervals}[axis]

    def cells(self) -> list[Cell]:
        return [Cell(m, g, w, i) for m, g, w, i in
                itertools.product(self.main_stds, self.guide_stds, self.weights, self.intervals)]


def refine_axes(spec: SweepSpec, best: Cell) -> SweepSpec:
    """One coarse-to-fine step: every axis fixed at the best cell's value, plus, on each numeric axis,
    the midpoints between that value and its neighbours (geometric for stds, arithmetic for weights)."""

    def around(values, v, geometric):
        vals = sorted(x for x in values if x is not None)
        if v is None or len(vals) < 2:
            return [v]
        i = vals.index(v)
        out = [v]
        for j in (i - 1, i + 1):
            if 0 <= j < len(vals):
                a, b = v, vals[j]
                mid = math.sqrt(a * b) if geometric else (a + b) / 2
                out.append(float(f"{mid:.4g}"))
        return sorted(set(out))

    return SweepSpec(main_stds=around(spec.main_stds, best.main_std, True),
                     guide_stds=around(spec.guide_stds, best.guide_std, True),
                     weights=around(spec.weights, best.weight, False), intervals=[best.interval])
