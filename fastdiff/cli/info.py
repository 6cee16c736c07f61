"""``fastdiff info``: which kernels are compiled, and a check of every public op against its reference.

The check runs each public op of ``fastdiff.ops`` on a small float32 input, fused vs the plain-PyTorch
reference (``fastdiff.ops.reference``): the forward of every op, and the gradients of every op that has a
backward kernel. The internal helpers (``weight_norm_scale``, ``scale_rows``, ``scale_channels_``) run inside
them. ``mp_conv`` and ``mp_weight`` are composites (ATen's convolution on a weight the fused kernels normalize).
"""

from __future__ import annotations

import torch

from fastdiff import __version__, ops
from fastdiff.ops import reference


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="device to self-check on (default: cpu)")
    parser.add_argument("--preset", default=None,
                        help="comma-separated network presets: print which path (Winograd or ATen) each 3x3 "
                             "convolution shape takes")
    parser.add_argument("--batch", type=int, default=1, help="batch size for --preset (default: 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                        help="activation dtype for --preset (default: float32)")


def conv_paths(preset: str, batch: int = 1, dtype=torch.float32, device="cpu"):
    """``(name, cin, cout, resolution, path, reason)`` for every 3x3 convolution of ``preset``'s network (built
    on the meta device: no memory, no time)."""
    import re

    from fastdiff import nn as fnn

    with torch.device("meta"):
        net = fnn.build(preset)
    unet = net.unet
    rows = []
    for name, m in unet.named_modules():
        if not isinstance(m, fnn.MPConv) or m.kernel != (3, 3):
            continue
        found = re.search(r"(\d+)x\d+", name)
        res = int(found.group(1)) if found else unet.img_resolution
        path, why = ops.conv_path(m.in_channels, m.out_channels, res, res, batch, dtype, device)
        rows.append((name, m.in_channels, m.out_channels, res, path, why))
    return rows


def _print_conv_paths(args) -> None:
    dtype = getattr(torch, args.dtype)
    for preset in args.preset.split(","):
        print(f"3x3 convolutions of {preset} (batch {args.batch}, {args.dtype}, {args.device}, "
              f"{torch.get_num_threads()} threads):")
        seen = {}
        for name, cin, cout, res, path, why in conv_paths(preset.strip(), args.batch, dtype, args.device):
            key = (cin, cout, res)
            if key in seen:
                seen[key][0] += 1
                continue
            seen[key] = [1, name, path, why]
        for (cin, cout, res), (count, name, path, why) in seen.items():
            print(f"  {cin:4d} -> {cout:4d} at {res:3d}x{res:<3d} x{count:<3d} {path:8s} ({why}; e.g. {name})")


def _forward_checks(device: str):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, b, c = rnd(2, 16, 9, 9), rnd(2, 8, 9, 9), rnd(2, 16)
    w, gain = rnd(24, 16, 3, 3), torch.tensor(1.5, device=device)
    lin_x, lin_w = rnd(5, 16), rnd(12, 16)
    qkv = rnd(2, 3 * 64, 4, 5)
    d1, d0, sig_cur, sig_next = rnd(2, 16, 9, 9), rnd(2, 16, 9, 9), torch.tensor([2.0, 0.7], device=device), \
        torch.tensor([1.0, 0.3], device=device)
    yield "weight_norm", ops.weight_norm(w), reference.weight_norm(w)
    yield "weight_norm_", ops.weight_norm_(w.clone()), reference.weight_norm_(w.clone())
    yield "mp_weight", ops.mp_weight(w, gain), reference.mp_weight(w, gain)
    yield "mp_conv", ops.mp_conv(x, w, gain), reference.mp_conv(x, w, gain)
    yield "mp_linear", ops.mp_linear(lin_x, lin_w, gain), reference.mp_linear(lin_x, lin_w, gain)
    yield "mp_silu", ops.mp_silu(x), reference.mp_silu(x)
    yield "mp_sum", ops.mp_sum(x, x.flip(0), 0.3), reference.mp_sum(x, x.flip(0), 0.3)
    yield "mp_cat", ops.mp_cat(x, b, t=0.5), reference.mp_cat(x, b, t=0.5)
    yield "pixel_norm", ops.pixel_norm(x), reference.pixel_norm(x)
    yield "mp_silu_modulate", ops.mp_silu_modulate(x, c), reference.mp_silu_modulate(x, c)
    yield "clip", ops.clip(x * 300), reference.clip(x * 300)
    yield "cosine_attention", ops.cosine_attention(qkv, 1), reference.cosine_attention(qkv, 1)
    fused = ops.solver_step(x, d1, d0, 2.0, sig_cur, sig_next)
    want = ops.solver_step_reference(x, d1, d0, 2.0, sig_cur, sig_next)
    yield "solver_step", torch.cat([t.flatten() for t in fused]), torch.cat([t.flatten() for t in want])


def _backward_checks(device: str):
    """Gradients of ``sum(op(inputs) * probe)`` for the ops with a backward kernel, fused vs reference."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, c, w, qkv = rnd(2, 16, 9, 9), rnd(2, 16), rnd(24, 16, 3, 3), rnd(2, 3 * 64, 4, 5)
    cases = [
        ("weight_norm", lambda f, w: f.weight_norm(w), (w,)),
        ("mp_conv", lambda f, x, w: f.mp_conv(x, w, 1.5), (x, w)),
        ("mp_silu", lambda f, x: f.mp_silu(x), (x,)),
        ("pixel_norm", lambda f, x: f.pixel_norm(x), (x,)),
        ("mp_silu_modulate", lambda f, x, c: f.mp_silu_modulate(x, c), (x, c)),
        ("clip", lambda f, x: f.clip(x * 300), (x,)),
        ("cosine_attention", lambda f, q: f.cosine_attention(q, 1), (qkv,)),
    ]
    for name, fn, inputs in cases:
        grads = []
        for impl in (ops, reference):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            out = fn(impl, *leaves)
            probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
            grads.append(torch.cat([gr.flatten() for gr in torch.autograd.grad((out * probe).sum(), leaves)]))
        yield name + " (grad)", grads[0], grads[1]


def main(args) -> int:
    from fastdiff import _build

    print(f"fastdiff {__version__}, torch {torch.__version__}")
    print(_build.describe())
    if not ops.HAS_EXTENSION:
        print(f"compiled extension: NOT LOADED ({ops.LOAD_ERROR}); using the reference ops")
    else:
        print("compiled extension: loaded")
        print("CPU instruction set per kernel family: " + ", ".join(f"{k}: {v}" for k, v in ops.isa().items()))
        for op, devices in ops.kernels().items():
            print(f"  {op:28s} {', '.join(devices) or 'composite'}")
    if args.preset:
        _print_conv_paths(args)
    worst = 0.0
    print(f"self-check on {args.device} (every public op, fused vs reference, float32):")
    for name, got, want in [*_forward_checks(args.device), *_backward_checks(args.device)]:
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        worst = max(worst, err)
        print(f"  {name:24s} max rel. error {err:.2e}  [{'kernel' if ops.HAS_EXTENSION else 'reference'}]")
    ok = worst < 1e-4
    print("OK" if ok else "FAILED: a kernel disagrees with its reference")
    return 0 if ok else 1
