"""The EDM2 network: fastdiff.nn vs a plain-PyTorch implementation of the EDM2 formulas
(fastdiff/bench/plain_edm2.py, which
normalizes every weight on every call, like the official code), side by side in one run.

Cases: eval forward (``torch.no_grad``) at batch 1 and 8 on ``small-32`` and at batch 1 on ``edm2-img64-xs``;
a training step (forced weight normalization + forward + backward of the EDM2-style loss) at batch 8 on
``small-32``. Both implementations get the same weights and inputs.

Run: PYTHONPATH=. pytest benchmarks/bench_network.py --benchmark-enable --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=min,median,mean
Threads: ``FASTDIFF_BENCH_THREADS`` (default 1: on a small shared machine one thread per process is the
most repeatable; set it to the core count on a dedicated machine).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdiff import nn as fnn
from fastdiff.bench import plain_edm2 as plain

torch.set_num_threads(int(os.environ.get("FASTDIFF_BENCH_THREADS", "1")))

IMPLS = ["fastdiff", "plain"]
_NETS: dict = {}


def _net(preset: str):
    if preset not in _NETS:
        torch.manual_seed(0)
        net = fnn.build(preset)
        with torch.no_grad():  # non-zero gains, so every branch does real work
            for p in net.parameters():
                if p.ndim == 0:
                    p.fill_(1.0)
        _NETS[preset] = net
    return _NETS[preset]


def _inputs(net, batch: int):
    g = torch.Generator().manual_seed(1)
    r, c = net.img_resolution, net.img_channels
    x = torch.randn(batch, c, r, r, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g))
    labels = torch.nn.functional.one_hot(torch.randint(0, net.label_dim, (batch,), generator=g), net.label_dim).float()
    return x, sigma, labels


def _rounds(preset: str, batch: int) -> int:
    return 3 if preset.startswith("edm2") else (10 if batch == 1 else 5)


EVAL_CASES = [("small-32", 1), ("small-32", 8), ("edm2-img64-xs", 1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", EVAL_CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_eval_forward(benchmark, impl, case):
    preset, batch = case
    net = _net(preset).eval()
    x, sigma, labels = _inputs(net, batch)
    if impl == "fastdiff":
        fn = lambda: net(x, sigma, labels)  # noqa: E731
    else:
        ref = plain.PlainEDM2.from_module(dict(net.init_kwargs), net)
        fn = lambda: ref(x, sigma, labels)  # noqa: E731
    benchmark.group = f"eval forward {preset} batch {batch}"
    benchmark.extra_info["impl"] = impl
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=_rounds(preset, batch), warmup_rounds=1)


def _loss(d, u, x):
    return ((d - x).square() / u.exp() + u).mean()


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, impl):
    preset, batch = "small-32", 8
    net = _net(preset)
    x, sigma, labels = _inputs(net, batch)
    if impl == "fastdiff":
        model = net.train()
        params = list(model.parameters())

        def step():
            d, u = model(x, sigma, labels, return_logvar=True)
            _loss(d, u, x).backward()
            for p in params:
                p.grad = None
    else:
        ref = plain.PlainEDM2.from_module(dict(net.init_kwargs), net, training=True, requires_grad=True)
        params = ref.parameters()

        def step():
            d, u = ref(x, sigma, labels, return_logvar=True)
            _loss(d, u, x).backward()
            for p in params:
                p.grad = None

    benchmark.group = f"training step {preset} batch {batch}"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    net.eval()
