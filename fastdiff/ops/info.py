"""``fastdiff info``: which kernels are compiled, and a quick check of each against its reference."""

from __future__ import annotations

import torch

from fastdiff import __version__, ops
from fastdiff.ops import _ext, reference


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="device to self-check on (default: cpu)")


def _checks(device: str):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, b, c = rnd(2, 16, 9, 9), rnd(2, 8, 9, 9), rnd(2, 16)
    w, gain = rnd(24, 16, 3, 3), torch.tensor(1.5, device=device)
    yield "weight_norm", ops.weight_norm(w), reference.weight_norm(w)
    yield "mp_conv", ops.mp_conv(x, w, gain), reference.mp_conv(x, w, gain)
    yield "mp_silu", ops.mp_silu(x), reference.mp_silu(x)
    yield "mp_sum", ops.mp_sum(x, x.flip(0), 0.3), reference.mp_sum(x, x.flip(0), 0.3)
    yield "mp_cat", ops.mp_cat(x, b, t=0.5), reference.mp_cat(x, b, t=0.5)
    yield "pixel_norm", ops.pixel_norm(x), reference.pixel_norm(x)
    yield "mp_silu_modulate", ops.mp_silu_modulate(x, c), reference.mp_silu_modulate(x, c)
    yield "clip", ops.clip(x * 300), reference.clip(x * 300)


def main(args) -> int:
    print(f"fastdiff {__version__}, torch {torch.__version__}")
    if not _ext.LOADED:
        print(f"compiled extension: NOT LOADED ({_ext.LOAD_ERROR}); using the reference ops")
    else:
        print("compiled extension: loaded")
        print("CPU instruction set per kernel family: " + ", ".join(f"{k}: {v}" for k, v in _ext.isa().items()))
        for op, devices in _ext.kernels().items():
            print(f"  {op:28s} {', '.join(devices) or 'composite'}")
    worst = 0.0
    print(f"self-check on {args.device} (fused vs reference, float32):")
    for name, got, want in _checks(args.device):
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        worst = max(worst, err)
        print(f"  {name:20s} max rel. error {err:.2e}  [{'kernel' if ops.HAS_EXTENSION else 'reference'}]")
    ok = worst < 1e-4
    print("OK" if ok else "FAILED: a kernel disagrees with its reference")
    return 0 if ok else 1
