// CUDA glue of the block-level fusions (kernels in block_kernels.cu): checks and layouts from ../block_ops.h,
// allocation, stream, launch checks and registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../block_ops.h"
#include "block_kernels.cuh"
#include "launch.h"

namespace fastdiff {
namespace {

using cuda::DType;
using cuda::dtype_of;
using cuda::check_cuda;
using cuda::launch_on;


std::tuple<at::Tensor, at::Tensor> sum_clip_impl(const at::Tensor& a_in, const at::Tensor& b_in, double t,
                                                 double limit, bool silu, const char* op) {
  check_cuda(a_in, op, "a");
  SumClipPlan p = plan_sum_clip(a_in, b_in, t, limit, op);
  const at::Tensor &a = p.ts[0], &b = p.ts[1];
  at::Tensor x = at::empty_like(a);
  at::Tensor s = silu ? at::empty_like(a) : at::Tensor();
  launch_on(a, [&](cudaStream_t st) {
    cuda::sum_clip(dtype_of(a, op), a.const_data_ptr(), b.const_data_ptr(), x.mutable_data_ptr(),
                   silu ? s.mutable_data_ptr() : nullptr, a.numel(), p.wa, p.wb, p.limit, st);
  });
  return {x, s};
}

at::Tensor mp_sum_clip_cuda(const at::Tensor& a, const at::Tensor& b, double t, double limit) {
  return std::get<0>(sum_clip_impl(a, b, t, limit, false, "mp_sum_clip"));
}

std::tuple<at::Tensor, at::Tensor> mp_sum_clip_silu_cuda(const at::Tensor& a, const at::Tensor& b, double t,
                                                         double limit) {
  return sum_clip_impl(a, b, t, limit, true, "mp_sum_clip_silu");
}

std::tuple<at::Tensor, at::Tensor> mp_sum_clip_backward_cuda(const at::Tensor& grad,
                                                             const std::optional<at::Tensor>& grad_silu,
                                                             const at::Tensor& a_in, const at::Tensor& b_in, double t,
                                                             double limit) {
  check_cuda(a_in, "mp_sum_clip_backward", "a");
  SumClipPlan p = plan_sum_clip_backward(grad, grad_silu, a_in, b_in, t, limit);
  const at::Tensor &g = p.ts[0], &a = p.ts[1], &b = p.ts[2];
  const void* gs = p.ts.size() > 3 ? p.ts[3].const_data_ptr() : nullptr;
  at::Tensor da = at::empty_like(a), db = at::empty_like(a);
  launch_on(a, [&](cudaStream_t st) {
    cuda::sum_clip_bwd(dtype_of(a, "mp_sum_clip_backward"), g.const_data_ptr(), gs, a.const_data_ptr(),
                       b.const_data_ptr(), da.mutable_data_ptr(), db.mutable_data_ptr(), a.numel(), p.wa, p.wb,
                       p.limit, st);
  });
  return {da, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_qkv_norm_cuda(const at::Tensor& qkv_in, int64_t num_heads,
                                                                       double eps) {
  const char* op = "attention_qkv_norm";
  check_cuda(qkv_in, op, "qkv");
  QkvPlan p = plan_qkv(qkv_in, num_heads, op);
  at::Tensor q = qkv_out(p), k = qkv_out(p), v = qkv_out(p);
  bool ok = true;
  launch_on(p.qkv, [&](cudaStream_t st) {
    ok = cuda::qkv_norm(dtype_of(p.qkv, op), p.qkv.const_data_ptr(), q.mutable_data_ptr(), k.mutable_data_ptr(),
                        v.mutable_data_ptr(), p.n, p.s, p.heads, p.d, p.channels_last, eps, st);
  });
  TORCH_CHECK(ok, "fastdiff.", op, ": expected at most 1024 channels per head, got ", p.d);
  return {q, k, v};
}

at::Tensor attention_qkv_norm_backward_cuda(const at::Tensor& gq_in, const at::Tensor& gk_in, const at::Tensor& gv_in,
                                            const at::Tensor& qkv_in, int64_t num_heads, double eps) {
  const char* op = "attention_qkv_norm_backward";
  check_cuda(qkv_in, op, "qkv");
  QkvPlan p = plan_qkv(qkv_in, num_heads, op);
  at::Tensor gq = qkv_grad_in(gq_in, p, "grad_q"), gk = qkv_grad_in(gk_in, p, "grad_k"),
             gv = qkv_grad_in(gv_in, p, "grad_v");
  at::Tensor gx = qkv_grad_out(p);
  bool ok = true;
  launch_on(p.qkv, [&](cudaStream_t st) {
    ok = cuda::qkv_norm_bwd(dtype_of(p.qkv, op), gq.const_data_ptr(), gk.const_data_ptr(), gv.const_data_ptr(),
                            p.qkv.const_data_ptr(), gx.mutable_data_ptr(), p.n, p.s, p.heads, p.d, p.channels_last,
                            eps, st);
  });
  TORCH_CHECK(ok, "fastdiff.", op, ": expected at most 1024 channels per head, got ", p.d);
  return gx;
}

}  // namespace

// The modulation's forward with c read in its own dtype inside the kernel (elementwise_cuda.cpp registers it).
at::Tensor mp_silu_modulate_cond_cuda(const at::Tensor& y_in, const at::Tensor& c_in) {
  const char* op = "mp_silu_modulate";
  check_float(y_in, op, "y");
  check_cuda(y_in, op, "y");
  check_cond(y_in, c_in, op);
  ChannelView v = channel_view(y_in, op, "y");
  const DType dt = dtype_of(v.t, op);
  at::Tensor c = c_in.contiguous();
  if (!cuda::modulate_cond_supports(dt, dtype_of(c, op))) c = c.to(at::kFloat);
  at::Tensor out = at::empty_like(v.t);
  launch_on(v.t, [&](cudaStream_t st) {
    cuda::modulate_cond(dt, dtype_of(c, op), v.t.const_data_ptr(), c.const_data_ptr(), out.mutable_data_ptr(), v.n,
                        v.c, v.s, v.channels_last, st);
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("mp_sum_clip", &mp_sum_clip_cuda);
  m.impl("mp_sum_clip_silu", &mp_sum_clip_silu_cuda);
  m.impl("mp_sum_clip_backward", &mp_sum_clip_backward_cuda);
  m.impl("attention_qkv_norm", &attention_qkv_norm_cuda);
  m.impl("attention_qkv_norm_backward", &attention_qkv_norm_backward_cuda);
}

}  // namespace fastdiff
