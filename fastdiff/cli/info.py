"""``fastdiff info``: which kernels are compiled, and a check of every public op against its reference.

The check runs each public op of ``fastdiff.ops`` on a small float32 input, fused vs the plain-PyTorch
reference (``fastdiff.ops.reference``): the forward of every op, and the gradients of every op that has a
backward kernel. The internal helpers (``weight_norm_scale``, ``scale_rows``, ``scale_channels_``) run inside
them. ``mp_conv`` and ``mp_weight`` are composites (ATen's convolution on a weight the fused kernels normalize).
"""

from __future__ import annotations

import torch

from fastdiff import __version__, ops
from fastdiff.ops import _ext, reference


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="device to self-check on (default: cpu)")


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
    print(f"fastdiff {__version__}, torch {torch.__version__}")
    if not _ext.LOADED:
        print(f"compiled extension: NOT LOADED ({_ext.LOAD_ERROR}); using the reference ops")
    else:
        print("compiled extension: loaded")
        for op, devices in _ext.kernels().items():
            print(f"  {op:28s} {', '.join(devices) or 'composite'}")
    worst = 0.0
    print(f"self-check on {args.device} (every public op, fused vs reference, float32):")
    for name, got, want in [*_forward_checks(args.device), *_backward_checks(args.device)]:
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        worst = max(worst, err)
        print(f"  {name:24s} max rel. error {err:.2e}  [{'kernel' if ops.HAS_EXTENSION else 'reference'}]")
    ok = worst < 1e-4
    print("OK" if ok else "FAILED: a kernel disagrees with its reference")
    return 0 if ok else 1
