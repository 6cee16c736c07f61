"""An infinite, seeded, resumable sampler that splits each global batch across ranks.

The data order is one global stream: epoch ``e`` visits the dataset in the permutation drawn from
``seed`` and ``e``; global item ``g`` is ``perm_{g // n}[g % n]``. Training step ``s`` consumes global items
``[s B, (s+1) B)``; rank ``r`` of ``W`` takes the slice ``[s B + r B/W, s B + (r+1) B/W)`` and splits it
into its accumulation rounds in order. So the data a step sees depends on neither the number of processes
nor the accumulation, and resuming at image ``nimg`` (a multiple of ``B``) continues the stream exactly.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["InfiniteSampler", "make_loader", "epoch_permutation"]


def epoch_permutation(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED]).permutation(size)


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields this rank's dataset indices forever, starting at global image ``start_nimg``."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_nimg: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("InfiniteSampler: the dataset is empty")
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"InfiniteSampler: batch size {batch_size} is not divisible by {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"InfiniteSampler: rank {rank} outside [0, {world_size})")
        if start_nimg % batch_size:
            raise ValueError(f"InfiniteSampler: start_nimg {start_nimg} is not a multiple of the batch {batch_size}")
        self.size, self.batch_size, self.rank, self.world_size = int(size), int(batch_size), int(rank), int(world_size)
        self.seed, self.start_nimg, self.shuffle = int(seed), int(start_nimg), bool(shuffle)

    def state_dict(self, cur_nimg: int) -> dict:
        """What resuming at ``cur_nimg`` needs (the sampler itself does not know how far the loop got)."""
        return dict(seed=self.seed, position=int(cur_nimg), size=self.size, shuffle=self.shuffle)

    def global_index(self, g: int) -> int:
        return int(epoch_permutation(self.size, self.seed, g // self.size, self.shuffle)[g % self.size])

    def __iter__(self):
        per_rank = self.batch_size // self.world_size
        step = self.start_nimg // self.batch_size
        epoch, perm = None, None
        while True:
            base = step * self.batch_size + self.rank * per_rank
            for g in range(base, base + per_rank):
                e = g // self.size
                if e != epoch:
                    epoch, perm = e, epoch_permutation(self.size, self.seed, e, self.shuffle)
                yield int(perm[g % self.size])
            step += 1


def _worker_init(_worker_id: int) -> None:
    # Data loading must not fight the trainer for the cores.
    torch.set_num_threads(1)


def make_loader(dataset, batch_gpu: int, sampler: InfiniteSampler, workers: int = 2, pin_memory: bool = False,
                prefetch_factor: int = 2):
    """A ``DataLoader`` over ``sampler`` yielding ``(images, labels)`` batches of ``batch_gpu`` items."""
    kwargs = dict(batch_size=int(batch_gpu), sampler=sampler, num_workers=int(workers), pin_memory=pin_memory,
                  drop_last=False)
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False, worker_init_fn=_worker_init)
    return torch.utils.data.DataLoader(dataset, **kwargs)
