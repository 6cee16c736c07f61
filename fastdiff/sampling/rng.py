"""Per-sample random numbers: one ``torch.Generator`` per sample, so that a sample's draws depend on its
own seed only, never on the batch it is drawn in.

Every helper takes ``generators`` (a list with one generator per sample, or None for torch's global
generator) and draws sample by sample, on each generator's own device, in float32; the result is then
moved to ``device`` / ``dtype``.
"""

from __future__ import annotations

from typing import Sequence

import torch

Generators = Sequence[torch.Generator] | None


def seed_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per seed."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def check_generators(generators: Generators, n: int) -> None:
    if generators is not None and len(generators) != n:
        raise ValueError(f"expected one generator per sample ({n}), got {len(generators)}")


def randn(generators: Generators, n: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``[n, *shape]``: row i from ``generators[i]``."""
    shape = tuple(shape)
    if generators is None:
        return torch.randn((n,) + shape, device=device, dtype=dtype)
    check_generators(generators, n)
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    if not rows:
        return torch.empty((0,) + shape, device=device, dtype=dtype)
    return torch.stack(rows).to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generators: Generators) -> torch.Tensor:
    return randn(generators, x.shape[0], x.shape[1:], device=x.device, dtype=x.dtype)


def randint(generators: Generators, n: int, high: int, device=None) -> torch.Tensor:
    """Integers in ``[0, high)``, shape ``[n]`` (int64)."""
    if generators is None:
        return torch.randint(high, (n,), device=device)
    check_generators(generators, n)
    vals = [int(torch.randint(high, (1,), generator=g, device=g.device)) for g in generators]
    return torch.tensor(vals, dtype=torch.int64, device=device)


def seed_inputs(seeds: Sequence[int], shape, label_dim: int = 0, class_idx: int | None = None):
    """The start of every sample: ``(generators, noise, classes)`` for ``seeds``, each seed's generator drawing
    first its initial noise ``shape`` (float32, on the CPU), then its class in ``[0, label_dim)`` (only for a
    conditional network, ``label_dim > 0``, without a fixed ``class_idx``). ``noise`` is ``[N, *shape]``,
    ``classes`` int64 ``[N]`` (None for ``label_dim = 0``); the generators go on to the sampler."""
    gens = seed_generators(seeds)
    noise, classes = [], []
    for g in gens:
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
        if label_dim and class_idx is not None:
            classes.append(int(class_idx))
        elif label_dim:
            classes.append(int(torch.randint(label_dim, (1,), generator=g)))
    labels = torch.tensor(classes, dtype=torch.int64) if label_dim else None
    return gens, torch.stack(noise), labels

