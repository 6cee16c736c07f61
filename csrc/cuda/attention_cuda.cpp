// CUDA glue of the fused cosine attention: checks, layouts, outputs, stream, launch-error checks and
// registration. The kernels are in attention_kernels.cu (no ATen there).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../attention_checks.h"
#include "../common.h"
#include "attention_kernels.cuh"
#include "launch.h"

namespace fastdiff {
namespace {

void check_cuda_qkv(const at::Tensor& qkv, const char* op) {
  TORCH_CHECK(qkv.is_cuda(), "fastdiff.", op, ": expected a CUDA tensor, got ", qkv.device());
}

std::tuple<at::Tensor, at::Tensor> cosine_attention_cuda(const at::Tensor& qkv_in, int64_t num_heads) {
  const AttnShape sh = check_attention_qkv(qkv_in, num_heads, "cosine_attention");
  check_cuda_qkv(qkv_in, "cosine_attention");
  at::Tensor qkv = qkv_in.contiguous();
  const int64_t n = sh.n, hw = sh.hw;
  at::Tensor y = at::empty({n, sh.c, qkv.size(2), qkv.size(3)}, qkv.options());
  at::Tensor lse = at::empty({n, num_heads, hw}, qkv.options().dtype(acc_type(qkv.scalar_type())));
  if (y.numel() == 0) return {y, lse};
  const cuda::DType dt = cuda::dtype_of(qkv, "cosine_attention");
  cuda::launch_on(qkv, [&](cudaStream_t st) {
    cuda::attn_forward(dt, qkv.const_data_ptr(), y.mutable_data_ptr(), lse.mutable_data_ptr(), n * num_heads, hw, st);
  });
  return {y, lse};
}

at::Tensor cosine_attention_backward_cuda(const at::Tensor& grad_in, const at::Tensor& qkv_in,
                                          const at::Tensor& y_in, const at::Tensor& lse_in, int64_t num_heads) {
  const AttnShape sh = check_attention_backward(grad_in, qkv_in, y_in, lse_in, num_heads);
  check_cuda_qkv(qkv_in, "cosine_attention_backward");
  const int64_t n = sh.n, hw = sh.hw;
  const at::ScalarType acc = acc_type(qkv_in.scalar_type());
  at::Tensor qkv = qkv_in.contiguous(), g = grad_in.contiguous(), y = y_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor gx = at::empty(qkv.sizes(), qkv.options());
  if (gx.numel() == 0) return gx;
  at::Tensor dscratch = at::empty({n * num_heads * hw}, qkv.options().dtype(acc));
  const cuda::DType dt = cuda::dtype_of(qkv, "cosine_attention_backward");
  cuda::launch_on(qkv, [&](cudaStream_t st) {
    cuda::attn_backward(dt, g.const_data_ptr(), qkv.const_data_ptr(), y.const_data_ptr(), lse.const_data_ptr(),
                        dscratch.mutable_data_ptr(), gx.mutable_data_ptr(), n * num_heads, hw, st);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("cosine_attention", &cosine_attention_cuda);
  m.impl("cosine_attention_backward", &cosine_attention_backward_cuda);
}

}  // namespace fastdiff
