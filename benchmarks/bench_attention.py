"""Fused cosine attention vs the einsum reference vs torch SDPA, side by side, at EDM2-S shapes.

EDM2-S (C=192) runs attention at 16x16 (576 channels = 9 heads) and 8x8 (768 channels = 12 heads); the
64x64 case (HW = 4096) shows the memory win: the reference materializes the HW x HW score matrix per
head, the fused kernel only O(HW * 64) scratch. "sdpa" is torch.nn.functional.scaled_dot_product_attention
on q, k, v after a separate pixel norm (same maths, PyTorch's own fused attention).

    PYTHONPATH=. pytest benchmarks/bench_attention.py --benchmark-enable --benchmark-only \
        --benchmark-columns=min,median,mean --benchmark-group-by=group
    PYTHONPATH=. python benchmarks/bench_attention.py --memory   # peak RSS per implementation
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fastdiff.bench.suites import sdpa_cosine_attention
from fastdiff.ops import reference as R

# (batch, heads, resolution)
FWD_SHAPES = [(1, 9, 16), (32, 9, 16), (1, 12, 8), (32, 12, 8), (1, 2, 64)]
BWD_SHAPES = [(1, 9, 16), (32, 12, 8), (1, 1, 64)]
IMPLS = ["fused", "reference", "sdpa"]


def _id(shape):
    n, h, r = shape
    return f"b{n}-h{h}-{r}x{r}"


def fused(qkv, heads):
    return torch.ops.fastdiff.cosine_attention(qkv, heads)[0]


sdpa = sdpa_cosine_attention


FNS = {"fused": fused, "reference": R.cosine_attention, "sdpa": sdpa}


def make(shape, dtype=torch.float32):
    n, heads, r = shape
    return torch.randn(n, 3 * 64 * heads, r, r, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _rounds(shape):
    n, heads, r = shape
    work = n * heads * (r * r) ** 2
    return 3 if work > 2e8 else 10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=_id)
def test_forward(benchmark, impl, shape):
    benchmark.group = f"attention fwd {_id(shape)}"
    benchmark.extra_info["impl"] = impl
    qkv, fn = make(shape), FNS[impl]
    with torch.no_grad():
        benchmark.pedantic(fn, args=(qkv, shape[1]), rounds=_rounds(shape), warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=_id)
def test_forward_backward(benchmark, impl, shape):
    benchmark.group = f"attention fwd+bwd {_id(shape)}"
    benchmark.extra_info["impl"] = impl
    qkv, fn = make(shape).requires_grad_(True), FNS[impl]
    g = torch.randn(shape[0], 64 * shape[1], shape[2], shape[2])

    def step():
        (gx,) = torch.autograd.grad(fn(qkv, shape[1]), qkv, g)
        return gx

    benchmark.pedantic(step, rounds=_rounds(shape), warmup_rounds=1)


# --- peak memory ---------------------------------------------------------------------------------

_MEM_SCRIPT = """
import os, resource, sys, torch
sys.path.insert(0, {root!r})
import fastdiff
from benchmarks.bench_attention import FNS, make
torch.set_num_threads(1)
shape, impl, backward = {shape!r}, {impl!r}, {backward!r}
qkv = make(shape).requires_grad_(backward)
g = torch.randn(shape[0], 64 * shape[1], shape[2], shape[2]) if backward else None
FNS[impl](make((1, shape[1], 2)), shape[1])  # load and warm up the extension and allocator
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # kB
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
rss0 = status("VmRSS:")
if backward:
    torch.autograd.grad(FNS[impl](qkv, shape[1]), qkv, g)
else:
    with torch.no_grad():
        FNS[impl](qkv, shape[1])
print((status("VmHWM:") - rss0) / 1024)
"""


def peak_mem_mb(shape, impl, backward=False) -> float:
    """Peak RSS growth (MiB) over the resident size just before one call (single-threaded, own process)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_SCRIPT.format(root=root, shape=tuple(shape), impl=impl, backward=backward)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    return float(out.stdout.strip().splitlines()[-1])


def memory_table(shapes=((1, 2, 64), (32, 12, 8), (32, 9, 16))) -> str:
    rows = ["| shape | pass | " + " | ".join(IMPLS) + " |", "|---|---|" + "---|" * len(IMPLS)]
    for shape in shapes:
        for backward in (False, True):
            mem = [peak_mem_mb(shape, impl, backward) for impl in IMPLS]
            rows.append(
                f"| {_id(shape)} | {'fwd+bwd' if backward else 'fwd'} | "
                + " | ".join(f"{m:.0f} MiB" for m in mem)
                + " |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    if "--memory" in sys.argv:
        print("input qkv sizes: " + ", ".join(
            f"{_id(s)} {math.prod(make(s).shape) * 4 / 2**20:.1f} MiB" for s in ((1, 2, 64), (32, 12, 8), (32, 9, 16))
        ))
        print(memory_table())
