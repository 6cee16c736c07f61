"""torch.distributed start-up for ``torchrun`` (NCCL on GPUs, gloo on the CPU), this process's rank and
world size, and the one check of a device name, for every command and the library alike.

    torchrun --standalone --nproc_per_node 8 -m fastdiff.cli.train --preset edm2-img512-s ...

A process started without torchrun's environment (``WORLD_SIZE`` unset or 1) runs alone.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "rank", "world_size", "rank_and_world", "barrier",
           "all_reduce_sum", "resolve_device"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``None`` / ``'auto'``: CUDA when available, else the CPU; ``'cuda'`` picks this process's GPU.

    A ValueError says what is wrong with a device that cannot be used here (a malformed name, CUDA asked
    for on a machine without it, a GPU index beyond the GPUs present)."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"not a device name: {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise ValueError(f"no CUDA GPU is available on this machine (torch {torch.__version__}, {build}); "
                             "use cpu")
        count = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", local_rank % count)
        elif dev.index >= count:
            raise ValueError(f"this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type not in ("cpu", "meta"):
        backend = getattr(torch, dev.type, None)  # torch.mps, torch.xpu, ...
        if not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"no {dev.type} device is available on this machine")
    return dev


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        if dist.is_available() and dist.is_initialized():
            return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
        here = True
    else:
        here = False
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, here)


def shutdown_distributed(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        # Objects that hold the group (a DistributedDataParallel reducer caught in a reference cycle) go first:
        # one left to the interpreter's exit outlives the group, and a gloo rank once aborted there in CI
        # ("terminate called without an active exception", after its last checkpoint).
        gc.collect()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def world_size() -> int:
    return rank_and_world()[1]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
