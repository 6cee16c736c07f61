"""Training statistics: the JSONL log, console lines, optional TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

__all__ = ["StatsLog", "memory_gib"]


def memory_gib(device: torch.device) -> dict:
    """Peak memory: GPU allocated / reserved (this process, since the last reset) or the CPU's peak RSS."""
    if device.type == "cuda":
        out = {"gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cpu_peak_rss_gib": rss_kib / 2**20}


class StatsLog:
    """Appends one JSON object per status interval to ``<outdir>/stats.jsonl``; mirrors scalars to TensorBoard
    when asked and installed."""

    def __init__(self, outdir: str, tensorboard: bool = False, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(outdir, "stats.jsonl")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(outdir)
            except Exception as exc:  # tensorboard not installed
                print(f"fastdiff train: TensorBoard disabled ({exc})", file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = dict(record, timestamp=time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("nimg", 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("nimg", "timestamp"):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
