// CPU implementations of the fastdiff ops: checks, layouts, threading (at::parallel_for), and calls
// into the raw loops of elementwise_kernels.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "elementwise_kernels.h"

namespace fastdiff {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task (as ATen's GRAIN_SIZE): smaller ops stay on one thread

#define FD_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Runs f(begin, end) over a flat range of n elements in parallel.
template <typename F> void parallel_flat(int64_t n, F f) {
  if (n > 0) at::parallel_for(0, n, kGrain, f);
}

// Grain (in rows) so that each task touches about kGrain elements.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_len, 1)); }

// ---------------------------------------------------------------------------------------------
// Weight normalization.

at::Tensor weight_norm_scale_cpu(const at::Tensor& w_in, double eps) {
  check_weight(w_in, "weight_norm_scale");
  at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor out = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  FD_DISPATCH(w.scalar_type(), "weight_norm_scale", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    A* op = out.mutable_data_ptr<A>();
    const A rsn = A(1) / std::sqrt(A(n));
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; r++)
        op[r] = A(1) / (A(eps) + std::sqrt(cpu::sumsq(wp + r * n, n)) * rsn);
    });
  });
  return out;
}

at::Tensor scale_rows_cpu(const at::Tensor& w_in, const at::Tensor& coef_in,
                          std::optional<at::ScalarType> dtype) {
  check_weight(w_in, "scale_rows");
  check_float(coef_in, "scale_rows", "coef");
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == w_in.size(0),
              "fastdiff.scale_rows: expected coef of shape [", w_in.size(0), "], got ", coef_in.sizes());
  at::Tensor w = w_in.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options());
  at::Tensor coef = coef_in.to(acc_type(w.scalar_type())).contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  FD_DISPATCH(w.scalar_type(), "scale_rows", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const A* cp = coef.const_data_ptr<A>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; r++) cpu::scale_by(wp + r * n, cp + r, 0, op + r * n, n);
    });
  });
  if (dtype.has_value() && *dtype != out.scalar_type()) out = out.to(*dtype);
  return out;
}

at::Tensor weight_norm_cpu(const at::Tensor& w, double eps) {
  return scale_rows_cpu(w, weight_norm_scale_cpu(w, eps), std::nullopt);
}

at::Tensor& weight_norm_inplace_cpu(at::Tensor& w, double eps) {
  if (!w.is_contiguous()) {  // rare (a transposed view): normalize a copy, write it back
    w.copy_(weight_norm_cpu(w, eps));
    return w;
  }
  // Two passes over the weight: the row norms, then each row scaled in place.
  at::Tensor coef = weight_norm_scale_cpu(w, eps);
  const int64_t rows = w.size(0), n = w.numel() / rows;
  FD_DISPATCH(w.scalar_type(), "weight_norm_", [&] {
    using A = cpu::acc_t<scalar_t>;
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    const A* cp = coef.const_data_ptr<A>();
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; r++) cpu::scale_by(wp + r * n, cp + r, 0, wp + r * n, n);
    });
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor> weight_norm_backward_cpu(const at::Tensor& grad_in,
                                                            const at::Tensor& w_in, double eps) {
  check_weight(w_in, "weight_norm_backward");
  check_same(grad_in, w_in, "weight_norm_backward", "grad", "w");
  at::Tensor w = w_in.contiguous(), g = grad_in.contiguous();
  const int64_t rows = w.size(0), n = w.numel() / rows;
  at::Tensor dw = at::empty(w.sizes(), w.options());
  at::Tensor dot = at::empty({rows}, w.options().dtype(acc_type(w.scalar_type())));
  FD_DISPATCH(w.scalar_type(), "weight_norm_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dw.mutable_data_ptr<scalar_t>();
    A* tp = dot.mutable_data_ptr<A>();
    const A sn = std::sqrt(A(n));
    at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; r++) {
        A ss, gx;
        cpu::sumsq_dot(gp + r * n, wp + r * n, n, &ss, &gx);
        const A norm = std::sqrt(ss);
        const A s = A(1) / (A(eps) + norm / sn);
        const A k = norm > 0 ? gx * s * s / (sn * norm) : A(0);
        cpu::norm_bwd(gp + r * n, wp + r * n, &s, &k, 0, dp + r * n, n);
        tp[r] = s * gx;
      }
    });
  });
  return {dw, dot};
}

// ---------------------------------------------------------------------------------------------
// Per-channel scaling of an activation, in place.

at::Tensor& scale_channels_cpu(at::Tensor& y, const at::Tensor& coef_in) {
  check_float(y, "scale_channels_", "y");
  ChannelView v = channel_view(y, "scale_channels_", "y");
  TORCH_CHECK(coef_in.dim() == 1 && coef_in.size(0) == v.c, "fastdiff.scale_channels_: expected coef of shape [",
              v.c, "], got ", coef_in.sizes());
  at::Tensor coef = coef_in.to(acc_type(y.scalar_type())).contiguous();
  FD_DISPATCH(y.scalar_type(), "scale_channels_", [&] {
    using A = cpu::acc_t<scalar_t>;
    scalar_t* p = v.t.mutable_data_ptr<scalar_t>();
    const A* cp = coef.const_data_ptr<A>();
    const int64_t C = v.c, S = v.s;
    if (v.channels_last) {
      at::parallel_for(0, v.n * S, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) cpu::scale_by(p + r * C, cp, 1, p + r * C, C);
      });
    } else {
      at::parallel_for(0, v.n * C, row_grain(S), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) cpu::scale_by(p + r * S, cp + r % C, 0, p + r * S, S);
      });
    }
  });
  if (!v.t.is_same(y)) y.copy_(v.t);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Elementwise ops on flat dense memory.

template <typename F>
at::Tensor unary_flat(const at::Tensor& x_in, const char* op, F fn) {
  check_float(x_in, op, "x");
  at::Tensor x = dense(x_in);
  at::Tensor y = at::empty_like(x);
  FD_DISPATCH(x.scalar_type(), "fastdiff_unary", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_flat(x.numel(), [&](int64_t b, int64_t e) { fn(xp + b, yp + b, e - b); });
  });
  return y;
}

template <typename F>
at::Tensor binary_flat(const at::Tensor& a_in, const at::Tensor& b_in, const char* op, const char* na,
                       const char* nb, F fn) {
  check_float(a_in, op, na);
  check_float(b_in, op, nb);
  check_same(a_in, b_in, op, na, nb);
  at::Tensor a = dense(a_in), b = dense(b_in);
  if (a.strides() != b.strides()) {
    a = a.contiguous();
    b = b.contiguous();
  }
  at::Tensor y = at::empty_like(a);
  FD_DISPATCH(a.scalar_type(), "fastdiff_binary", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_flat(a.numel(), [&](int64_t s, int64_t e) { fn(ap + s, bp + s, yp + s, e - s); });
  });
  return y;
}

at::Tensor mp_silu_cpu(const at::Tensor& x) {
  return unary_flat(x, "mp_silu", [](auto* xp, auto* yp, int64_t n) { cpu::mp_silu(xp, yp, n); });
}

at::Tensor mp_silu_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  return binary_flat(grad, x, "mp_silu_backward", "grad", "x",
                     [](auto* gp, auto* xp, auto* yp, int64_t n) { cpu::mp_silu_bwd(gp, xp, yp, n); });
}

at::Tensor mp_sum_cpu(const at::Tensor& a, const at::Tensor& b, double t) {
  auto [wa, wb] = mp_sum_weights(t);
  return binary_flat(a, b, "mp_sum", "a", "b", [wa = wa, wb = wb](auto* ap, auto* bp, auto* yp, int64_t n) {
    cpu::axpby(ap, bp, yp, n, wa, wb);
  });
}

at::Tensor clip_cpu(const at::Tensor& x, double limit) {
  TORCH_CHECK(limit >= 0, "fastdiff.clip: expected a non-negative limit, got ", limit);
  return unary_flat(x, "clip", [l = float(limit)](auto* xp, auto* yp, int64_t n) { cpu::clip(xp, yp, n, l); });
}

at::Tensor clip_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double limit) {
  return binary_flat(grad, x, "clip_backward", "grad", "x", [l = float(limit)](auto* gp, auto* xp, auto* yp, int64_t n) {
    cpu::clip_bwd(gp, xp, yp, n, l);
  });
}

// ---------------------------------------------------------------------------------------------
// mp_cat along dim 1.

at::Tensor mp_cat_cpu(const at::Tensor& a_in, const at::Tensor& b_in, double t) {
  CatPlan p = plan_mp_cat(a_in, b_in, t);
  const at::Tensor &a = p.a, &b = p.b;
  at::Tensor& y = p.y;
  const bool cl = p.channels_last;
  const int64_t N = p.n, Ca = p.ca, Cb = p.cb, S = p.s, C = Ca + Cb;
  const double wa = p.wa, wb = p.wb;
  FD_DISPATCH(a.scalar_type(), "mp_cat", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (cl) {
      at::parallel_for(0, N * S, row_grain(C), [&](int64_t s0, int64_t e) {
        for (int64_t r = s0; r < e; r++) {
          cpu::scale(ap + r * Ca, yp + r * C, Ca, wa);
          cpu::scale(bp + r * Cb, yp + r * C + Ca, Cb, wb);
        }
      });
    } else {
      // Tasks are (sample, half, chunk of the half) so that batch 1 still uses every thread.
      const int64_t chunk = kGrain;
      const int64_t na = (Ca * S + chunk - 1) / chunk, nb = (Cb * S + chunk - 1) / chunk;
      at::parallel_for(0, N * (na + nb), 1, [&](int64_t s0, int64_t e) {
        for (int64_t task = s0; task < e; task++) {
          const int64_t n = task / (na + nb), j = task % (na + nb);
          if (j < na) {
            const int64_t off = j * chunk, len = std::min(chunk, Ca * S - off);
            cpu::scale(ap + n * Ca * S + off, yp + n * C * S + off, len, wa);
          } else {
            const int64_t off = (j - na) * chunk, len = std::min(chunk, Cb * S - off);
            cpu::scale(bp + n * Cb * S + off, yp + n * C * S + Ca * S + off, len, wb);
          }
        }
      });
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Pixel norm over dim 1, forward and backward.

constexpr int64_t kPix = 256;  // pixels per task in the channels-first layout

at::Tensor pixel_norm_cpu(const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm", "x");
  ChannelView v = channel_view(x_in, "pixel_norm", "x");
  at::Tensor y = at::empty_like(v.t);
  FD_DISPATCH(v.t.scalar_type(), "pixel_norm", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* xp = v.t.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t C = v.c, S = v.s;
    const A rsc = A(1) / std::sqrt(A(C));
    if (v.channels_last) {
      at::parallel_for(0, v.n * S, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) {
          const A s = A(1) / (A(eps) + std::sqrt(cpu::sumsq(xp + r * C, C)) * rsc);
          cpu::scale_by(xp + r * C, &s, 0, yp + r * C, C);
        }
      });
    } else {
      const int64_t tiles = (S + kPix - 1) / kPix;
      at::parallel_for(0, v.n * tiles, 1, [&](int64_t b, int64_t e) {
        A acc[kPix];
        for (int64_t task = b; task < e; task++) {
          const int64_t n = task / tiles, p0 = (task % tiles) * kPix, len = std::min(kPix, S - p0);
          const scalar_t* xb = xp + n * C * S + p0;
          scalar_t* yb = yp + n * C * S + p0;
          std::fill(acc, acc + len, A(0));
          for (int64_t c = 0; c < C; c++) cpu::sumsq_acc(xb + c * S, acc, len);
          for (int64_t i = 0; i < len; i++) acc[i] = A(1) / (A(eps) + std::sqrt(acc[i]) * rsc);
          for (int64_t c = 0; c < C; c++) cpu::scale_by(xb + c * S, acc, 1, yb + c * S, len);
        }
      });
    }
  });
  return y;
}

at::Tensor pixel_norm_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, double eps) {
  check_float(x_in, "pixel_norm_backward", "x");
  check_same(grad_in, x_in, "pixel_norm_backward", "grad", "x");
  ChannelView v = channel_view(x_in, "pixel_norm_backward", "x");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor dx = at::empty_like(v.t);
  FD_DISPATCH(v.t.scalar_type(), "pixel_norm_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* xp = v.t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const int64_t C = v.c, S = v.s;
    const A sc = std::sqrt(A(C));
    auto coeffs = [&](A ss, A gx, A* s, A* k) {
      const A norm = std::sqrt(ss);
      *s = A(1) / (A(eps) + norm / sc);
      *k = norm > 0 ? gx * (*s) * (*s) / (sc * norm) : A(0);
    };
    if (v.channels_last) {
      at::parallel_for(0, v.n * S, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) {
          A ss, gx, s, k;
          cpu::sumsq_dot(gp + r * C, xp + r * C, C, &ss, &gx);
          coeffs(ss, gx, &s, &k);
          cpu::norm_bwd(gp + r * C, xp + r * C, &s, &k, 0, dp + r * C, C);
        }
      });
    } else {
      const int64_t tiles = (S + kPix - 1) / kPix;
      at::parallel_for(0, v.n * tiles, 1, [&](int64_t b, int64_t e) {
        A ss[kPix], gx[kPix];
        for (int64_t task = b; task < e; task++) {
          const int64_t n = task / tiles, p0 = (task % tiles) * kPix, len = std::min(kPix, S - p0);
          const int64_t off = n * C * S + p0;
          std::fill(ss, ss + len, A(0));
          std::fill(gx, gx + len, A(0));
          for (int64_t c = 0; c < C; c++) {
            cpu::sumsq_acc(xp + off + c * S, ss, len);
            cpu::dot_acc(gp + off + c * S, xp + off + c * S, gx, len);
          }
          for (int64_t i = 0; i < len; i++) coeffs(ss[i], gx[i], &ss[i], &gx[i]);  // -> s, k
          for (int64_t c = 0; c < C; c++)
            cpu::norm_bwd(gp + off + c * S, xp + off + c * S, ss, gx, 1, dp + off + c * S, len);
        }
      });
    }
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// The block's chain mp_silu(y * (1 + c)).

at::Tensor mp_silu_modulate_cpu(const at::Tensor& y_in, const at::Tensor& c) {
  check_float(y_in, "mp_silu_modulate", "y");
  ChannelView v = channel_view(y_in, "mp_silu_modulate", "y");
  at::Tensor m = modulation_factor(y_in, c, "mp_silu_modulate");
  at::Tensor out = at::empty_like(v.t);
  FD_DISPATCH(v.t.scalar_type(), "mp_silu_modulate", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* yp = v.t.const_data_ptr<scalar_t>();
    const A* mp = m.const_data_ptr<A>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t C = v.c, S = v.s;
    if (v.channels_last) {
      at::parallel_for(0, v.n * S, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) cpu::modulate(yp + r * C, mp + (r / S) * C, 1, op + r * C, C);
      });
    } else {
      at::parallel_for(0, v.n * C, row_grain(S), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++) cpu::modulate(yp + r * S, mp + r, 0, op + r * S, S);
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mp_silu_modulate_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                                                 const at::Tensor& c) {
  check_float(y_in, "mp_silu_modulate_backward", "y");
  check_same(grad_in, y_in, "mp_silu_modulate_backward", "grad", "y");
  ChannelView v = channel_view(y_in, "mp_silu_modulate_backward", "y");
  at::Tensor g = like_layout(grad_in, v);
  at::Tensor m = modulation_factor(y_in, c, "mp_silu_modulate_backward");
  at::Tensor dy = at::empty_like(v.t);
  at::Tensor dm;
  FD_DISPATCH(v.t.scalar_type(), "mp_silu_modulate_backward", [&] {
    using A = cpu::acc_t<scalar_t>;
    const scalar_t* yp = v.t.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const A* mp = m.const_data_ptr<A>();
    scalar_t* dp = dy.mutable_data_ptr<scalar_t>();
    const int64_t N = v.n, C = v.c, S = v.s;
    if (v.channels_last) {
      // Each task sums its pixels' products into its own row of partial sums, reduced afterwards.
      const int64_t per_task = row_grain(C), tiles = (S + per_task - 1) / per_task;
      at::Tensor part = at::zeros({N, tiles, C}, m.options());
      A* pp = part.mutable_data_ptr<A>();
      at::parallel_for(0, N * tiles, 1, [&](int64_t b, int64_t e) {
        for (int64_t task = b; task < e; task++) {
          const int64_t n = task / tiles, p0 = (task % tiles) * per_task, p1 = std::min(S, p0 + per_task);
          for (int64_t p = p0; p < p1; p++) {
            const int64_t r = n * S + p;
            cpu::modulate_bwd(gp + r * C, yp + r * C, mp + n * C, 1, dp + r * C, pp + task * C, C);
          }
        }
      });
      dm = part.sum(1);
    } else {
      dm = at::empty({N, C}, m.options());
      A* dmp = dm.mutable_data_ptr<A>();
      at::parallel_for(0, N * C, row_grain(S), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; r++)
          dmp[r] = cpu::modulate_bwd(gp + r * S, yp + r * S, mp + r, 0, dp + r * S, static_cast<A*>(nullptr), S);
      });
    }
  });
  return {dy, dm.to(c.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("weight_norm_scale", &weight_norm_scale_cpu);
  m.impl("scale_rows", &scale_rows_cpu);
  m.impl("scale_channels_", &scale_channels_cpu);
  m.impl("weight_norm_backward", &weight_norm_backward_cpu);
  m.impl("weight_norm", &weight_norm_cpu);
  m.impl("weight_norm_", &weight_norm_inplace_cpu);
  m.impl("mp_silu", &mp_silu_cpu);
  m.impl("mp_silu_backward", &mp_silu_backward_cpu);
  m.impl("mp_sum", &mp_sum_cpu);
  m.impl("mp_cat", &mp_cat_cpu);
  m.impl("pixel_norm", &pixel_norm_cpu);
  m.impl("pixel_norm_backward", &pixel_norm_backward_cpu);
  m.impl("mp_silu_modulate", &mp_silu_modulate_cpu);
  m.impl("mp_silu_modulate_backward", &mp_silu_modulate_backward_cpu);
  m.impl("clip", &clip_cpu);
  m.impl("clip_backward", &clip_backward_cpu);
}

}  // namespace fastdiff
