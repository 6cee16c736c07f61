"""Training statistics: the JSONL log, console lines, optional TensorBoard."""

from __future__ import annotations

import json
import os
import sys

try:
    import resource
except ImportError:  # not POSIX (Windows): no peak RSS in the log
    resource = None
import time

import torch

__all__ = ["StatsLog", "memory_gib", "trim_stats"]


def memory_gib(device: torch.device) -> dict:
    """Peak memory: GPU allocated / reserved (this process, since the last reset) or the CPU's peak RSS
    (nothing where the resource module does not exist)."""
    if device.type == "cuda":
        out = {"gpu_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
               "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    if resource is None:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"cpu_peak_rss_gib": peak / (2**30 if sys.platform == "darwin" else 2**20)}


def trim_stats(path: str, nimg: int) -> int:
    """Drop the records a resumed run will write again: those past ``nimg`` (the resumed checkpoint; with
    ``nimg == 0``, a run starting over, all of them) and any line that does not parse (an append cut short by
    a kill). The file is rewritten atomically, and only when something goes. Returns the number of lines
    dropped (0 when the file does not exist)."""
    from fastdiff._atomic import atomic_open

    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
            at = int(rec["nimg"])
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: dropped
        if at < nimg or (at == nimg and nimg > 0):  # a resumed run writes no record at its start point
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    dropped = len(lines) - len(keep)
    if dropped:
        with atomic_open(path, "wb") as f:
            f.writelines(keep)
    return dropped


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
