"""Per-sample random numbers: one ``torch.Generator`` per sample, so that a sample's draws depend on its
own seed only, never on the batch it is drawn in.

Every helper takes ``generators`` (a list with one generator per sample, or None for torch's global
generator) and draws sample by sample, on each generator's own device, in float32; the result is then
moved to ``device`` / ``dtype``. Generators on the sampling device draw there with no copy; CPU
generators for samples on a GPU cost a host-to-device copy per draw, which waits for the GPU's queue
(a stream sync) on every step of a stochastic sampler: :func:`fastdiff.sampling.generate_images` seeds
its generators on the sampling device.
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
    rows = [torch.randint(high, (1,), generator=g, device=g.device, dtype=torch.int64) for g in generators]
    if not rows:
        return torch.empty((0,), dtype=torch.int64, device=device)
    return torch.cat(rows).to(device)  # no host read of the draws


def seed_inputs(seeds: Sequence[int], shape, label_dim: int = 0, class_idx: int | None = None, device="cpu"):
    """The start of every sample: ``(generators, noise, classes)`` for ``seeds``, each seed's generator (on
    ``device``) drawing first its initial noise ``shape`` (float32), then its class in ``[0, label_dim)`` (only
    for a conditional network, ``label_dim > 0``, without a fixed ``class_idx``). ``noise`` is ``[N, *shape]``,
    ``classes`` int64 ``[N]`` (None for ``label_dim = 0``), both on ``device`` and drawn without a host read;
    the generators go on to the sampler."""
    gens = seed_generators(seeds, device=device)
    noise, classes = [], []
    for g in gens:
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=g.device))
        if label_dim and class_idx is not None:
            classes.append(torch.full((1,), int(class_idx), dtype=torch.int64, device=g.device))
        elif label_dim:
            classes.append(torch.randint(label_dim, (1,), generator=g, device=g.device, dtype=torch.int64))
    if not gens:
        noise_t = torch.empty((0, *tuple(shape)), dtype=torch.float32, device=device)
        return gens, noise_t, (torch.empty((0,), dtype=torch.int64, device=device) if label_dim else None)
    return gens, torch.stack(noise), (torch.cat(classes) if label_dim else None)

