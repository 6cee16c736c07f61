// CUDA implementations of the fastdiff ops: the same checks, layouts, output dtypes and maths as
// cpu/elementwise_cpu.cpp, with the raw launchers of elementwise_kernels.cuh doing the work on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "elementwise_kernels.cuh"
#include "launch.h"

namespace fastdiff {

// mp_silu_modulate's forward: the factor 1 + c formed inside the kernel (cuda/block_cuda.cpp).
at::Tensor mp_silu_modulate_cond_cuda(const at::Tensor& y, const at::Tensor& c);

namespace {

using cuda::DType;

using cuda::dtype_of;
using cuda::check_cuda;
using cuda::launch_on;


void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastdiff.", op, ": expected '", name, "' on the same device as '", ref_name,
              "' (", ref.device(), "), got ", t.device());
}

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
  at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor out = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  launch_on(w, [&](cudaStream_t st) {
    cuda::row_normalize(dtype_of(w, "weight_norm_scale"), cptr(w), nullptr, mptr(out), rows, n, eps, st);
  });
  return out;
}

at::Tensor scale_rows_cuda(const at::Tensor& w_in, const at::Tensor& coef_in, std::optional<at::ScalarType> dtype) {
  check_weight_cuda(w_in, "scale_rows");
  check_float(coef_in, "scale_rows", "coef");
  check_on(coef_in, w_in, "scale_rows", "coef", "w");
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == w_in.size(0), "fastdiff.scale_rows: expected coef of shape [",
              w_in.size(0), "], got ", coef_in.sizes());
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
  launch_on(w, [&](cudaStream_t st) {
    cuda::scale_channels(dt, cptr(w), cptr(coef), mptr(out), dtype_of(out, "scale_rows"), 1, rows, n, false,
        st);
  });
  if (out.scalar_type() != target) out = out.to(target);
  return out;
}

at::Tensor weight_norm_cuda(const at::Tensor& w_in, double eps) {
  check_weight_cuda(w_in, "weight_norm");
  at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor out = at::empty(w.sizes(), w.options());
  launch_on(w, [&](cudaStream_t st) {
    cuda::row_normalize(dtype_of(w, "weight_norm"), cptr(w), mptr(out), nullptr, rows, n, eps, st);
  });
  return out;
}

at::Tensor& weight_norm_inplace_cuda(at::Tensor& w, double eps) {
  check_weight_cuda(w, "weight_norm_");
  if (!w.is_contiguous()) {
    w.copy_(weight_norm_cuda(w, eps));
    return w;
  }
  const int64_t rows = w.size(0), n = w.numel() / rows;
  launch_on(w, [&](cudaStream_t st) {
    cuda::row_normalize(dtype_of(w, "weight_norm_"), cptr(w), mptr(w), nullptr, rows, n, eps, st);
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor> weight_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& w_in,
                                                             double eps) {
  check_weight_cuda(w_in, "weight_norm_backward");
  check_same(grad_in, w_in, "weight_norm_backward", "grad", "w");
  at::Tensor w = w_in.contiguous(), g = grad_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor dw = at::empty(w.sizes(), w.options());
  at::Tensor dot = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  launch_on(g, [&](cudaStream_t st) {
    cuda::row_normalize_bwd(dtype_of(w, "weight_norm_backward"), cptr(g), cptr(w), mptr(dw), mptr(dot), rows,
        n, eps, st);
  });
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
  at::Tensor coef = coef_in.to(acc_type(y.scalar_type())).contiguous();
  const DType dt = dtype_of(y, "scale_channels_");
  launch_on(v.t, [&](cudaStream_t st) {
    cuda::scale_channels(dt, cptr(v.t), cptr(coef), mptr(v.t), dt, v.n, v.c, v.s, v.channels_last, st);
  });
  if (!v.t.is_same(y)) y.copy_(v.t);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops on flat dense memory.

template <typename F> at::Tensor unary_flat(const at::Tensor& x_in, const char* op, F fn) {
  check_float(x_in, op, "x");
  check_cuda(x_in, op, "x");
  at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  const DType dt = dtype_of(x, op);
  launch_on(x, [&](cudaStream_t st) { fn(dt, cptr(x), mptr(y), x.numel(), st); });
  return y;
}

template <typename F>
at::Tensor binary_flat(const at::Tensor& a_in, const at::Tensor& b_in, const char* op, const char* na, const char* nb,
                       F fn) {
  check_float(a_in, op, na);
  check_float(b_in, op, nb);
  check_cuda(a_in, op, na);
  check_same(a_in, b_in, op, na, nb);
  at::Tensor a = dense(a_in), b = dense(b_in);
  if (a.strides() != b.strides()) {
    a = a.contiguous();
    b = b.contiguous();
  }
  at::Tensor y = at::empty_like(a);
  const DType dt = dtype_of(a, op);
  launch_on(a, [&](cudaStream_t st) { fn(dt, cptr(a), cptr(b), mptr(y), a.numel(), st); });
  return y;
}

at::Tensor mp_silu_cuda(const at::Tensor& x) {
  return unary_flat(x, "mp_silu", [](DType t, const void* xp, void* yp, int64_t n, cudaStream_t st) {
    cuda::mp_silu(t, xp, yp, n, st);
  });
}

at::Tensor mp_silu_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  return binary_flat(grad, x, "mp_silu_backward", "grad", "x",
                     [](DType t, const void* gp, const void* xp, void* yp, int64_t n, cudaStream_t st) {
                       cuda::mp_silu_bwd(t, gp, xp, yp, n, st);
                     });
}

at::Tensor mp_sum_cuda(const at::Tensor& a, const at::Tensor& b, double t) {
  const auto [wa, wb] = mp_sum_weights(t);
  return binary_flat(a, b, "mp_sum", "a", "b", [wa = wa, wb = wb](DType dt, const void* ap, const void* bp, void* yp, int64_t n, cudaStream_t st) {
    cuda::axpby(dt, ap, bp, yp, n, wa, wb, st);
  });
}

at::Tensor clip_cuda(const at::Tensor& x, double limit) {
  TORCH_CHECK(limit >= 0, "fastdiff.clip: expected a non-negative limit, got ", limit);
  const float l = float(limit);
  return unary_flat(x, "clip", [l](DType t, const void* xp, void* yp, int64_t n, cudaStream_t st) {
    cuda::clip(t, xp, yp, n, l, st);
  });
}

at::Tensor clip_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double limit) {
  const float l = float(limit);
  return binary_flat(grad, x, "clip_backward", "grad", "x",
                     [l](DType t, const void* gp, const void* xp, void* yp, int64_t n, cudaStream_t st) {
                       cuda::clip_bwd(t, gp, xp, yp, n, l, st);
                     });
}

// ---------------------------------------------------------------------------------------------
// mp_cat along dim 1.

at::Tensor mp_cat_cuda(const at::Tensor& a_in, const at::Tensor& b_in, double t) {
  check_cuda(a_in, "mp_cat", "a");
  CatPlan p = plan_mp_cat(a_in, b_in, t);
  const at::Tensor &a = p.a, &b = p.b;
  at::Tensor& y = p.y;
  const bool cl = p.channels_last;
  const int64_t N = p.n, Ca = p.ca, Cb = p.cb, S = p.s;
  const double wa = p.wa, wb = p.wb;
  launch_on(a, [&](cudaStream_t st) {
    cuda::mp_cat(dtype_of(a, "mp_cat"), cptr(a), cptr(b), mptr(y), N, Ca, Cb, S, cl, wa, wb, st);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Pixel norm over dim 1, forward and backward.

at::Tensor pixel_norm_cuda(const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm", "x");
  check_cuda(x_in, "pixel_norm", "x");
  ChannelView v = channel_view(x_in, "pixel_norm", "x");
  at::Tensor y = at::empty_like(v.t);
  const DType dt = dtype_of(v.t, "pixel_norm");
  launch_on(v.t, [&](cudaStream_t st) {
    if (v.channels_last)
      cuda::row_normalize(dt, cptr(v.t), mptr(y), nullptr, v.n * v.s, v.c, eps, st);
    else
      cuda::pixel_norm_cf(dt, cptr(v.t), mptr(y), v.n, v.c, v.s, eps, st);
  });
  return y;
}

at::Tensor pixel_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm_backward", "x");
  check_cuda(x_in, "pixel_norm_backward", "x");
  check_same(grad_in, x_in, "pixel_norm_backward", "grad", "x");
  ChannelView v = channel_view(x_in, "pixel_norm_backward", "x");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor dx = at::empty_like(v.t);
  const DType dt = dtype_of(v.t, "pixel_norm_backward");
  launch_on(v.t, [&](cudaStream_t st) {
    if (v.channels_last)
      cuda::row_normalize_bwd(dt, cptr(g), cptr(v.t), mptr(dx), nullptr, v.n * v.s, v.c, eps, st);
    else
      cuda::pixel_norm_bwd_cf(dt, cptr(g), cptr(v.t), mptr(dx), v.n, v.c, v.s, eps, st);
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// The block's chain mp_silu(y * (1 + c)).

std::tuple<at::Tensor, at::Tensor> mp_silu_modulate_backward_cuda(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                                  const at::Tensor& c) {
  check_float(y_in, "mp_silu_modulate_backward", "y");
  check_cuda(y_in, "mp_silu_modulate_backward", "y");
  check_same(grad_in, y_in, "mp_silu_modulate_backward", "grad", "y");
  ChannelView v = channel_view(y_in, "mp_silu_modulate_backward", "y");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor m = modulation_factor(y_in, c, "mp_silu_modulate_backward");
  at::Tensor dy = at::empty_like(v.t);
  at::Tensor dm = at::empty({v.n, v.c}, m.options());
  const int64_t ws = cuda::modulate_bwd_workspace(v.n, v.c, v.s, v.channels_last);
  at::Tensor work = at::empty({ws}, m.options());
  launch_on(g, [&](cudaStream_t st) {
    cuda::modulate_bwd(dtype_of(v.t, "mp_silu_modulate_backward"), cptr(g), cptr(v.t), cptr(m), mptr(dy),
        mptr(dm), ws > 0 ? mptr(work) : nullptr, v.n, v.c, v.s, v.channels_last, st);
  });
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
  m.impl("mp_silu_modulate", &mp_silu_modulate_cond_cuda);
  m.impl("mp_silu_modulate_backward", &mp_silu_modulate_backward_cuda);
  m.impl("clip", &clip_cuda);
  m.impl("clip_backward", &clip_backward_cuda);
}

}  // namespace fastdiff
