"""The fused MP ops vs their plain-PyTorch references, side by side, at EDM2-S shapes (img64).

EDM2-S at 64x64 has 192/384/576/768 channels at 64/32/16/8 pixels. Each case runs the fastdiff kernel
and the reference on the same inputs in one session.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import ops
from fastdiff.ops import reference as R

# (batch, channels, resolution) at EDM2-S levels; batch 32 only where it stays affordable on 2 cores.
ACT_SHAPES = [(1, 192, 64), (1, 768, 8), (32, 384, 32), (32, 768, 8)]
IMPLS = ["fastdiff", "reference"]


def _id(shape):
    n, c, r = shape
    return f"b{n}-c{c}-{r}x{r}"


def _run(benchmark, group, impl, fused, ref, *args):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    fn = fused if impl == "fastdiff" else ref
    with torch.no_grad():
        benchmark(fn, *args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_id)
def test_mp_silu_modulate(benchmark, impl, shape):
    n, c, r = shape
    y, e = torch.randn(n, c, r, r), torch.randn(n, c)
    _run(benchmark, f"mp_silu(y*(1+c)) {_id(shape)}", impl, ops.mp_silu_modulate, R.mp_silu_modulate, y, e)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_id)
def test_mp_silu(benchmark, impl, shape):
    n, c, r = shape
    _run(benchmark, f"mp_silu {_id(shape)}", impl, ops.mp_silu, R.mp_silu, torch.randn(n, c, r, r))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_id)
def test_mp_sum_clip(benchmark, impl, shape):
    n, c, r = shape
    a, b = torch.randn(n, c, r, r), torch.randn(n, c, r, r)
    _run(
        benchmark, f"clip(mp_sum(a,b)) {_id(shape)}", impl,
        lambda a, b: ops.clip(ops.mp_sum(a, b, 0.3)), lambda a, b: R.clip(R.mp_sum(a, b, 0.3)), a, b,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=_id)
def test_pixel_norm(benchmark, impl, shape):
    n, c, r = shape
    _run(benchmark, f"pixel_norm {_id(shape)}", impl, ops.pixel_norm, R.pixel_norm, torch.randn(n, c, r, r))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 192, 64), (32, 384, 32)], ids=_id)
def test_mp_cat(benchmark, impl, shape):
    n, c, r = shape
    a, b = torch.randn(n, c, r, r), torch.randn(n, c, r, r)
    _run(benchmark, f"mp_cat {_id(shape)}", impl, ops.mp_cat, R.mp_cat, a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(192, 192, 3, 3), (768, 768, 3, 3), (2304, 768, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_weight_norm_inplace(benchmark, impl, shape):
    w = torch.randn(*shape)
    _run(benchmark, f"weight_norm_ {'x'.join(map(str, shape))}", impl, ops.weight_norm_, R.weight_norm_, w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 192, 64), (1, 768, 8)], ids=_id)
def test_mp_conv_eval_cached(benchmark, impl, shape):
    """Eval mode: fastdiff convolves with a cached effective weight; the reference normalizes per call."""
    n, c, r = shape
    x, w = torch.randn(n, c, r, r), torch.randn(c, c, 3, 3)
    cached = ops.mp_weight(w, 1.0, dtype=x.dtype)
    _run(
        benchmark, f"mp_conv eval 3x3 {_id(shape)}", impl,
        lambda x: torch.nn.functional.conv2d(x, cached, padding=1), lambda x: R.mp_conv(x, w), x,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 768, 8), (32, 192, 16)], ids=_id)
def test_mp_conv_uncached(benchmark, impl, shape):
    """Training-style forward (normalization every call): the fused op vs normalize-then-conv."""
    n, c, r = shape
    x, w = torch.randn(n, c, r, r), torch.randn(c, c, 3, 3)
    _run(benchmark, f"mp_conv 3x3 {_id(shape)}", impl, ops.mp_conv, R.mp_conv, x, w)
