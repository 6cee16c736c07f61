"""Every fake kernel of ``torch.ops.fastdiff`` checks its inputs as the real kernel does: a bad input raises
the same kind of error under ``FakeTensorMode`` (what ``torch.compile`` and export trace with) as on the
CPU kernel, and a good one passes. The table covers every op the extension defines."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff import ops
from fastdiff.ops import _ext

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="compiled extension fastdiff._C not built")

f32, f64, i32 = torch.float32, torch.float64, torch.int32


def t(*shape, dtype=f32):
    return torch.ones(shape, dtype=dtype)


def qkv(heads=1, d=64, h=2, w=2, n=1):
    return t(n, 3 * heads * d, h, w)


def u_of(cout, cin):
    """A tensor shaped as ``winograd_weight`` of a ``[cout, cin, 3, 3]`` weight: channels padded to 8, output
    channels in strips of 32."""
    pad = lambda c: -(-c // 8) * 8
    return t(36, -(-pad(cout) // 32), pad(cin), 32)


# op -> (a good argument tuple, [(bad argument tuple, words the error must contain)])
CASES = {
    "weight_norm_scale": ((t(4, 3), 1e-4), [((t(4, 3, dtype=i32), 1e-4), "floating-point"),
                                             ((t(0, 3), 1e-4), "non-empty weight")]),
    "scale_rows": ((t(4, 3), t(4)), [((t(4, 3), t(3)), "coef of shape")]),
    "scale_channels_": ((t(2, 4, 3), t(4)), [((t(2, 4, 3), t(2)), "coef of shape")]),
    "weight_norm_backward": ((t(4, 3), t(4, 3), 1e-4), [((t(4, 2), t(4, 3), 1e-4), "same shape"),
                                                        ((t(4, 3, dtype=f64), t(4, 3), 1e-4), "same dtype")]),
    "weight_norm": ((t(4, 3), 1e-4), [((t(4, 3, dtype=i32), 1e-4), "floating-point")]),
    "weight_norm_": ((t(4, 3), 1e-4), [((t(0, 3), 1e-4), "non-empty weight")]),
    "mp_weight": ((t(4, 3), t(), 1e-4), [((t(4, 3), t(2), 1e-4), "scalar gain")]),
    "mp_conv": ((t(1, 3, 4, 4), t(5, 3, 3, 3), t(), 1e-4), [((t(1, 2, 4, 4), t(5, 3, 3, 3), t(), 1e-4), "expected x of shape"),
                                                            ((t(1, 3, 4, 4), t(5, 3, 2, 2), t(), 1e-4), "odd kernel"),
                                                            ((t(2, 3), t(5, 4), t(), 1e-4), "expected x of shape")]),
    "mp_conv_backward": ((t(1, 5, 4, 4), t(1, 3, 4, 4), t(5, 3, 3, 3), t(), 1e-4, [True, True, True]),
                         [((t(1, 5, 4, 4), t(1, 3, 4, 4), t(5, 3, 3), t(), 1e-4, [True, True, True]), "2-D (linear) or 4-D")]),
    "mp_silu": ((t(2, 3),), [((t(2, 3, dtype=i32),), "floating-point")]),
    "mp_silu_backward": ((t(2, 3), t(2, 3)), [((t(2, 3), t(3, 2)), "same shape")]),
    "mp_sum": ((t(2, 3), t(2, 3), 0.5), [((t(2, 3), t(2, 3, dtype=f64), 0.5), "same dtype"),
                                          ((t(2, 3), t(2, 3), float("nan")), "finite blend weight")]),
    "clip": ((t(2, 3), 1.0), [((t(2, 3), -1.0), "non-negative limit")]),
    "clip_backward": ((t(2, 3), t(2, 3), 1.0), [((t(2, 3), t(2, 4), 1.0), "same shape")]),
    "pixel_norm": ((t(2, 3, 2), 1e-4), [((t(3), 1e-4), "at least 2 dims")]),
    "pixel_norm_backward": ((t(2, 3, 2), t(2, 3, 2), 1e-4), [((t(2, 3, 1), t(2, 3, 2), 1e-4), "same shape")]),
    "mp_silu_modulate": ((t(2, 3, 2, 2), t(2, 3)), [((t(2, 3, 2, 2), t(2, 4)), "c of shape")]),
    "mp_silu_modulate_backward": ((t(2, 3, 2, 2), t(2, 3, 2, 2), t(2, 3)),
                                  [((t(2, 3, 2, 2), t(2, 3, 2, 2), t(3, 3)), "c of shape")]),
    "mp_cat": ((t(2, 3, 4), t(2, 5, 4), 0.5), [((t(2, 3, 4), t(2, 5), 0.5), "same rank"),
                                               ((t(2, 3, 4), t(2, 5, 3), 0.5), "every dim but 1")]),
    "cosine_attention": ((qkv(), 1), [((qkv(d=32), 1), "64 channels per head"), ((qkv(), 0), "num_heads >= 1")]),
    "cosine_attention_backward": ((t(1, 64, 2, 2), qkv(), t(1, 64, 2, 2), t(1, 1, 4), 1),
                                  [((t(1, 64, 2, 2), qkv(), t(1, 64, 2, 2), t(1, 1, 4, dtype=f64), 1), "lse of dtype"),
                                   ((t(1, 64, 2, 2), qkv(), t(1, 64, 2, 2), t(1, 1, 3), 1), "lse of shape")]),
    "attention_qkv_norm": ((t(1, 12, 2, 2), 2, 1e-4), [((t(1, 10, 2, 2), 1, 1e-4), "multiple of 3"),
                                                        ((t(1, 12, 4), 1, 1e-4), "[N, 3C, H, W]")]),
    "attention_qkv_norm_backward": ((t(1, 1, 4, 4), t(1, 1, 4, 4), t(1, 1, 4, 4), t(1, 12, 2, 2), 1, 1e-4),
                                    [((t(1, 1, 4, 4), t(1, 1, 4, 3), t(1, 1, 4, 4), t(1, 12, 2, 2), 1, 1e-4), "shape")]),
    "mp_sum_clip": ((t(2, 4), t(2, 4), 0.5, 1.0), [((t(2, 4), t(2, 3), 0.5, 1.0), "same shape"),
                                                    ((t(2, 4), t(2, 4), 0.5, float("nan")), "NaN")]),
    "mp_sum_clip_silu": ((t(2, 4), t(2, 4), 0.5, 1.0), [((t(2, 4, dtype=i32), t(2, 4, dtype=i32), 0.5, 1.0), "floating")]),
    "mp_sum_clip_backward": ((t(2, 4), None, t(2, 4), t(2, 4), 0.5, 1.0),
                             [((t(2, 3), None, t(2, 4), t(2, 4), 0.5, 1.0), "same shape")]),
    "solver_step": ((t(2, 3), t(2, 3), None, t(2), t(2), t(2), None, None),
                    [((t(2, 3), t(2, 3), None, t(2), t(3), t(2), None, None), "one value per sample"),
                     ((t(2, 3), t(2, 3), None, t(2), t(2), t(2), t(2, 3), None), "go together")]),
    "winograd_weight": ((t(8, 8, 3, 3),), [((t(8, 8, 1, 1),), "3x3 weight"), ((t(8, 8, 3, 3, dtype=torch.float16),), "float32 or float64")]),
    "winograd_weight_tile": ((t(8, 8, 3, 3), 2), [((t(8, 8, 3, 3), 4), "tile 2 or 6"), ((t(8, 8, 1, 1), 6), "3x3 weight")]),
    "winograd_conv": ((t(1, 8, 4, 4), u_of(8, 8), t(8)), [((t(1, 12, 4, 4), u_of(8, 8), t(8)), "expected u"),
                                                          ((t(1, 8, 4, 4), u_of(8, 8), t(8, 1)), "scale of shape")]),
    "winograd_weight_grad": ((t(1, 8, 4, 4), t(1, 8, 4, 4)), [((t(1, 8, 4, 4), t(1, 8, 4, 3)), "grad [N, C_out, H, W]")]),
    "conv1x1": ((t(1, 8, 4, 4), t(8, 8)), [((t(1, 8, 4, 4), t(8, 4)), "expected w of shape")]),
    "mp_conv_winograd": ((t(1, 8, 4, 4), t(8, 8, 3, 3), t(), 1e-4), [((t(1, 8, 4, 4), t(8, 8, 1, 1), t(), 1e-4), "3x3")]),
}


def _fake(args, mode):
    return tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def test_every_op_has_a_case():
    defined = {op for op, _ in _ext.KERNELS if not op.startswith("_")}
    assert defined == set(CASES), (defined - set(CASES), set(CASES) - defined)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_checks_inputs_like_the_kernel(name):
    op = getattr(torch.ops.fastdiff, name).default
    good, bad = CASES[name]
    with FakeTensorMode() as mode:
        op(*_fake(good, mode))  # a good input passes the fake's checks
    for args, words in bad:
        with pytest.raises(RuntimeError, match=f"fastdiff\\.{name}: .*{re.escape(words)}"), FakeTensorMode() as mode:
            op(*_fake(args, mode))
        with pytest.raises(RuntimeError):  # the CPU kernel rejects it too
            op(*args)
