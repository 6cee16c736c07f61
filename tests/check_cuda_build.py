"""Checks that a CUDA build of fastdiff registered a CUDA kernel for every op that has a CPU kernel.

Run after building the extension with CUDA (no GPU needed: it only asks the dispatcher):

    python tests/check_cuda_build.py

Prints the op table and exits 0 when every op with a CPU kernel also has a CUDA kernel, 1 otherwise
(also when the extension is missing or torch has no CUDA). The Winograd convolution ops are CPU-only by
design (on CUDA, fastdiff.ops routes 3x3 convolutions to cuDNN), so they are listed, not required.
"""

from __future__ import annotations

import os
import sys

import torch

try:  # run from a source checkout without installing: use the checkout's package
    import fastdiff  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# CPU-only by design: the Winograd MP convolution (fastdiff.ops.conv_path picks ATen / cuDNN on CUDA).
CPU_ONLY = {"winograd_weight", "winograd_weight_tile", "winograd_conv", "mp_conv_winograd", "winograd_weight_grad", "conv1x1"}
# The GPU route's own ops (issue 23): named here too, so a build that lost them fails even if their CPU
# kernels went missing as well.
GPU_ROUTE = {"mp_sum_clip", "mp_sum_clip_silu", "mp_sum_clip_backward", "attention_qkv_norm",
             "attention_qkv_norm_backward", "mp_silu_modulate", "mp_silu_modulate_backward", "cosine_attention"}


def main() -> int:
    import fastdiff  # noqa: F401
    from fastdiff import ops
    from fastdiff.ops import _ext

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU available: {torch.cuda.is_available()}")
    if not ops.HAS_EXTENSION:
        print(f"FAILED: the extension fastdiff._C is not loaded ({_ext.LOAD_ERROR})")
        return 1
    if torch.version.cuda is None:
        print("FAILED: this torch has no CUDA, so no CUDA kernels can be registered")
        return 1
    table = ops.kernels()
    missing = []
    print(f"{'op':30s} {'CPU':5s} {'CUDA':5s}")
    for op, devices in sorted(table.items()):
        cpu, cuda = "cpu" in devices, "cuda" in devices
        flag = ""
        if cpu and not cuda and op in CPU_ONLY:
            flag = "  (CPU only by design)"
        elif cpu and not cuda:
            missing.append(op)
            flag = "  <- missing CUDA kernel"
        elif not cpu and not cuda:
            flag = "  (composite / none)"
        print(f"{op:30s} {'yes' if cpu else '-':5s} {'yes' if cuda else '-':5s}{flag}")
    missing += sorted(op for op in GPU_ROUTE if "cuda" not in table.get(op, []) and op not in missing)
    if missing:
        print(f"FAILED: {len(missing)} op(s) with a CPU kernel but no CUDA kernel: {', '.join(missing)}")
        return 1
    print(f"OK: every op with a CPU kernel has a CUDA kernel ({sum('cuda' in d for d in table.values())} CUDA kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
