// Input checks and sizes of the fused cosine attention, shared by the CPU and CUDA glue.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "common.h"

namespace fastdiff {

constexpr int64_t kAttnHeadDim = 64;  // channels per head of the fused kernels

struct AttnShape {
  int64_t n, heads, hw, c;  // batch, heads, pixels, output channels (64 * heads)
};

inline AttnShape check_attention_qkv(const at::Tensor& qkv, int64_t num_heads, const char* op) {
  check_float(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 4, "fastdiff.", op, ": expected qkv of shape [N, 3C, H, W], got shape ", qkv.sizes());
  TORCH_CHECK(num_heads >= 1, "fastdiff.", op, ": expected num_heads >= 1, got ", num_heads);
  TORCH_CHECK(qkv.size(1) == 3 * kAttnHeadDim * num_heads, "fastdiff.", op,
              ": the fused kernel needs 64 channels per head, i.e. qkv with 3 * 64 * num_heads = ",
              3 * kAttnHeadDim * num_heads, " channels, got ", qkv.size(1),
              " (use fastdiff.ops.cosine_attention, which falls back to the reference for other head dims)");
  return {qkv.size(0), num_heads, qkv.size(2) * qkv.size(3), kAttnHeadDim * num_heads};
}

// The backward's inputs: qkv as in the forward, grad and y of the output's shape and qkv's dtype, lse of
// shape [N, heads, HW] in the accumulation type.
inline AttnShape check_attention_backward(const at::Tensor& grad, const at::Tensor& qkv, const at::Tensor& y,
                                          const at::Tensor& lse, int64_t num_heads) {
  const char* op = "cosine_attention_backward";
  const AttnShape sh = check_attention_qkv(qkv, num_heads, op);
  check_float(grad, op, "grad");
  check_float(y, op, "y");
  check_same(grad, y, op, "grad", "y");
  TORCH_CHECK(y.scalar_type() == qkv.scalar_type() && y.device() == qkv.device(), "fastdiff.", op,
              ": expected y with qkv's dtype and device, got ", y.scalar_type(), " on ", y.device());
  const std::vector<int64_t> yshape = {sh.n, sh.c, qkv.size(2), qkv.size(3)};
  TORCH_CHECK(y.sizes() == at::IntArrayRef(yshape), "fastdiff.", op, ": expected y of shape ",
              at::IntArrayRef(yshape), ", got ", y.sizes());
  const at::ScalarType acc = acc_type(qkv.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc && lse.device() == qkv.device(), "fastdiff.", op, ": expected lse of dtype ",
              acc, " on ", qkv.device(), ", got ", lse.scalar_type(), " on ", lse.device());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({sh.n, sh.heads, sh.hw}), "fastdiff.", op, ": expected lse of shape [",
              sh.n, ", ", sh.heads, ", ", sh.hw, "], got ", lse.sizes());
  return sh;
}

}  // namespace fastdiff
