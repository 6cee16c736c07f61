"""Expert denoisers work: two experts fine-tuned from a tiny base network (branched from a shared model, as
eDiff-I does), one for sigma in (0, 1] and one for (1, inf), sample better than the base at equal sampling
cost (the same Heun sampler and steps, one network evaluation per step either way), and better than the base
fine-tuned on the full noise range for as many images as the two experts together.

The quality measure is cheap: the Frechet distance between 1024 samples and the 512 training images in pixel
space (8x8x3 = 192 features), with the same seeds for every model. The numbers are in BENCHMARKS.md
("Expert denoisers"); run with ``-s`` to print them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _standin import StandinPrecond
from fastdiff.data import open_dataset, to_model_input
from fastdiff.diffusion import EDM2Loss
from fastdiff.metrics import frechet_distance
from fastdiff.sampling import Experts, sample
from fastdiff.training import TrainConfig, training_loop
from fastdiff.training.experts import TruncatedEDM2Loss, load_init_weights
from fastdiff.training.snapshots import save_snapshot

BASE_IMAGES, EXPERT_IMAGES, SPLIT, STEPS, SAMPLES = 16384, 4096, 1.0, 8, 1024
P_MEAN, P_STD = -0.8, 1.6


def _net():
    return StandinPrecond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16)


def _cfg(duration):
    return TrainConfig(batch=32, duration=duration, status=1 << 30, snapshot=-1, checkpoint=-1, lr=0.01, lr_decay=0,
                       rampup_mimg=0, ema_stds=(), seed=1, workers=0, progress=False, cond=False)


@pytest.mark.slow
def test_two_experts_from_a_tiny_base_beat_it_at_equal_sampling_cost(tmp_path, one_thread):
    ds = open_dataset("builtin:shapes?n=512&seed=1", resolution=8, channels=3, use_labels=False)
    torch.manual_seed(0)
    base = _net()
    training_loop(base, EDM2Loss(P_MEAN, P_STD, 0.5), ds, str(tmp_path / "base"), _cfg(BASE_IMAGES))
    save_snapshot(base, tmp_path / "base.safetensors", {"kind": "base"})

    def fine_tune(name, loss, images):  # what `fastdiff train --init base.safetensors [--sigma-range]` does
        net = _net()
        load_init_weights(net, tmp_path / "base.safetensors")
        training_loop(net, loss, ds, str(tmp_path / name), _cfg(images))
        return net.eval().requires_grad_(False)

    low = fine_tune("low", TruncatedEDM2Loss(P_MEAN, P_STD, 0.5, (0.0, SPLIT)), EXPERT_IMAGES)
    high = fine_tune("high", TruncatedEDM2Loss(P_MEAN, P_STD, 0.5, (SPLIT, math.inf)), EXPERT_IMAGES)
    longer = fine_tune("longer", EDM2Loss(P_MEAN, P_STD, 0.5), 2 * EXPERT_IMAGES)
    base.eval().requires_grad_(False)
    experts = Experts([(0.0, SPLIT, low), (SPLIT, math.inf, high)])

    real = torch.stack([to_model_input(ds[i][0]) for i in range(len(ds))]).reshape(len(ds), -1).double().numpy()
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    noise = torch.randn(SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    calls = {}

    def fd(name, net):
        count = [0]

        def counted(x, s, labels=None):
            count[0] += 1
            return net(x, s, labels)

        counted.img_resolution, counted.img_channels, counted.label_dim = 8, 3, 0
        with torch.no_grad():
            x = sample(counted, noise, sampler="heun", steps=STEPS)
        calls[name] = count[0]
        f = x.clamp(-1, 1).reshape(SAMPLES, -1).double().numpy()
        return frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, sigma)

    scores = {name: fd(name, net) for name, net in
              (("base", base), ("base fine-tuned, full range", longer), ("two experts", experts))}
    print("\nFD (pixels, 1024 samples, Heun 8 steps):", {k: round(v, 3) for k, v in scores.items()})
    assert len(set(calls.values())) == 1 and calls["base"] == 2 * STEPS - 1  # equal sampling cost
    assert scores["two experts"] < scores["base"]
    assert scores["two experts"] < scores["base fine-tuned, full range"]
