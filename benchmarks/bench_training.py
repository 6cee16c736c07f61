"""Training throughput (images/s) at batch 32: fastdiff's network and training loop vs a plain-PyTorch EDM2
(``fastdiff/bench/plain_edm2.py``, normalizing every weight on every forward like the official code) in a plain loop.

Both sides do the same work per step: EDM2 loss with learned uncertainty (fresh noise), backward, non-finite
gradients zeroed, Adam (0.9, 0.99, 1e-8), two power-function EMAs (0.05, 0.10). fastdiff runs its real
``training_loop`` (data from an in-memory dataset, no checkpoints or snapshots, no progress bar); each
benchmark call is ``STEPS`` optimizer steps, so the loop's set-up is amortized over them.

    pytest benchmarks/bench_training.py --benchmark-enable --benchmark-only --benchmark-group-by=group \\
        --benchmark-json=train.json && python benchmarks/report.py train.json

img/s = ``images`` / median time (``img_per_s`` in extra_info when timing is enabled).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch


try:
    import fastdiff.nn as fnn
    from fastdiff.diffusion import EDM2Loss

    fnn.build, fnn.get_preset  # noqa: B018
except (ImportError, AttributeError) as exc:  # before branch nn is merged
    pytest.skip(f"bench_training needs fastdiff.nn and fastdiff.diffusion.EDM2Loss ({exc})", allow_module_level=True)
from fastdiff.bench import plain_edm2  # noqa: E402
from fastdiff.bench.suites import PlainTrainer  # noqa: E402
from fastdiff.data import open_dataset, to_model_input  # noqa: E402
from fastdiff.training import TrainConfig, training_loop  # noqa: E402

BATCH = 32
STEPS = int(os.environ.get("FASTDIFF_BENCH_TRAIN_STEPS", "8"))
PRESETS = os.environ.get("FASTDIFF_BENCH_TRAIN_PRESETS", "tiny-16").split(",")
STDS = (0.05, 0.10)


def _dataset(net):
    return open_dataset("builtin:shapes?n=512&seed=0", resolution=net.img_resolution, channels=net.img_channels)


def _fastdiff_runner(preset):
    training = fnn.get_preset(preset)["training"]
    torch.manual_seed(0)
    net = fnn.build(preset, use_fp16=False)
    loss_fn = EDM2Loss(training["P_mean"], training["P_std"])
    ds = _dataset(net)
    outdir = tempfile.mkdtemp(prefix="fastdiff-bench-train-")
    calls = {"n": 0}

    def run():
        # STEPS steps of a fresh loop on the same network (nothing is written: no checkpoints, no snapshots).
        calls["n"] += 1
        cfg = TrainConfig(batch=BATCH, duration=STEPS * BATCH, status=1 << 40, snapshot=-1, checkpoint=-1,
                          lr=training["lr"], lr_decay=training["lr_decay"], rampup_mimg=0, ema_stds=STDS,
                          workers=0, progress=False, resume=False, seed=calls["n"])
        training_loop(net, loss_fn, ds, outdir, cfg)

    return run


def _plain_runner(preset):
    p = fnn.get_preset(preset)
    training, cfg = p["training"], dict(p["network"])
    torch.manual_seed(0)
    module = fnn.build(preset, use_fp16=False)
    net = plain_edm2.PlainEDM2.from_module(cfg, module, training=True, requires_grad=True)
    trainer = PlainTrainer(net, training["lr"], training["P_mean"], training["P_std"], stds=STDS)
    ds = _dataset(module)
    images = to_model_input(torch.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.nn.functional.one_hot(torch.as_tensor(ds.labels), cfg["label_dim"]).float()
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, images.shape[0], (BATCH,), generator=gen)
        trainer.step(images[idx], labels[idx], gen)

    def run():
        for _ in range(STEPS):
            step()

    return run


@pytest.mark.parametrize("impl", ["fastdiff", "plain"])
@pytest.mark.parametrize("preset", PRESETS)
def test_training_throughput(benchmark, preset, impl):
    run = (_fastdiff_runner if impl == "fastdiff" else _plain_runner)(preset)
    run()  # warm-up (allocations, first-touch, kernel caches)
    benchmark.group = f"train step {preset} b{BATCH} x{STEPS}"
    benchmark.extra_info.update(impl=impl, images=STEPS * BATCH)
    benchmark.pedantic(run, rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
        if median and math.isfinite(median):
            benchmark.extra_info["img_per_s"] = round(STEPS * BATCH / median, 2)
