// Every fastdiff op's schema, in one place. Kernels register themselves per backend in the glue files
// below (m.impl); device-agnostic compositions live in composite.cpp. Autograd and fake (meta) kernels are
// registered from Python (fastdiff/ops).
//
// File names (csrc/cpu and csrc/cuda alike): <family>_cpu.cpp / <family>_cuda.cpp are glue (checks,
// layouts, allocation, threads or streams, m.impl); <family>_kernels.* are the raw loops / kernels on
// plain pointers (.h / .cuh declare them; CPU .inc bodies are compiled per instruction set by
// <family>_<isa>.cpp, see cpu/isa.h). Shared: common.h (checks, channel views, mp_sum/mp_cat weights),
// solver.h, attention_checks.h, block_ops.h; cpu/isa.h (instruction-set tables), cpu/vmath.h (exp, mp_silu),
// cpu/gemm.h (GEMM micro-kernel), cpu/workspace.h (scratch); cuda/launch.h, cuda/dtype.h, cuda/device.cuh.
//
// Op map (tests/test_csrc_layout.py checks it against the m.def / m.impl calls): schema | CPU glue >
// loops (under csrc/cpu/) | CUDA glue > kernels (under csrc/cuda/; '-': none) | Python wrapper
// (fastdiff.ops.<name>).
//   weight_norm_scale           | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | mp_weight
//   scale_rows                  | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_weight
//   scale_channels_             | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_conv
//   weight_norm_backward        | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | weight_norm
//   weight_norm                 | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | weight_norm
//   weight_norm_                | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | weight_norm_
//   mp_weight                   | ../composite.cpp                              | ../composite.cpp                              | mp_weight
//   mp_conv                     | ../composite.cpp                              | ../composite.cpp                              | mp_conv
//   mp_conv_backward            | ../composite.cpp                              | ../composite.cpp                              | mp_conv
//   mp_silu                     | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_silu
//   mp_silu_backward            | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_silu
//   mp_sum                      | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_sum
//   mp_cat                      | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | mp_cat
//   pixel_norm                  | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | pixel_norm
//   pixel_norm_backward         | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | pixel_norm
//   mp_silu_modulate            | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > block_kernels.cu       | mp_silu_modulate
//   mp_silu_modulate_backward   | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > reduce_kernels.cu      | mp_silu_modulate
//   clip                        | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | clip
//   clip_backward               | elementwise_cpu.cpp > elementwise_kernels.cpp | elementwise_cuda.cpp > elementwise_kernels.cu | clip
//   cosine_attention            | attention_cpu.cpp > attention_kernels.inc     | attention_cuda.cpp > attention_kernels.cu     | cosine_attention
//   cosine_attention_backward   | attention_cpu.cpp > attention_kernels.inc     | attention_cuda.cpp > attention_kernels.cu     | cosine_attention
//   mp_sum_clip                 | block_cpu.cpp                                 | block_cuda.cpp > block_kernels.cu             | mp_sum_clip
//   mp_sum_clip_silu            | block_cpu.cpp                                 | block_cuda.cpp > block_kernels.cu             | mp_sum_clip
//   mp_sum_clip_backward        | block_cpu.cpp                                 | block_cuda.cpp > block_kernels.cu             | mp_sum_clip
//   attention_qkv_norm          | block_cpu.cpp                                 | block_cuda.cpp > block_kernels.cu             | attention_qkv_norm
//   attention_qkv_norm_backward | block_cpu.cpp                                 | block_cuda.cpp > block_kernels.cu             | attention_qkv_norm
//   solver_step                 | solver_cpu.cpp > elementwise_simd.inc         | solver_cuda.cpp > solver_kernels.cu           | solver_step
//   winograd_weight             | winograd_cpu.cpp > winograd_kernels.inc       | -                                             | winograd_weight
//   winograd_weight_tile        | winograd_cpu.cpp > winograd_tiles_kernels.inc | -                                             | winograd_weight
//   winograd_conv               | winograd_cpu.cpp > winograd_kernels.inc       | -                                             | mp_conv_fused
//   mp_conv_winograd            | winograd_cpu.cpp > winograd_kernels.inc       | -                                             | mp_conv_fused
//   winograd_weight_grad        | winograd_cpu.cpp > winograd_kernels.inc       | -                                             | mp_conv_fused
//   conv1x1                     | conv1x1_cpu.cpp > gemm.inc                    | -                                             | conv1x1
//   _isa (private)              | isa.cpp                                       | -                                             | _ext.isa
// (cpu/elementwise_kernels.cpp runs the per-ISA loops of cpu/elementwise_simd.inc for float32/16/bf16 and
// its own scalar loops for float64 and the baseline level; the Winograd glue runs its products on
// cpu/gemm.inc.)
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace fastdiff::cpu {
std::string isa_op(std::optional<std::string> level);  // cpu/isa.cpp
}

TORCH_LIBRARY(fastdiff, m) {
  // --- forced weight normalization and MP conv / linear -------------------------------------
  // Per-output-row factor 1 / (eps + ||w_o|| / sqrt(n)); float32 (float64 for float64 weights).
  m.def("weight_norm_scale(Tensor w, float eps) -> Tensor");
  // out[o, ...] = w[o, ...] * coef[o], written in `dtype` (default: w's dtype).
  m.def("scale_rows(Tensor w, Tensor coef, ScalarType? dtype=None) -> Tensor");
  // y[:, c, ...] *= coef[c], in place, any dense layout (dim 1 is the channel dim).
  m.def("scale_channels_(Tensor(a!) y, Tensor coef) -> Tensor(a!)");
  // Gradient of sum(G * N(w)) w.r.t. w, and per-row <G_o, N(w)_o> (float32/float64).
  m.def("weight_norm_backward(Tensor grad, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("weight_norm(Tensor w, float eps) -> Tensor");
  m.def("weight_norm_(Tensor(a!) w, float eps) -> Tensor(a!)");
  // W_hat = gain * N(w) / sqrt(fan_in), in `dtype` (default: w's dtype).
  m.def("mp_weight(Tensor w, Tensor gain, float eps, ScalarType? dtype=None) -> Tensor");
  // conv2d(x, W_hat, padding=k//2) for a 4-D weight, x @ W_hat^T for a 2-D weight.
  m.def("mp_conv(Tensor x, Tensor w, Tensor gain, float eps) -> Tensor");
  m.def(
      "mp_conv_backward(Tensor grad, Tensor x, Tensor w, Tensor gain, float eps, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");

  // --- the MP elementwise chain ----------------------------------------------------------------
  m.def("mp_silu(Tensor x) -> Tensor");
  m.def("mp_silu_backward(Tensor grad, Tensor x) -> Tensor");
  m.def("mp_sum(Tensor a, Tensor b, float t) -> Tensor");
  m.def("mp_cat(Tensor a, Tensor b, float t) -> Tensor");
  m.def("pixel_norm(Tensor x, float eps) -> Tensor");
  m.def("pixel_norm_backward(Tensor grad, Tensor x, float eps) -> Tensor");
  // mp_silu(y * (1 + c)) with c of shape [N, C] broadcast over the spatial dims of y.
  m.def("mp_silu_modulate(Tensor y, Tensor c) -> Tensor");
  m.def("mp_silu_modulate_backward(Tensor grad, Tensor y, Tensor c) -> (Tensor, Tensor)");
  m.def("clip(Tensor x, float limit) -> Tensor");
  m.def("clip_backward(Tensor grad, Tensor x, float limit) -> Tensor");

  // --- cosine self-attention -------------------------------------------------------------------
  // qkv [N, 3C, H, W] viewed as [N, heads, C/heads, 3, H*W]; returns y [N, C, H, W] and the per-row
  // log-sum-exp of the scaled scores [N, heads, H*W] (float32) that the backward recomputes from.
  m.def("cosine_attention(Tensor qkv, int num_heads) -> (Tensor, Tensor)");
  m.def("cosine_attention_backward(Tensor grad, Tensor qkv, Tensor y, Tensor lse, int num_heads) -> Tensor");

  // --- block epilogue and the attention's SDPA route (csrc/block_ops.h; cpu/block_cpu.cpp, cuda/block_kernels.cu) ---
  // x = clip(mp_sum(a, b, t), limit) in one pass (no clip when limit <= 0); layout of a kept (dense).
  m.def("mp_sum_clip(Tensor a, Tensor b, float t, float limit) -> Tensor");
  // (x, mp_silu(x)) for the x above: the residual and the next block's activation in one pass.
  m.def("mp_sum_clip_silu(Tensor a, Tensor b, float t, float limit) -> (Tensor, Tensor)");
  // Gradients (da, db) of both from the output gradients (grad_silu None for mp_sum_clip).
  m.def(
      "mp_sum_clip_backward(Tensor grad, Tensor? grad_silu, Tensor a, Tensor b, float t, float limit)"
      " -> (Tensor, Tensor)");
  // q, k, v of qkv [N, 3C, H, W] (EDM2's [N, heads, C/heads, 3, H*W] view), each pixel-normed over its
  // head's channels, as [N, heads, H*W, C/heads] views of [N, H*W, heads, C/heads] memory (what
  // scaled_dot_product_attention reads); qkv channels-first or channels-last.
  m.def("attention_qkv_norm(Tensor qkv, int num_heads, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_qkv_norm_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv, int num_heads,"
      " float eps) -> Tensor");

  // --- batched solver step ---------------------------------------------------------------------
  // One sampler step for a whole batch in one pass. x, d1 (main network's D), d0 (guiding network's
  // D, optional), d_prev, x_base: same shape [N, ...] and dtype; w, sigma_cur, sigma_next: [N], one
  // value per sample (computed in float32, float64 for float64 images). Per sample n:
  //   D = d0 + w (d1 - d0)   (D = d1 when d0 is None)
  //   Euler (d_prev, x_base None): x is at sigma_cur;  d = (x - D) / sigma_cur;
  //                                x_next = x + (sigma_next - sigma_cur) d
  //   Heun correction:             x is at sigma_next (the Euler result), x_base the point at
  //                                sigma_cur the step started from, d_prev its derivative;
  //                                d = (x - D) / sigma_next;
  //                                x_next = x_base + (sigma_next - sigma_cur) (d_prev/2 + d/2)
  // Returns (x_next, d, D), laid out like x. Not differentiable (sampling runs under no_grad).
  m.def(
      "solver_step(Tensor x, Tensor d1, Tensor? d0, Tensor w, Tensor sigma_cur, Tensor sigma_next,"
      " Tensor? d_prev=None, Tensor? x_base=None) -> (Tensor, Tensor, Tensor)");

  // --- Winograd MP convolution (3x3, stride 1, padding 1; CPU, float32 / float64) -------------------
  // F(4x4, 3x3) weight transform G g G^T of a [out, in, 3, 3] weight: [36, ceil(out_p / 32), in_p, 32]
  // (point, panel of 32 output channels, input channel, output channel within the panel), channel counts
  // zero-padded to multiples of 8 (output channels up to whole panels), in w's dtype. Cached in eval
  // mode (no normalization: the MP factor is the `scale` of winograd_conv).
  m.def("winograd_weight(Tensor w) -> Tensor");
  // The F(2x2, 3x3) (tile 2: 16 points) or F(6x6, 3x3) (tile 6: 64 points) weight transform, laid out like
  // winograd_weight's ([points, ceil(out_p / 32), in_p, 32]); winograd_conv takes any of the three and
  // tiles the output accordingly.
  m.def("winograd_weight_tile(Tensor w, int tile) -> Tensor");
  // The fused conv: y = conv2d(silu_in ? mp_silu(x) : x, weight) * scale[o] per output channel o, with
  // u = winograd_weight(weight); then y = mp_silu(y * (1 + mod)) if mod ([N, out]) is given, then
  // y = mp_sum(res, y, t) if res (shaped like y) is given, then clip(y, clip) if clip > 0. Output laid
  // out like x (channels-last or contiguous). Not differentiable (the inference form).
  m.def(
      "winograd_conv(Tensor x, Tensor u, Tensor scale, bool silu_in=False, Tensor? mod=None, Tensor? res=None,"
      " float t=0.5, float clip=0.) -> Tensor");
  // mp_conv for a 3x3 weight on the Winograd path, differentiable (autograd in fastdiff/ops/_winograd.py).
  m.def("mp_conv_winograd(Tensor x, Tensor w, Tensor gain, float eps) -> Tensor");
  // The gradient of conv2d(x, weight, padding=1) (3x3) w.r.t. the weight for the output gradient grad
  // ([N, out, H, W]): [out, in, 3, 3] in x's dtype, by the Winograd form dU = sum over tiles of
  // (A^T)^T grad_tile A^T . (B^T d B), dW = G^T dU G. Not differentiable (a backward).
  m.def("winograd_weight_grad(Tensor x, Tensor grad) -> Tensor");
  // The 1x1 convolution conv2d(x, w) for an effective weight w ([out, in] or [out, in, 1, 1]; CPU), the
  // eval-mode form of a 1x1 MP convolution. Not differentiable (the inference form).
  m.def("conv1x1(Tensor x, Tensor w) -> Tensor");

  // --- private: the CPU kernels' instruction set ---------------------------------------------------
  // Returns "family:isa,..." (e.g. "elementwise:avx512,solver:avx512,attention:avx2"); a level
  // ("avx512", "avx2", "baseline") lowers it first, capped at what the CPU has (used by the tests).
  m.def("_isa(str? level=None) -> str", &fastdiff::cpu::isa_op);
}

// The extension is loaded as a Python module (fastdiff._C) only for its side effect of running the
// registrations above; it exposes no Python functions of its own.
static struct PyModuleDef fastdiff_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdiff_module); }
