"""The networks of a sweep: a std (or None) resolved to a loaded network, reconstructed by post-hoc EMA from
a training run's snapshots (once per std, written next to the results) or the one file given.
"""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["Networks"]


class Networks:
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
