"""The batched solver step: ``fastdiff.ops.solver_step`` (fused kernel) and its plain-PyTorch reference.

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

from fastdiff.ops import _ext
from fastdiff.ops.reference import acc_dtype as _acc
from fastdiff.ops._register import _dense

__all__ = ["solver_step", "solver_step_reference"]

_OP = "fastdiff::solver_step"


def _per_sample(v, n: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """A python number, 0-d or [N] tensor -> [N] tensor in the accumulation dtype on ``like``'s device."""
    acc = _acc(like.dtype)
    if isinstance(v, torch.Tensor):
        if v.ndim == 0 or (v.ndim == 1 and v.numel() == 1):
            return v.reshape(()).to(device=like.device, dtype=acc).expand(n).contiguous()
        if v.ndim != 1 or v.shape[0] != n:
            raise ValueError(
                f"fastdiff.solver_step: expected '{name}' as a number or a tensor of shape [N] = [{n}], "
                f"got {tuple(v.shape)}"
            )
        return v.to(device=like.device, dtype=acc)
    return torch.full((n,), float(v), dtype=acc, device=like.device)


def solver_step_reference(x, d1, d0=None, w=1.0, sigma_cur=None, sigma_next=None, d_prev=None, x_base=None):
    """Plain-PyTorch version of :func:`solver_step` (the oracle of the tests; differentiable)."""
    if sigma_cur is None or sigma_next is None:
        raise ValueError("fastdiff.solver_step: sigma_cur and sigma_next are required")
    if (d_prev is None) != (x_base is None):
        raise ValueError("fastdiff.solver_step: 'd_prev' and 'x_base' go together (a Heun correction needs both)")
    n = x.shape[0]
    acc = _acc(x.dtype)
    shape = (n,) + (1,) * (x.ndim - 1)
    s_cur = _per_sample(sigma_cur, n, x, "sigma_cur").reshape(shape)
    s_next = _per_sample(sigma_next, n, x, "sigma_next").reshape(shape)
    if d0 is None:
        D = d1.to(acc)
    else:
        g = d0.to(acc)
        D = g + _per_sample(w, n, x, "w").reshape(shape) * (d1.to(acc) - g)
    xa = x.to(acc)
    h = s_next - s_cur
    if d_prev is None:
        d = (xa - D) / s_cur
        x_next = xa + h * d
    else:
        d = (xa - D) / s_next
        x_next = x_base.to(acc) + h * (0.5 * d_prev.to(acc) + 0.5 * d)
    return x_next.to(x.dtype), d.to(x.dtype), D.to(x.dtype)


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
    from fastdiff import ops  # the package imports this module at its end

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
        and ops.uses_kernel("solver_step", *images)
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
    if x.numel() == 0 or (_dense(x) and (n <= 1 or x.stride(0) == m)):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _register_fake() -> None:
    if not (_ext.LOADED and torch._C._dispatch_has_kernel(_OP)):
        return

    @torch.library.register_fake(_OP)
    def _(x, d1, d0, w, sigma_cur, sigma_next, d_prev=None, x_base=None):
        return _out_like(x), _out_like(x), _out_like(x)


_register_fake()
