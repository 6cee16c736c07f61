"""The batched solver step: ``fastdiff.ops.solver_step`` (fused kernel) and the fake kernel of
``fastdiff::solver_step``; its plain-PyTorch oracle is ``reference.solver_step_reference``.

One sampler step for a whole batch, with per-sample noise levels (see the schema comment in
``csrc/ops.cpp``). Per sample ``n``::

    D      = d0 + w (d1 - d0)                 (D = d1 without a guiding output d0)
    Euler: d = (x - D) / sigma_cur;  x_next = x + (sigma_next - sigma_cur) d
    Heun correction (d_prev and x_base given; x is the Euler result at sigma_next):
           d = (x - D) / sigma_next; x_next = x_base + (sigma_next - sigma_cur) (d_prev/2 + d/2)

and returns ``(x_next, d, D)``. Arithmetic is in float32 (float64 for float64 images) whatever the
storage dtype. The step is not differentiable: sampling runs under ``torch.no_grad()``, and calling it
with inputs that require grad while grad mode is on raises an error (use ``solver_step_reference``,
plain differentiable PyTorch, to backpropagate through a sampler).
"""

from __future__ import annotations

import torch

from fastdiff.ops._dispatch import check, check_float, check_same, dense, register, uses_kernel
from fastdiff.ops.reference import per_sample as _per_sample
from fastdiff.ops.reference import solver_step_reference

__all__ = ["solver_step", "solver_step_reference"]


def _check_no_grad(*tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            "fastdiff.solver_step is not differentiable; call it under torch.no_grad() (samplers do), or use "
            "fastdiff.ops.solver_step_reference to backpropagate through a step"
        )


def solver_step(x, d1, d0=None, w=1.0, sigma_cur=None, sigma_next=None, d_prev=None, x_base=None):
    """Fused guided Euler / Heun-correction step for a batch; returns ``(x_next, d, D)``.

    ``x``, ``d1`` and the optional ``d0``, ``d_prev``, ``x_base`` share one shape ``[N, ...]``;
    ``w``, ``sigma_cur``, ``sigma_next`` are numbers or per-sample ``[N]`` tensors. Runs the compiled
    kernel when one fits (see :func:`fastdiff.ops.uses_kernel`), the reference otherwise.
    """
    if sigma_cur is None or sigma_next is None:
        raise ValueError("fastdiff.solver_step: sigma_cur and sigma_next are required")
    _check_no_grad(x, d1, d0, d_prev, x_base, w, sigma_cur, sigma_next)
    images = [t for t in (x, d1, d0, d_prev, x_base) if t is not None]
    fits = (
        x.ndim >= 1
        and all(
            isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
            for t in images
        )
        and uses_kernel("solver_step", *images)
    )
    if not fits:
        return solver_step_reference(x, d1, d0, w, sigma_cur, sigma_next, d_prev, x_base)
    n = x.shape[0]
    return torch.ops.fastdiff.solver_step(
        x, d1, d0, _per_sample(w, n, x, "w"), _per_sample(sigma_cur, n, x, "sigma_cur"),
        _per_sample(sigma_next, n, x, "sigma_next"), d_prev, x_base,
    )


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """The kernel's output layout: x's own when dense and sample-major, else contiguous."""
    n = x.shape[0]
    m = x.numel() // n if n else 0
    if x.numel() == 0 or (dense(x) and (n <= 1 or x.stride(0) == m)):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _check(x, d1, d0, w, sigma_cur, sigma_next, d_prev, x_base) -> None:
    op = "solver_step"
    check_float(op, x=x, d1=d1)
    check(x.ndim >= 1, op, "expected x of shape [N, ...], got a 0-d tensor")
    check_same(op, "x", x, "d1", d1)
    check((d_prev is None) == (x_base is None), op, "'d_prev' and 'x_base' go together (a Heun correction needs both)")
    for name, t in (("d0", d0), ("d_prev", d_prev), ("x_base", x_base)):
        if t is not None:
            check_same(op, "x", x, name, t)
    n = x.shape[0]
    for name, t in (("w", w), ("sigma_cur", sigma_cur), ("sigma_next", sigma_next)):
        check_float(op, **{name: t})
        check(t.ndim == 1 and t.shape[0] == n, op,
              f"expected '{name}' of shape [N] = [{n}] (one value per sample), got {tuple(t.shape)}")
        check(t.device == x.device, op, f"expected '{name}' on {x.device} like x, got {t.device}")


@register("solver_step")
def _register() -> None:
    @torch.library.register_fake("fastdiff::solver_step")
    def _(x, d1, d0, w, sigma_cur, sigma_next, d_prev=None, x_base=None):
        _check(x, d1, d0, w, sigma_cur, sigma_next, d_prev, x_base)
        return _out_like(x), _out_like(x), _out_like(x)
