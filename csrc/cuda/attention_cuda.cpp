// CUDA glue of the fused cosine attention: checks, layouts, outputs, stream, launch-error checks and
// registration. The kernels are in attention.cu (no ATen there).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"
#include "attention_cuda.h"

namespace fastdiff {
namespace {

constexpr int64_t kDim = 64;

int attn_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kAttnF32;
    case at::kDouble: return cuda::kAttnF64;
    case at::kHalf: return cuda::kAttnF16;
    case at::kBFloat16: return cuda::kAttnBF16;
    default: TORCH_CHECK(false, "fastdiff.cosine_attention: unsupported dtype ", t);
  }
  return -1;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_qkv(const at::Tensor& qkv, int64_t num_heads, const char* op) {
  check_float(qkv, op, "qkv");
  TORCH_CHECK(qkv.is_cuda(), "fastdiff.", op, ": expected a CUDA tensor, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4, "fastdiff.", op, ": expected qkv of shape [N, 3C, H, W], got shape ",
              qkv.sizes());
  TORCH_CHECK(num_heads >= 1, "fastdiff.", op, ": expected num_heads >= 1, got ", num_heads);
  TORCH_CHECK(qkv.size(1) == 3 * kDim * num_heads, "fastdiff.", op,
              ": the fused kernel needs 64 channels per head, i.e. qkv with 3 * 64 * num_heads = ",
              3 * kDim * num_heads, " channels, got ", qkv.size(1),
              " (use fastdiff.ops.cosine_attention, which falls back to the reference for other head dims)");
}

std::tuple<at::Tensor, at::Tensor> cosine_attention_cuda(const at::Tensor& qkv_in, int64_t num_heads) {
  check_qkv(qkv_in, num_heads, "cosine_attention");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  at::Tensor qkv = qkv_in.contiguous();
  const int64_t n = qkv.size(0), hw = qkv.size(2) * qkv.size(3);
  at::Tensor y = at::empty({n, kDim * num_heads, qkv.size(2), qkv.size(3)}, qkv.options());
  at::Tensor lse = at::empty({n, num_heads, hw}, qkv.options().dtype(acc_type(qkv.scalar_type())));
  if (y.numel() == 0) return {y, lse};
  cuda::attn_forward(attn_dtype(qkv.scalar_type()), qkv.const_data_ptr(), y.mutable_data_ptr(),
                     lse.mutable_data_ptr(), n * num_heads, hw, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, lse};
}

at::Tensor cosine_attention_backward_cuda(const at::Tensor& grad_in, const at::Tensor& qkv_in,
                                          const at::Tensor& y_in, const at::Tensor& lse_in, int64_t num_heads) {
  const char* op = "cosine_attention_backward";
  check_qkv(qkv_in, num_heads, op);
  check_float(grad_in, op, "grad");
  check_same(grad_in, y_in, op, "grad", "y");
  TORCH_CHECK(y_in.scalar_type() == qkv_in.scalar_type() && y_in.device() == qkv_in.device(), "fastdiff.", op,
              ": expected y with qkv's dtype and device, got ", y_in.scalar_type(), " on ", y_in.device());
  const int64_t n = qkv_in.size(0), hw = qkv_in.size(2) * qkv_in.size(3);
  const std::vector<int64_t> yshape = {n, kDim * num_heads, qkv_in.size(2), qkv_in.size(3)};
  TORCH_CHECK(y_in.sizes() == at::IntArrayRef(yshape), "fastdiff.", op, ": expected y of shape ",
              at::IntArrayRef(yshape), ", got ", y_in.sizes());
  const at::ScalarType acc = acc_type(qkv_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == acc && lse_in.device() == qkv_in.device(), "fastdiff.", op,
              ": expected lse of dtype ", acc, " on ", qkv_in.device(), ", got ", lse_in.scalar_type(), " on ",
              lse_in.device());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({n, num_heads, hw}), "fastdiff.", op, ": expected lse of shape [",
              n, ", ", num_heads, ", ", hw, "], got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  at::Tensor qkv = qkv_in.contiguous(), g = grad_in.contiguous(), y = y_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor gx = at::empty(qkv.sizes(), qkv.options());
  if (gx.numel() == 0) return gx;
  at::Tensor dscratch = at::empty({n * num_heads * hw}, qkv.options().dtype(acc));
  cuda::attn_backward(attn_dtype(qkv.scalar_type()), g.const_data_ptr(), qkv.const_data_ptr(), y.const_data_ptr(),
                      lse.const_data_ptr(), dscratch.mutable_data_ptr(), gx.mutable_data_ptr(), n * num_heads, hw,
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("cosine_attention", &cosine_attention_cuda);
  m.impl("cosine_attention_backward", &cosine_attention_backward_cuda);
}

}  // namespace fastdiff
