// CUDA implementations of the fastdiff ops: the same checks, layouts, output dtypes and maths as
// cpu/ops_cpu.cpp, with the raw launchers of kernels.cuh doing the work on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "kernels.cuh"

namespace fastdiff {
namespace {

using cuda::DType;

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::Double;
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastdiff.", op, ": expected a float32, float64, float16 or bfloat16 tensor, got ",
                  t.scalar_type());
  }
  return DType::Float;  // unreachable
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastdiff.", op, ": expected '", name, "' on a CUDA device, got ", t.device());
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastdiff.", op, ": expected '", name, "' on the same device as '", ref_name,
              "' (", ref.device(), "), got ", t.device());
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_weight_cuda(const at::Tensor& w, const char* op) {
  check_weight(w, op);
  check_cuda(w, op, "w");
}

template <typename T> const void* cptr(const T& t) { return t.const_data_ptr(); }
void* mptr(at::Tensor& t) { return t.mutable_data_ptr(); }

// ---------------------------------------------------------------------------------------------
// Weight normalization.

at::Tensor weight_norm_scale_cuda(const at::Tensor& w_in, double eps) {
  check_weight_cuda(w_in, "weight_norm_scale");
  c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor out = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  cuda::row_normalize(dtype_of(w, "weight_norm_scale"), cptr(w), nullptr, mptr(out), rows, n, eps, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scale_rows_cuda(const at::Tensor& w_in, const at::Tensor& coef_in, std::optional<at::ScalarType> dtype) {
  check_weight_cuda(w_in, "scale_rows");
  check_float(coef_in, "scale_rows", "coef");
  check_on(coef_in, w_in, "scale_rows", "coef", "w");
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == w_in.size(0), "fastdiff.scale_rows: expected coef of shape [",
              w_in.size(0), "], got ", coef_in.sizes());
  c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous();
  at::Tensor coef = coef_in.to(acc_type(w.scalar_type())).contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  const at::ScalarType target = dtype.value_or(w.scalar_type());
  const DType dt = dtype_of(w, "scale_rows");
  // Written in the target dtype directly where that gives the CPU op's result (the float32 product
  // rounded once); otherwise in w's dtype and then cast, as the CPU op does.
  const bool direct = target == w.scalar_type() ||
                      (w.scalar_type() == at::kFloat && (target == at::kHalf || target == at::kBFloat16));
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(direct ? target : w.scalar_type()));
  cuda::scale_channels(dt, cptr(w), cptr(coef), mptr(out), dtype_of(out, "scale_rows"), 1, rows, n, false, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out.scalar_type() != target) out = out.to(target);
  return out;
}

at::Tensor weight_norm_cuda(const at::Tensor& w_in, double eps) {
  check_weight_cuda(w_in, "weight_norm");
  c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor out = at::empty(w.sizes(), w.options());
  cuda::row_normalize(dtype_of(w, "weight_norm"), cptr(w), mptr(out), nullptr, rows, n, eps, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor& weight_norm_inplace_cuda(at::Tensor& w, double eps) {
  check_weight_cuda(w, "weight_norm_");
  c10::cuda::CUDAGuard guard(w.device());
  if (!w.is_contiguous()) {
    w.copy_(weight_norm_cuda(w, eps));
    return w;
  }
  const int64_t rows = w.size(0), n = w.numel() / rows;
  cuda::row_normalize(dtype_of(w, "weight_norm_"), cptr(w), mptr(w), nullptr, rows, n, eps, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

std::tuple<at::Tensor, at::Tensor> weight_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                             double eps) {
  check_weight_cuda(w_in, "weight_norm_backward");
  check_same(grad_in, w_in, "weight_norm_backward", "grad", "w");
  c10::cuda::CUDAGuard guard(w_in.device());
  at::Tensor w = w_in.contiguous(), g = grad_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor dw = at::empty(w.sizes(), w.options());
  at::Tensor dot = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  cuda::row_normalize_bwd(dtype_of(w, "weight_norm_backward"), cptr(g), cptr(w), mptr(dw), mptr(dot), rows, n, eps,
                          stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dw, dot};
}

// ---------------------------------------------------------------------------------------------
// Per-channel scaling of an activation, in place.

at::Tensor& scale_channels_cuda(at::Tensor& y, const at::Tensor& coef_in) {
  check_float(y, "scale_channels_", "y");
  check_cuda(y, "scale_channels_", "y");
  ChannelView v = channel_view(y, "scale_channels_", "y");
  check_float(coef_in, "scale_channels_", "coef");
  check_on(coef_in, y, "scale_channels_", "coef", "y");
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == v.c, "fastdiff.scale_channels_: expected coef of shape [",
              v.c, "], got ", coef_in.sizes());
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor coef = coef_in.to(acc_type(y.scalar_type())).contiguous();
  const DType dt = dtype_of(y, "scale_channels_");
  cuda::scale_channels(dt, cptr(v.t), cptr(coef), mptr(v.t), dt, v.n, v.c, v.s, v.channels_last, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!v.t.is_same(y)) y.copy_(v.t);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops on flat dense memory.

template <typename F> at::Tensor unary_flat(const at::Tensor& x_in, const char* op, F fn) {
  check_float(x_in, op, "x");
  check_cuda(x_in, op, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  fn(dtype_of(x, op), cptr(x), mptr(y), x.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

template <typename F>
at::Tensor binary_flat(const at::Tensor& a_in, const at::Tensor& b_in, const char* op, const char* na, const char* nb,
                       F fn) {
  check_float(a_in, op, na);
  check_float(b_in, op, nb);
  check_cuda(a_in, op, na);
  check_same(a_in, b_in, op, na, nb);
  c10::cuda::CUDAGuard guard(a_in.device());
  at::Tensor a = dense(a_in), b = dense(b_in);
  if (a.strides() != b.strides()) {
    a = a.contiguous();
    b = b.contiguous();
  }
  at::Tensor y = at::empty_like(a);
  fn(dtype_of(a, op), cptr(a), cptr(b), mptr(y), a.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor mp_silu_cuda(const at::Tensor& x) {
  return unary_flat(x, "mp_silu", [](DType t, const void* xp, void* yp, int64_t n) {
    cuda::mp_silu(t, xp, yp, n, stream());
  });
}

at::Tensor mp_silu_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  return binary_flat(grad, x, "mp_silu_backward", "grad", "x",
                     [](DType t, const void* gp, const void* xp, void* yp, int64_t n) {
                       cuda::mp_silu_bwd(t, gp, xp, yp, n, stream());
                     });
}

at::Tensor mp_sum_cuda(const at::Tensor& a, const at::Tensor& b, double t) {
  const auto [wa, wb] = mp_sum_weights(t);
  return binary_flat(a, b, "mp_sum", "a", "b", [wa = wa, wb = wb](DType dt, const void* ap, const void* bp, void* yp, int64_t n) {
    cuda::axpby(dt, ap, bp, yp, n, wa, wb, stream());
  });
}

at::Tensor clip_cuda(const at::Tensor& x, double limit) {
  TORCH_CHECK(limit >= 0, "fastdiff.clip: expected a non-negative limit, got ", limit);
  const float l = float(limit);
  return unary_flat(x, "clip", [l](DType t, const void* xp, void* yp, int64_t n) {
    cuda::clip(t, xp, yp, n, l, stream());
  });
}

at::Tensor clip_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double limit) {
  const float l = float(limit);
  return binary_flat(grad, x, "clip_backward", "grad", "x",
                     [l](DType t, const void* gp, const void* xp, void* yp, int64_t n) {
                       cuda::clip_bwd(t, gp, xp, yp, n, l, stream());
                     });
}

// ---------------------------------------------------------------------------------------------
// mp_cat along dim 1.

at::Tensor mp_cat_cuda(const at::Tensor& a_in, const at::Tensor& b_in, double t) {
  check_cuda(a_in, "mp_cat", "a");
  c10::cuda::CUDAGuard guard(a_in.device());
  CatPlan p = plan_mp_cat(a_in, b_in, t);
  const at::Tensor &a = p.a, &b = p.b;
  at::Tensor& y = p.y;
  const bool cl = p.channels_last;
  const int64_t N = p.n, Ca = p.ca, Cb = p.cb, S = p.s;
  const double wa = p.wa, wb = p.wb;
  cuda::mp_cat(dtype_of(a, "mp_cat"), cptr(a), cptr(b), mptr(y), N, Ca, Cb, S, cl, wa, wb, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// ---------------------------------------------------------------------------------------------
// Pixel norm over dim 1, forward and backward.

at::Tensor pixel_norm_cuda(const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm", "x");
  check_cuda(x_in, "pixel_norm", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  ChannelView v = channel_view(x_in, "pixel_norm", "x");
  at::Tensor y = at::empty_like(v.t);
  const DType dt = dtype_of(v.t, "pixel_norm");
  if (v.channels_last)
    cuda::row_normalize(dt, cptr(v.t), mptr(y), nullptr, v.n * v.s, v.c, eps, stream());
  else
    cuda::pixel_norm_cf(dt, cptr(v.t), mptr(y), v.n, v.c, v.s, eps, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor pixel_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm_backward", "x");
  check_cuda(x_in, "pixel_norm_backward", "x");
  check_same(grad_in, x_in, "pixel_norm_backward", "grad", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  ChannelView v = channel_view(x_in, "pixel_norm_backward", "x");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor dx = at::empty_like(v.t);
  const DType dt = dtype_of(v.t, "pixel_norm_backward");
  if (v.channels_last)
    cuda::row_normalize_bwd(dt, cptr(g), cptr(v.t), mptr(dx), nullptr, v.n * v.s, v.c, eps, stream());
  else
    cuda::pixel_norm_bwd_cf(dt, cptr(g), cptr(v.t), mptr(dx), v.n, v.c, v.s, eps, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// ---------------------------------------------------------------------------------------------
// The block's chain mp_silu(y * (1 + c)).

at::Tensor mp_silu_modulate_cuda(const at::Tensor& y_in, const at::Tensor& c) {
  check_float(y_in, "mp_silu_modulate", "y");
  check_cuda(y_in, "mp_silu_modulate", "y");
  c10::cuda::CUDAGuard guard(y_in.device());
  ChannelView v = channel_view(y_in, "mp_silu_modulate", "y");
  at::Tensor m = modulation_factor(y_in, c, "mp_silu_modulate");
  at::Tensor out = at::empty_like(v.t);
  cuda::modulate(dtype_of(v.t, "mp_silu_modulate"), cptr(v.t), cptr(m), mptr(out), v.n, v.c, v.s, v.channels_last,
                 stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> mp_silu_modulate_backward_cuda(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                                  const at::Tensor& c) {
  check_float(y_in, "mp_silu_modulate_backward", "y");
  check_cuda(y_in, "mp_silu_modulate_backward", "y");
  check_same(grad_in, y_in, "mp_silu_modulate_backward", "grad", "y");
  c10::cuda::CUDAGuard guard(y_in.device());
  ChannelView v = channel_view(y_in, "mp_silu_modulate_backward", "y");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor m = modulation_factor(y_in, c, "mp_silu_modulate_backward");
  at::Tensor dy = at::empty_like(v.t);
  at::Tensor dm = at::empty({v.n, v.c}, m.options());
  const int64_t ws = cuda::modulate_bwd_workspace(v.n, v.c, v.s, v.channels_last);
  at::Tensor work = at::empty({ws}, m.options());
  cuda::modulate_bwd(dtype_of(v.t, "mp_silu_modulate_backward"), cptr(g), cptr(v.t), cptr(m), mptr(dy), mptr(dm),
                     ws > 0 ? mptr(work) : nullptr, v.n, v.c, v.s, v.channels_last, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dy, dm.to(c.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("weight_norm_scale", &weight_norm_scale_cuda);
  m.impl("scale_rows", &scale_rows_cuda);
  m.impl("scale_channels_", &scale_channels_cuda);
  m.impl("weight_norm_backward", &weight_norm_backward_cuda);
  m.impl("weight_norm", &weight_norm_cuda);
  m.impl("weight_norm_", &weight_norm_inplace_cuda);
  m.impl("mp_silu", &mp_silu_cuda);
  m.impl("mp_silu_backward", &mp_silu_backward_cuda);
  m.impl("mp_sum", &mp_sum_cuda);
  m.impl("mp_cat", &mp_cat_cuda);
  m.impl("pixel_norm", &pixel_norm_cuda);
  m.impl("pixel_norm_backward", &pixel_norm_backward_cuda);
  m.impl("mp_silu_modulate", &mp_silu_modulate_cuda);
  m.impl("mp_silu_modulate_backward", &mp_silu_modulate_backward_cuda);
  m.impl("clip", &clip_cuda);
  m.impl("clip_backward", &clip_backward_cuda);
}

}  // namespace fastdiff
