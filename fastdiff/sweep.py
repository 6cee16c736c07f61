"""Grid search over EMA length, guidance weight and guidance interval, scored by a Frechet distance.

EDM2 (Karras et al. 2024, Sec. 3) introduces post-hoc EMA so that the EMA length can be chosen after
training; the autoguidance paper (Karras et al. 2024, Sec. 5) and the guidance-interval paper
(Kynkaanniemi et al. 2024, Sec. 4) choose the main and guide EMA lengths, the weight ``w`` and the
interval by grid search on FID / FD_DINOv2. :func:`run_sweep` does that search:

- Networks: the main network is either a fixed network or a training run's snapshot folder whose
  post-hoc EMAs are reconstructed once for all requested stds (one pass over the snapshots,
  :func:`fastdiff.training.phema.reconstruct_phema`) and written to ``outdir`` so that the best setting
  can be reproduced with ``fastdiff generate``. The guide likewise (autoguidance); without a guide the
  guidance is CFG with the main network's null label.
- Cells: every combination of the axes ``main_std``, ``guide_std``, ``weight``, ``interval``. All cells use
  the same seeds (noise and class per seed exactly as ``fastdiff.sampling.generate_images`` draws them)
  and the deterministic Heun sampler. Cells that share networks are sampled together: the rows of all
  their settings form one batch with per-row weights and intervals (:class:`PerRowGuidance`), the guide
  evaluated only on the rows inside their interval with ``w != 1``.
- Scores stream from the sampler into the detector's features (no images are written); each cell's
  result goes to ``outdir/cells/<key>.json`` atomically as soon as it is known, so a killed sweep resumes
  where it stopped. Under torch.distributed each rank takes its share of the cells.
- ``refine`` rounds of coarse-to-fine search: around the best cell, the midpoints to its neighbours on
  each numeric axis (geometric for stds, arithmetic for weights) are added and evaluated.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch

from fastdiff._atomic import atomic_write_with, remove_orphan_temps
from fastdiff.sampling.guidance import EvalContext, Guidance, Guided

__all__ = ["Interval", "Cell", "SweepSpec", "PerRowGuidance", "run_sweep", "load_cells", "heatmaps",
           "refine_axes", "generate_command", "AXES", "NonFiniteSamples"]

AXES = ("main_std", "guide_std", "weight", "interval")




class NonFiniteSamples(ValueError):
    """Samples holding NaN or Inf (a diverged network): a score of them would be meaningless."""


# ------------------------------------------------------------------------------------------------ cells


@dataclasses.dataclass(frozen=True)
class Interval:
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


def _label(axis: str, value) -> str:
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
    interval: Interval | None

    def canonical(self) -> "Cell":
        """At ``w = 1`` the guide and the interval play no part: one evaluation serves all of them."""
        if self.weight == 1:
            return Cell(self.main_std, None, 1.0, None)
        return self

    @property
    def key(self) -> str:
        parts = [f"m{_label('main_std', self.main_std)}", f"g{_label('guide_std', self.guide_std)}",
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
                    None if iv is None else Interval(iv["kind"], float(iv["lo"]), float(iv["hi"])))


@dataclasses.dataclass
class SweepSpec:
    """The axes of the grid. An empty std axis means: the network file as given (``None``)."""

    main_stds: Sequence[float | None] = (None,)
    guide_stds: Sequence[float | None] = (None,)
    weights: Sequence[float] = (1.0,)
    intervals: Sequence[Interval | None] = (None,)

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
            if s is not None and not 0 < s <= 0.2887:
                raise ValueError(f"EMA std {s} must lie in (0, 0.2887]")

    def values(self, axis: str) -> list:
        return {"main_std": self.main_stds, "guide_std": self.guide_stds, "weight": self.weights,
                "interval": self.intervals}[axis]

    def cells(self) -> list[Cell]:
        return [Cell(m, g, w, i) for m, g, w, i in
                itertools.product(self.main_stds, self.guide_stds, self.weights, self.intervals)]


# ------------------------------------------------------------------------------------------------ guidance


class PerRowGuidance(Guidance):
    """Guidance whose weight and interval differ per batch row: autoguidance by ``guide`` or, with
    ``guide=None``, CFG with the main network's all-zero null label. Row ``r`` is guided,
    ``D = D_0 + w_r (D_1 - D_0)``, only where ``w_r != 1`` and the evaluation lies inside the row's
    interval; the guiding branch is evaluated on those rows only. ``rows_main`` / ``rows_guide`` count the
    image-evaluations of each network."""

    def __init__(self, weights: torch.Tensor, intervals: Sequence[Interval | None], guide: Callable | None = None):
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


# ------------------------------------------------------------------------------------------------ networks


class _Networks:
    """Resolves a std (or None) to a loaded network: reconstructed once per std from a snapshot folder
    (written to ``outdir``; reused when already there), or the one file given."""

    def __init__(self, role: str, net_path: str | None, snapshots: str | None, outdir: str, device, progress: bool):
        if (net_path is None) == (snapshots is None) and not (net_path is None and role == "guide"):
            raise ValueError(f"{role}: give exactly one of a network file or a snapshot folder")
        self.role, self.net_path, self.snapshots = role, net_path, snapshots
        self.outdir, self.device, self.progress = outdir, device, progress
        self.paths: dict[float | None, str] = {}
        self._cache: tuple | None = None

    @property
    def given(self) -> bool:
        return self.net_path is not None or self.snapshots is not None

    def prepare(self, stds: Sequence[float | None], write: bool = True) -> None:
        """Reconstruct the missing stds in one pass over the snapshots (rank 0); others find the files."""
        from fastdiff.training.phema import reconstruct_phema
        from fastdiff.training.snapshots import list_snapshots, snapshot_name

        stds = sorted({s for s in stds})
        if self.snapshots is None:
            if any(s is not None for s in stds):
                raise ValueError(f"{self.role}: EMA stds need a snapshot folder, not a network file")
            if self.net_path is not None:
                self.paths[None] = self.net_path
            return
        if None in stds:
            raise ValueError(f"{self.role}: with a snapshot folder, give the EMA std(s) to reconstruct")
        snaps = list_snapshots(self.snapshots)
        if not snaps:
            raise FileNotFoundError(f"{self.snapshots}: no EMA snapshots (network-snapshot-*.safetensors)")
        nimg = max(s.nimg for s in snaps)
        folder = os.path.join(self.outdir, f"phema-{self.role}")
        missing = []
        for s in stds:
            path = os.path.join(folder, snapshot_name(nimg, s, prefix="phema"))
            self.paths[s] = path
            if not os.path.isfile(path):
                missing.append(s)
        if missing and write:
            reconstruct_phema(self.snapshots, missing, folder, out_nimg=nimg, progress=self.progress, verbose=False)

    def get(self, std):
        from fastdiff.io import load_network

        if not self.given:
            return None
        if self._cache is not None and self._cache[0] == std:
            return self._cache[1]
        net = load_network(self.paths[std], device=self.device).eval().requires_grad_(False)
        self._cache = (std, net)
        return net


# ------------------------------------------------------------------------------------------------ the run


def _cells_dir(outdir: str) -> str:
    return os.path.join(outdir, "cells")


def load_cells(outdir: str) -> dict[str, dict]:
    """The finished cells in ``outdir/cells`` (key -> record); unreadable files are ignored (redone)."""
    folder = _cells_dir(outdir)
    out: dict[str, dict] = {}
    if not os.path.isdir(folder):
        return out
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(folder, name), "rb") as f:
                rec = json.loads(f.read(1 << 20))
            out[Cell.from_dict(rec["cell"]).key] = rec
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _seed_inputs(seeds: Sequence[int], shape, label_dim: int):
    """Noise [N, *shape] and class indices per seed, drawn as ``generate_images`` draws them."""
    from fastdiff.sampling import rng

    noise, classes = [], []
    for g in rng.seed_generators(list(seeds)):
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
        if label_dim:
            classes.append(int(torch.randint(label_dim, (1,), generator=g)))
    return torch.stack(noise), (torch.tensor(classes, dtype=torch.int64) if label_dim else None)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_settings(net, settings: Sequence[Cell], seeds: Sequence[int], guide=None, *, steps: int, batch: int,
                    device, on_batch: Callable[[int, torch.Tensor], None], sigma_max: float = 80.0,
                    sigma_min: float = 0.002) -> dict:
    """Sample ``seeds`` under every setting (weight + interval) with one network pair; all settings of a
    seed chunk go through the network together (``batch`` rows per call at most, at least one setting).
    ``on_batch(setting_index, uint8_images)`` receives the images. Returns evaluation counts.
    Samples holding NaN or Inf raise :class:`NonFiniteSamples` naming their seeds, once all are sampled."""
    from fastdiff.sampling import sample
    from fastdiff.sampling.generate import nonfinite_rows, to_uint8

    seeds = list(seeds)
    bad: dict[int, list[int]] = {}  # setting index -> seeds of its non-finite samples

    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    label_dim = int(net.label_dim or 0)
    noise, classes = _seed_inputs(seeds, shape, label_dim)
    k = len(settings)
    per_chunk = min(len(seeds), max(1, batch // max(k, 1)))  # seeds per network call
    group = max(1, batch // per_chunk)  # settings per network call (all of them unless batch < k)
    counts = dict(main=0, guide=0)
    for s0 in range(0, len(seeds), per_chunk):
        nz = noise[s0:s0 + per_chunk]
        cl = None if classes is None else classes[s0:s0 + per_chunk]
        n = len(nz)
        for g0 in range(0, k, group):
            part = list(range(g0, min(k, g0 + group)))
            w = torch.tensor([settings[j].weight for j in part for _ in range(n)])
            ivs = [settings[j].interval for j in part for _ in range(n)]
            guidance = PerRowGuidance(w, ivs, guide)
            x0 = nz.repeat(len(part), 1, 1, 1).to(device)
            labels = None
            if cl is not None:
                labels = torch.nn.functional.one_hot(cl.repeat(len(part)), label_dim).to(device=device,
                                                                                        dtype=torch.float32)
            x = sample(net, x0, sampler="heun", steps=steps, guidance=guidance, labels=labels,
                       sigma_max=sigma_max, sigma_min=sigma_min)
            images = to_uint8(x).cpu()
            rows = nonfinite_rows(x).cpu().tolist()
            for q, j in enumerate(part):
                bad_seeds = [seeds[s0 + r] for r in range(n) if rows[q * n + r]]
                if bad_seeds:
                    bad.setdefault(j, []).extend(bad_seeds)
                on_batch(j, images[q * n:(q + 1) * n])
            counts["main"] += guidance.rows_main
            counts["guide"] += guidance.rows_guide
    if bad:
        j, listed = min(bad.items())
        shown = ", ".join(map(str, listed[:20])) + (f" and {len(listed) - 20} more" if len(listed) > 20 else "")
        others = f" (and in {len(bad) - 1} other setting(s))" if len(bad) > 1 else ""
        raise NonFiniteSamples(f"{len(listed)} of {len(seeds)} samples of setting {settings[j].key} are not finite "
                               f"(NaN or Inf: the network diverged), seeds {shown}{others}; no score is recorded")
    return counts


class _Scorer:
    def __init__(self, detector, ref):
        self.detector, self.ref = detector, ref

    def new(self):
        from fastdiff.metrics import FeatureStats

        return FeatureStats()

    def update(self, stats, images: torch.Tensor) -> None:
        stats.update(self.detector(images))

    def score(self, stats) -> float:
        from fastdiff.metrics import frechet_distance

        return float(frechet_distance(stats.mean, stats.cov, self.ref.mu, self.ref.sigma))


def run_sweep(spec: SweepSpec, outdir: str, *, detector, ref, seeds: Sequence[int], steps: int = 32,
              main_net: str | None = None, main_snapshots: str | None = None, guide_net: str | None = None,
              guide_snapshots: str | None = None, batch: int = 256, device="cpu", refine: int = 0,
              metric_name: str | None = None, progress: bool = True, rank: int | None = None,
              world_size: int | None = None, on_cell: Callable[[dict], None] | None = None,
              sigma_max: float = 80.0) -> dict:
    """Evaluate every cell of ``spec`` (then ``refine`` coarse-to-fine rounds); returns the summary that
    :func:`write_outputs` writes. ``detector`` is a :class:`fastdiff.metrics.Detector`, ``ref`` a
    :class:`fastdiff.metrics.ReferenceStats` made with it. ``on_cell(record)`` runs after each cell is saved."""
    if len(seeds) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 images per cell, got {len(seeds)} seeds")
    if ref.detector != detector.name:
        raise ValueError(f"the reference was computed with detector {ref.detector!r}, not {detector.name!r}")
    if rank is None or world_size is None:
        rank, world_size = _world()
    os.makedirs(_cells_dir(outdir), exist_ok=True)
    if rank == 0:  # what a killed sweep left (other ranks write nothing before _evaluate's first barrier)
        for folder in (outdir, _cells_dir(outdir), os.path.join(outdir, "phema-main"),
                       os.path.join(outdir, "phema-guide")):
            remove_orphan_temps(folder)
    mains = _Networks("main", main_net, main_snapshots, outdir, device, progress)
    guides = _Networks("guide", guide_net, guide_snapshots, outdir, device, progress)
    if not guides.given and any(g is not None for g in spec.guide_stds):
        raise ValueError("guide EMA stds given but no guide (snapshot folder or network file)")
    scorer = _Scorer(detector, ref)
    metric_name = metric_name or f"fd_{detector.name}"
    seeds = list(seeds)
    history = []
    t0 = time.perf_counter()
    for round_ in range(refine + 1):
        _evaluate(spec, outdir, mains, guides, scorer, seeds, steps, batch, device, rank, world_size, progress,
                  on_cell, metric_name, round_, sigma_max)
        done = load_cells(outdir)
        history.append(dataclasses.replace(spec))
        if round_ == refine:
            break
        cells = [c for c in _all_cells(history) if c.canonical().key in done]
        best = min(cells, key=lambda c: done[c.canonical().key]["value"])
        spec = refine_axes(spec, best)
    done = load_cells(outdir)
    rows = []
    for c in _all_cells(history):
        rec = done.get(c.canonical().key)
        if rec is None:
            continue
        rows.append(dict(c.as_dict(), key=c.key, value=rec["value"], evaluations=rec["evaluations"],
                         round=rec.get("round", 0), shared_with=None if c.canonical() == c else c.canonical().key))
    best = min(rows, key=lambda r: r["value"]) if rows else None
    return dict(metric=metric_name, detector=detector.name, seeds=[seeds[0], seeds[-1]] if seeds else [],
                num_images=len(seeds), steps=steps, sampler="heun", rows=rows, best=best,
                networks=dict(main={str(k): v for k, v in mains.paths.items()},
                              guide={str(k): v for k, v in guides.paths.items()}),
                axes={a: [_label(a, v) for v in _axis_union(history, a)] for a in AXES},
                seconds=round(time.perf_counter() - t0, 2))


def _all_cells(history: Sequence[SweepSpec]) -> list[Cell]:
    seen, out = set(), []
    for s in history:
        for c in s.cells():
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def _axis_union(history, axis) -> list:
    vals = []
    for s in history:
        for v in s.values(axis):
            if v not in vals:
                vals.append(v)
    try:
        return sorted(vals, key=lambda v: (v is None, 0 if v is None else (v.lo, v.hi) if axis == "interval" else v))
    except TypeError:
        return vals


def _evaluate(spec, outdir, mains, guides, scorer, seeds, steps, batch, device, rank, world, progress, on_cell,
              metric_name, round_, sigma_max):
    from tqdm.auto import tqdm

    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    canon = []
    for c in spec.cells():
        c = c.canonical()
        if c not in canon:
            canon.append(c)
    if rank == 0:
        mains.prepare([c.main_std for c in canon])
        guides.prepare([c.guide_std for c in canon if c.weight != 1])
    if distributed:
        dist.barrier()
    if rank != 0:
        mains.prepare([c.main_std for c in canon], write=False)
        guides.prepare([c.guide_std for c in canon if c.weight != 1], write=False)
    done = load_cells(outdir)
    mine = [c for i, c in enumerate(canon) if i % world == rank and c.key not in done]
    groups: dict[tuple, list[Cell]] = {}
    for c in mine:
        groups.setdefault((c.main_std, c.guide_std), []).append(c)
    bar = tqdm(total=len(mine), unit="cell", desc=f"sweep round {round_}", disable=not progress or rank != 0,
               file=sys.stderr)
    for (m_std, g_std), cells in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        net = mains.get(m_std)
        guide = guides.get(g_std) if any(c.weight != 1 for c in cells) else None
        stats = [scorer.new() for _ in cells]
        t = time.perf_counter()
        cpu = time.process_time()
        counts = sample_settings(net, cells, seeds, guide, steps=steps, batch=batch, device=device,
                                 on_batch=lambda j, imgs: scorer.update(stats[j], imgs), sigma_max=sigma_max)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        # Per-cell evaluations: each setting's share (rows are N per setting; the guide only where active).
        for j, c in enumerate(cells):
            evals = _cell_evaluations(c, steps, len(seeds), sigma_max)
            rec = dict(cell=c.as_dict(), key=c.key, value=scorer.score(stats[j]), metric=metric_name,
                       num_images=len(seeds), steps=steps, evaluations=evals, round=round_,
                       group_seconds=round(wall, 3), group_cpu_seconds=round(cpu, 3), group_cells=len(cells),
                       group_rows=counts)
            path = os.path.join(_cells_dir(outdir), c.key + ".json")
            atomic_write_with(path, lambda f, r=rec: f.write((json.dumps(r, indent=1) + "\n").encode()))
            bar.update(1)
            if on_cell is not None:
                on_cell(rec)
    bar.close()
    if distributed:
        dist.barrier()


def _cell_evaluations(cell: Cell, steps: int, n: int, sigma_max: float = 80.0) -> dict:
    """Image-evaluations of the main network and of the guiding branch for ``n`` images of this cell
    under the deterministic Heun schedule (2 steps - 1 evaluations, the guide only inside the interval)."""
    from fastdiff.sampling.samplers import edm_sigma_steps

    t = edm_sigma_steps(steps, sigma_max=sigma_max, dtype=torch.float32)
    ev = []  # (step, sigma) of every evaluation
    for i in range(steps):
        ev.append((i, float(t[i])))
        if i < steps - 1:
            ev.append((i, float(t[i + 1])))
    guided = 0
    if cell.weight != 1:
        iv = cell.interval
        for i, s in ev:
            if iv is None or (iv.kind == "sigma" and iv.lo < s <= iv.hi) or (iv.kind == "steps" and iv.lo <= i <= iv.hi):
                guided += 1
    return dict(main=len(ev) * n, guide=guided * n, per_image=len(ev) + guided)


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


# ------------------------------------------------------------------------------------------------ outputs


def generate_command(summary: dict, row: dict | None = None, guide_given: bool = True) -> str:
    """The ``fastdiff generate`` command that samples the best cell (or ``row``) with the same seeds."""
    row = row or summary["best"]
    main = summary["networks"]["main"][str(row["main_std"])]
    parts = ["fastdiff generate", f"--net {main}", f"--steps {summary['steps']}",
             f"--seeds {summary['seeds'][0]}-{summary['seeds'][1]}"]
    if row["weight"] != 1:
        if guide_given and summary["networks"]["guide"]:
            parts.append(f"--gnet {summary['networks']['guide'][str(row['guide_std'])]}")
        else:
            parts.append("--guidance-method cfg")
        parts.append(f"--guidance {row['weight']:g}")
        iv = row["interval"]
        if iv is not None:
            if iv["kind"] == "sigma":
                parts.append(f"--interval {iv['lo']:g},{iv['hi']:g}")
            else:
                parts.append(f"--interval-steps {int(iv['lo'])},{int(iv['hi'])}")
    parts.append("--outdir samples")
    return " ".join(parts)


def _axis_value(row: dict, axis: str) -> str:
    v = row[axis]
    if axis == "interval":
        return _label(axis, None if v is None else Interval(v["kind"], v["lo"], v["hi"]))
    return _label(axis, v)


def heatmaps(summary: dict, outdir: str) -> list[str]:
    """A PNG per pair of axes with more than one value: the metric minimised over the other axes, the best
    cell marked. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, best = summary["rows"], summary["best"]
    axes = [a for a in AXES if len(summary["axes"][a]) > 1]
    written = []
    for a, b in itertools.combinations(axes, 2):
        ya, xb = summary["axes"][a], summary["axes"][b]
        grid = np.full((len(ya), len(xb)), np.nan)
        for r in rows:
            i, j = ya.index(_axis_value(r, a)), xb.index(_axis_value(r, b))
            grid[i, j] = r["value"] if np.isnan(grid[i, j]) else min(grid[i, j], r["value"])
        fig = Figure(figsize=(1.2 + 0.9 * len(xb), 1.2 + 0.6 * len(ya)), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        fig.colorbar(im, ax=ax, label=summary["metric"] + " (lower is better)")
        for i in range(len(ya)):
            for j in range(len(xb)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white")
        bi, bj = ya.index(_axis_value(best, a)), xb.index(_axis_value(best, b))
        ax.add_patch(_rect(bj, bi))
        ax.set_xticks(range(len(xb)), xb, rotation=30, fontsize=7)
        ax.set_yticks(range(len(ya)), ya, fontsize=7)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        ax.set_title(f"{summary['metric']}, best over the other axes; red box = best cell", fontsize=8)
        path = os.path.join(outdir, f"heatmap-{a}-{b}.png")
        atomic_write_with(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=90))
        written.append(path)
    return written


def _rect(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5)


def write_outputs(summary: dict, outdir: str, plots: bool = True) -> list[str]:
    """``sweep.csv``, ``sweep.json`` and (with matplotlib) the heatmaps; returns the paths written."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["main_std", "guide_std", "weight", "interval", summary["metric"], "evaluations_per_image",
                "round", "key"])
    for r in sorted(summary["rows"], key=lambda r: r["value"]):
        w.writerow([_axis_value(r, "main_std"), _axis_value(r, "guide_std"), f"{r['weight']:g}",
                    _axis_value(r, "interval"), f"{r['value']:.6g}", r["evaluations"]["per_image"], r["round"],
                    r["key"]])
    paths = [os.path.join(outdir, "sweep.csv"), os.path.join(outdir, "sweep.json")]
    atomic_write_with(paths[0], lambda f: f.write(buf.getvalue().encode()))
    atomic_write_with(paths[1], lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    if plots and summary["rows"]:
        try:
            paths += heatmaps(summary, outdir)
        except ImportError as exc:
            print(f"sweep: no heatmaps ({exc}); install matplotlib", file=sys.stderr)
    return paths
