"""fastdiff's fused ops: the public API over ``torch.ops.fastdiff``, one private module per op family.

Each public function runs the compiled kernel when one fits the input (extension built, kernel for the
tensor's device, a float16/bfloat16/float32/float64 dtype) and the plain-PyTorch reference of
``fastdiff.ops.reference`` otherwise, so everything above works the same either way. Kernels are real
torch custom ops with autograd and fake kernels, so autograd, ``torch.compile`` and export see them.
"""

from __future__ import annotations

from fastdiff.ops import reference
from fastdiff.ops._attention import ATTENTION_IMPLS, attention_impl, attention_qkv_norm, cosine_attention
from fastdiff.ops._block import mp_sum_clip
from fastdiff.ops._conv import MPConvWeights, mp_conv, mp_linear
from fastdiff.ops._dispatch import EPS, gpu_route, use_gpu_route, use_reference, uses_kernel
from fastdiff.ops._elementwise import CLIP_LIMIT, clip, mp_cat, mp_silu, mp_silu_modulate, mp_sum, normalize, pixel_norm
from fastdiff.ops._ext import LOAD_ERROR, force_isa, has_kernel, isa, kernels
from fastdiff.ops._ext import LOADED as HAS_EXTENSION
from fastdiff.ops._solver import solver_step
from fastdiff.ops._weight import fan_in, mp_weight, weight_norm, weight_norm_, weight_norm_scale
from fastdiff.ops._winograd import (
    conv1x1,
    conv_epilogue,
    conv_path,
    mp_conv_fused,
    use_aten_conv,
    use_conv_path,
    uses_winograd,
    winograd_weight,
)
from fastdiff.ops.reference import solver_step_reference

__all__ = [
    "HAS_EXTENSION", "LOAD_ERROR", "kernels", "has_kernel", "isa", "force_isa", "use_reference", "uses_kernel", "EPS",
    "CLIP_LIMIT",
    # forced weight normalization and the MP weight (_weight)
    "weight_norm", "weight_norm_", "weight_norm_scale", "mp_weight", "fan_in",
    # MP convolution / linear and one layer's weight caches (_conv)
    "mp_conv", "mp_linear", "MPConvWeights",
    # the CPU convolution kernels, the path choice and the fused block chain (_winograd)
    "mp_conv_fused", "conv_epilogue", "conv1x1", "winograd_weight", "conv_path", "uses_winograd", "use_aten_conv",
    "use_conv_path",
    # the MP elementwise chain (_elementwise)
    "mp_silu", "mp_sum", "mp_cat", "pixel_norm", "mp_silu_modulate", "clip", "normalize",
    # cosine attention (_attention), the block epilogue (_block), the GPU route (_dispatch)
    "cosine_attention", "attention_impl", "attention_qkv_norm", "ATTENTION_IMPLS", "mp_sum_clip", "gpu_route",
    "use_gpu_route",
    # the batched solver step (_solver) and its oracle
    "solver_step", "solver_step_reference",
    "reference",
]
