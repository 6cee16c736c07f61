"""Image generation from a trained network: seeds in, uint8 images out, batch by batch.

Each seed owns a generator that draws, in order, the sample's initial noise, its class label (when the
network is conditional and no class is fixed) and then any noise the sampler or the guidance needs,
so an image depends on its seed only (not on the batch size or which other seeds share its batch).

The generators live on the sampling device, so that the noise a stochastic sampler or guidance method
draws inside the loop never crosses from the host (a blocking copy, a stream sync on a GPU, at every
step). On the CPU this is the CPU generator as always; on a GPU a seed's numbers come from that device's
generator (CUDA's Philox), not the CPU's: the same seed gives other noise on a GPU than on the CPU.
``generator_device="cpu"`` keeps the CPU's numbers on every device, at one copy per draw.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator, Sequence

import torch

from fastdiff._dist import rank_and_world
from fastdiff.sampling import rng
from fastdiff.sampling.guidance import Autoguidance, Guidance, Interval
from fastdiff.sampling.samplers import SAMPLERS, check_churn_options, sample

__all__ = ["generate_images", "make_guidance", "to_uint8", "split_batches", "MAX_SEED", "check_churn_options",
           "nonfinite_rows"]

MAX_SEED = 2**32 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 [0, 255] (``x * 127.5 + 128``, clipped), on the CPU."""
    return (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: which samples of a batch ``[N, ...]`` hold a NaN or an Inf."""
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int,)) and not (isinstance(s, torch.Tensor) and s.ndim == 0):
            raise ValueError(f"seeds must be integers, got {s!r}")
        s = int(s)
        if not 0 <= s <= MAX_SEED:
            raise ValueError(f"seed {s} out of range: seeds must lie in [0, {MAX_SEED}]")
        out.append(s)
    if not out:
        raise ValueError("no seeds given")
    return out


def split_batches(seeds: Sequence[int], batch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches: the seeds cut into ``world_size * ceil(len / (batch * world_size))`` nearly
    equal consecutive chunks, dealt round-robin to the ranks (so every rank has the same number of
    batches, each at most ``batch`` seeds)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    seeds = list(seeds)
    num = max(math.ceil(len(seeds) / (batch * world_size)), 1) * world_size
    q, r = divmod(len(seeds), num)
    chunks, start = [], 0
    for i in range(num):
        size = q + (1 if i < r else 0)
        chunks.append(seeds[start:start + size])
        start += size
    return chunks[rank::world_size]


def make_guidance(gnet, guidance: float, interval: tuple[float, float] | None) -> Guidance | None:
    """The official semantics: ``guidance == 1`` is unguided; otherwise autoguidance by ``gnet`` (CFG
    when ``gnet`` is unconditional), optionally limited to the sigma interval ``(lo, hi]``."""
    if guidance == 1:
        return None
    if gnet is None:
        raise ValueError(f"guidance={guidance} needs a guiding network (--gnet); guidance=1 means no guidance")
    g: Guidance = Autoguidance(guidance, gnet)
    if interval is not None:
        g = Interval(g, sigma=interval)
    return g


def generate_images(net, seeds: Sequence[int], guidance: Guidance | None = None, sampler: str = "heun",
                    steps: int = 32, class_idx: int | None = None, batch: int = 32, device=None,
                    dtype: torch.dtype = torch.float32, rank: int | None = None, world_size: int | None = None,
                    decoder: Callable | None = None, on_nonfinite: Callable[[list[int]], None] | None = None,
                    generator_device=None, **sample_kwargs) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yields ``(batch_seeds, images)`` with ``images`` uint8 ``[n, C, H, W]`` on the CPU.

    ``net`` is Precond-like: ``net(x, sigma, class_labels)`` with attributes ``img_resolution``,
    ``img_channels``, ``label_dim``. ``guidance``: any guidance object (None: unguided); the official
    tool's ``gnet`` / ``guidance`` / ``interval`` are :func:`make_guidance`'s. ``class_idx`` fixes the
    class (else a random class per seed). Under ``torch.distributed`` (or with explicit
    ``rank``/``world_size``) only this rank's share of the seeds is generated. ``generator_device``: where the
    per-seed generators live (default: ``device``; see the module docstring). ``decoder`` turns the
    sampler's output into uint8 images (e.g. a VAE for latent networks); default: pixels in [-1, 1].
    Remaining keyword arguments go to :func:`fastdiff.sampling.sample` (``S_churn``, ``sigma_min``...).

    A sample holding NaN or Inf (a diverged network) would come out as a black image: the seeds of each batch's
    such samples go to ``on_nonfinite(seeds)`` (default: a ``RuntimeWarning`` naming them); the images are
    still yielded.
    """
    seeds = check_seeds(seeds)
    check_churn_options(**{k: sample_kwargs[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in sample_kwargs})
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    for attr in ("img_resolution", "img_channels", "label_dim"):
        if not hasattr(net, attr):
            raise ValueError(f"net must be Precond-like with attribute {attr!r}")
    label_dim = int(net.label_dim or 0)
    if class_idx is not None:
        if label_dim == 0:
            raise ValueError("class_idx given but the network is unconditional (label_dim = 0)")
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(
                f"class {class_idx} out of range: the network has {label_dim} classes [0, {label_dim - 1}]"
            )
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a fastdiff.sampling.guidance.Guidance object or None, got "
                        f"{type(guidance).__name__}; the official gnet / weight / interval: make_guidance(gnet, w, "
                        f"interval)")
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    if device is None:
        device = next((p.device for p in getattr(net, "parameters", lambda: iter(()))()), torch.device("cpu"))
    device = torch.device(device)
    gen_device = device if generator_device is None else torch.device(generator_device)
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))

    for batch_seeds in split_batches(seeds, batch, rank, world_size):
        if not batch_seeds:
            continue
        gens, noise, classes = rng.seed_inputs(batch_seeds, shape, label_dim, class_idx, device=gen_device)
        noise = noise.to(device)
        labels = None
        if label_dim:  # one-hot by a scatter: no host read of the drawn classes
            index = classes.to(device).reshape(-1, 1)
            labels = torch.zeros(len(gens), label_dim, dtype=torch.float32, device=device).scatter_(1, index, 1.0)
        x = sample(net, noise, sampler=sampler, steps=steps, guidance=guidance, labels=labels, generators=gens,
                   dtype=dtype, **sample_kwargs)
        bad = nonfinite_rows(x)
        if bool(bad.any()):
            bad_seeds = [s for s, b in zip(batch_seeds, bad.tolist()) if b]
            if on_nonfinite is not None:
                on_nonfinite(bad_seeds)
            else:
                warnings.warn(f"{len(bad_seeds)} sample(s) hold NaN or Inf (seeds {_seed_list(bad_seeds)}): the network "
                              f"diverged; their images are meaningless", RuntimeWarning, stacklevel=2)
        images = decoder(x) if decoder is not None else to_uint8(x)
        yield batch_seeds, images.cpu()


def _seed_list(seeds: Sequence[int], limit: int = 20) -> str:
    head = ", ".join(str(s) for s in seeds[:limit])
    return head + (f" and {len(seeds) - limit} more" if len(seeds) > limit else "")
