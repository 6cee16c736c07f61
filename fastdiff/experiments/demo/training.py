"""The demo's networks: built from a preset with overrides, trained (or resumed) with fastdiff's training
loop, timed in wall and CPU seconds.
"""

from __future__ import annotations

import os
import time

import torch

from fastdiff.experiments.demo.options import parse_preset

__all__ = ["Clock", "build_net", "train_network"]


def build_net(spec: str, channels: int, label_dim: int):
    import fastdiff.nn as fnn

    name, overrides = parse_preset(spec)
    preset = fnn.get_preset(name)
    kwargs = dict(overrides, img_channels=channels, label_dim=label_dim, use_fp16=False)
    net = fnn.build(name, **kwargs)
    net.preset = spec
    return net, dict(preset.get("training") or {})


class Clock:
    """Wall and CPU seconds (this process and its children) and the load average over a step."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), _cpu(), _load_average()

    def done(self) -> dict:
        return dict(wall_s=round(time.perf_counter() - self.wall, 2), cpu_s=round(_cpu() - self.cpu, 2),
                    load_start=self.load, load_end=_load_average())


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def train_network(spec: str, dataset, rundir: str, *, kimg: float, batch: int, label_dropout: float, seed: int, device,
           progress: bool) -> dict:
    """Train (or resume) one network with fastdiff.training's loop, writing EMA snapshots (stds 0.05 and
    0.10, 8 times over the run) for post-hoc EMA; returns its info."""
    from fastdiff.diffusion import EDM2Loss
    from fastdiff.training.loop import TrainConfig, training_loop
    import fastdiff.nn as fnn

    torch.manual_seed(seed)
    net, training = build_net(spec, dataset.num_channels, dataset.label_dim)
    steps = max(int(round(kimg * 1000 / batch)), 1)
    duration = steps * batch
    loss = EDM2Loss(P_mean=training.get("P_mean", -0.8), P_std=training.get("P_std", 1.6),
                    sigma_data=getattr(net, "sigma_data", 0.5))
    cfg = TrainConfig(
        batch=batch, duration=duration, status=max(steps // 8, 1) * batch, snapshot=max(steps // 8, 1) * batch,
        checkpoint=0, lr=float(training.get("lr", 0.01)), lr_decay=float(training.get("lr_decay", 2000)),
        rampup_mimg=duration / 10 / 1e6, ema_stds=(0.05, 0.10), seed=seed, cond=True,
        label_dropout=label_dropout, workers=0, progress=progress, resume=True,
        extra=dict(preset=spec, data=dataset.name, demo=True),
    )
    clock = Clock()
    try:
        result = training_loop(net, loss, dataset, rundir, cfg, device=device)
    except (RuntimeError, KeyError) as exc:
        if not os.path.isdir(rundir) or not any(f.startswith("training-state") for f in os.listdir(rundir)):
            raise
        raise ValueError(f"{rundir} holds a training run this one cannot resume (other --preset or --batch?): "
                         f"{exc}. Use another --outdir, or delete {rundir}") from exc
    return dict(preset=spec, params=fnn.count_parameters(net), kimg=duration / 1000, batch=batch, steps=steps,
                label_dropout=label_dropout, time=clock.done(), resumed_from=result["resumed_from"], rundir=rundir)
