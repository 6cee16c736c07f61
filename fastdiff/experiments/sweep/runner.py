"""The run of a sweep: every cell sampled (the cells sharing networks in one batch), scored by a Frechet
distance streamed from the sampler, and saved at once (a killed sweep resumes), split across ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import torch

from fastdiff._atomic import atomic_write_with, remove_orphan_temps
from fastdiff._dist import rank_and_world
from fastdiff.experiments.sweep.grid import AXES, Cell, SweepSpec, axis_label, refine_axes
from fastdiff.experiments.sweep.guidance import PerRowGuidance
from fastdiff.experiments.sweep.networks import Networks
from fastdiff.sampling import rng

__all__ = ["run_sweep", "sample_settings", "load_cells", "cell_evaluations", "cells_dir", "NonFiniteSamples"]


class NonFiniteSamples(ValueError):
    """Samples holding NaN or Inf (a diverged network): a score of them would be meaningless."""


def cells_dir(outdir: str) -> str:
    return os.path.join(outdir, "cells")


def load_cells(outdir: str) -> dict[str, dict]:
    """The finished cells in ``outdir/cells`` (key -> record); unreadable files are ignored (redone)."""
    folder = cells_dir(outdir)
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
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    return out


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
    _, noise, classes = rng.seed_inputs(seeds, shape, label_dim)
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
        rank, world_size = rank_and_world()
    os.makedirs(cells_dir(outdir), exist_ok=True)
    if rank == 0:  # what a killed sweep left (other ranks write nothing before _evaluate's first barrier)
        for folder in (outdir, cells_dir(outdir), os.path.join(outdir, "phema-main"),
                       os.path.join(outdir, "phema-guide")):
            remove_orphan_temps(folder)
    mains = Networks("main", main_net, main_snapshots, outdir, device, progress)
    guides = Networks("guide", guide_net, guide_snapshots, outdir, device, progress)
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
                axes={a: [axis_label(a, v) for v in _axis_union(history, a)] for a in AXES},
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
            evals = cell_evaluations(c, steps, len(seeds), sigma_max)
            rec = dict(cell=c.as_dict(), key=c.key, value=scorer.score(stats[j]), metric=metric_name,
                       num_images=len(seeds), steps=steps, evaluations=evals, round=round_,
                       group_seconds=round(wall, 3), group_cpu_seconds=round(cpu, 3), group_cells=len(cells),
                       group_rows=counts)
            path = os.path.join(cells_dir(outdir), c.key + ".json")
            atomic_write_with(path, lambda f, r=rec: f.write((json.dumps(r, indent=1) + "\n").encode()))
            bar.update(1)
            if on_cell is not None:
                on_cell(rec)
    bar.close()
    if distributed:
        dist.barrier()


def cell_evaluations(cell: Cell, steps: int, n: int, sigma_max: float = 80.0) -> dict:
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
