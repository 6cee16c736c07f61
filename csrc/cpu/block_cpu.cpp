// CPU kernels of the block-level fusions: the epilogue mp_sum + clip (+ mp_silu) and the q/k/v pixel
// norm of the attention's SDPA route. Plain loops with the CUDA kernels' index maths (cuda/block_kernels.cu), so
// the CPU tests check that maths too; arithmetic in float (double for double), rounded once per output;
// mp_silu and its derivative run the mp_silu ops' own loops (elementwise_kernels.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "../block_ops.h"
#include "elementwise_kernels.h"

namespace fastdiff {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename A> A clip_cpu(A v, A lim, bool on) {
  if (!on) return v;
  v = v < -lim ? -lim : v;
  return v > lim ? lim : v;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastdiff.", op, ": expected '", name, "' on the CPU, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> sum_clip_impl(const at::Tensor& a_in, const at::Tensor& b_in, double t,
                                                 double limit, bool silu, const char* op) {
  check_cpu(a_in, op, "a");
  SumClipPlan p = plan_sum_clip(a_in, b_in, t, limit, op);
  const at::Tensor &a = p.ts[0], &b = p.ts[1];
  at::Tensor x = at::empty_like(a);
  at::Tensor s = silu ? at::empty_like(a) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mp_sum_clip", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    scalar_t* sp = silu ? s.mutable_data_ptr<scalar_t>() : nullptr;
    const A wa = A(p.wa), wb = A(p.wb), lim = A(p.limit);
    const bool on = p.limit > 0;
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; i++) xp[i] = scalar_t(clip_cpu(wa * A(ap[i]) + wb * A(bp[i]), lim, on));
      if (sp != nullptr) cpu::mp_silu(xp + i0, sp + i0, i1 - i0);  // the mp_silu op's own loop, on x as stored
    });
  });
  return {x, s};
}

at::Tensor mp_sum_clip_cpu(const at::Tensor& a, const at::Tensor& b, double t, double limit) {
  return std::get<0>(sum_clip_impl(a, b, t, limit, false, "mp_sum_clip"));
}

std::tuple<at::Tensor, at::Tensor> mp_sum_clip_silu_cpu(const at::Tensor& a, const at::Tensor& b, double t,
                                                        double limit) {
  return sum_clip_impl(a, b, t, limit, true, "mp_sum_clip_silu");
}

std::tuple<at::Tensor, at::Tensor> mp_sum_clip_backward_cpu(const at::Tensor& grad,
                                                            const std::optional<at::Tensor>& grad_silu,
                                                            const at::Tensor& a_in, const at::Tensor& b_in, double t,
                                                            double limit) {
  check_cpu(a_in, "mp_sum_clip_backward", "a");
  SumClipPlan p = plan_sum_clip_backward(grad, grad_silu, a_in, b_in, t, limit);
  const at::Tensor &g = p.ts[0], &a = p.ts[1], &b = p.ts[2];
  at::Tensor da = at::empty_like(a), db = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "mp_sum_clip_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* gsp = p.ts.size() > 3 ? p.ts[3].const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* dap = da.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = db.mutable_data_ptr<scalar_t>();
    const A wa = A(p.wa), wb = A(p.wb), lim = A(p.limit);
    const bool on = p.limit > 0;
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      constexpr int64_t kRun = 256;
      A xr[kRun], gs[kRun];  // per run: x as stored, then grad_silu mp_silu'(x) (the mp_silu_backward op's loop)
      for (int64_t r0 = i0; r0 < i1; r0 += kRun) {
        const int64_t nr = std::min(kRun, i1 - r0);
        if (gsp != nullptr) {
          for (int64_t j = 0; j < nr; j++) {
            xr[j] = A(scalar_t(clip_cpu(wa * A(ap[r0 + j]) + wb * A(bp[r0 + j]), lim, on)));
            gs[j] = A(gsp[r0 + j]);
          }
          cpu::mp_silu_bwd(gs, xr, gs, nr);
        }
        for (int64_t j = 0; j < nr; j++) {
          const int64_t i = r0 + j;
          const A xs = A(scalar_t(wa * A(ap[i]) + wb * A(bp[i])));  // the sum as stored decides the clip
          A gv = A(0);
          if (!on || (xs >= -lim && xs <= lim)) gv = gsp != nullptr ? A(gp[i]) + gs[j] : A(gp[i]);
          dap[i] = scalar_t(wa * gv);
          dbp[i] = scalar_t(wb * gv);
        }
      }
    });
  });
  return {da, db};
}

// Offset of row r (= 3 c + j) of head h at pixel p of sample n in qkv (as block.cu's qkv_at).
inline int64_t qkv_at(const QkvPlan& q, int64_t n, int64_t h, int64_t r, int64_t p) {
  const int64_t c3 = 3 * q.heads * q.d;
  return q.channels_last ? (n * q.s + p) * c3 + h * 3 * q.d + r : (n * c3 + h * 3 * q.d + r) * q.s + p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_qkv_norm_cpu(const at::Tensor& qkv_in, int64_t num_heads,
                                                                      double eps) {
  const char* op = "attention_qkv_norm";
  check_cpu(qkv_in, op, "qkv");
  QkvPlan p = plan_qkv(qkv_in, num_heads, op);
  at::Tensor q = qkv_out(p), k = qkv_out(p), v = qkv_out(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.qkv.scalar_type(), "attention_qkv_norm", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = p.qkv.const_data_ptr<scalar_t>();
    scalar_t* outs[3] = {q.mutable_data_ptr<scalar_t>(), k.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>()};
    const A rsd = A(1) / std::sqrt(A(p.d)), e = A(eps);
    // One unit: (sample, pixel, head) -> the three D-vectors q, k, v.
    at::parallel_for(0, p.n * p.s * p.heads, 64, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; u++) {
        const int64_t h = u % p.heads, np = u / p.heads, px = np % p.s, n = np / p.s;
        for (int j = 0; j < 3; j++) {
          A ss = 0;
          for (int64_t c = 0; c < p.d; c++) {
            const A xv = A(x[qkv_at(p, n, h, 3 * c + j, px)]);
            ss += xv * xv;
          }
          const A s = A(1) / (e + std::sqrt(ss) * rsd);
          scalar_t* o = outs[j] + u * p.d;  // [N][S][heads][D]: unit u = (n S + px) heads + h
          for (int64_t c = 0; c < p.d; c++) o[c] = scalar_t(A(x[qkv_at(p, n, h, 3 * c + j, px)]) * s);
        }
      }
    });
  });
  return {q, k, v};
}

at::Tensor attention_qkv_norm_backward_cpu(const at::Tensor& gq_in, const at::Tensor& gk_in, const at::Tensor& gv_in,
                                           const at::Tensor& qkv_in, int64_t num_heads, double eps) {
  const char* op = "attention_qkv_norm_backward";
  check_cpu(qkv_in, op, "qkv");
  QkvPlan p = plan_qkv(qkv_in, num_heads, op);
  at::Tensor gq = qkv_grad_in(gq_in, p, "grad_q"), gk = qkv_grad_in(gk_in, p, "grad_k"),
             gv = qkv_grad_in(gv_in, p, "grad_v");
  at::Tensor gx = qkv_grad_out(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.qkv.scalar_type(), "attention_qkv_norm_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = p.qkv.const_data_ptr<scalar_t>();
    const scalar_t* gs[3] = {gq.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(),
                             gv.const_data_ptr<scalar_t>()};
    scalar_t* dx = gx.mutable_data_ptr<scalar_t>();
    const A rsd = A(1) / std::sqrt(A(p.d)), e = A(eps);
    at::parallel_for(0, p.n * p.s * p.heads, 64, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; u++) {
        const int64_t h = u % p.heads, np = u / p.heads, px = np % p.s, n = np / p.s;
        for (int j = 0; j < 3; j++) {
          const scalar_t* g = gs[j] + u * p.d;
          A ss = 0, gxd = 0;
          for (int64_t c = 0; c < p.d; c++) {
            const A xv = A(x[qkv_at(p, n, h, 3 * c + j, px)]);
            ss += xv * xv;
            gxd += A(g[c]) * xv;
          }
          const A norm = std::sqrt(ss);
          const A s = A(1) / (e + norm * rsd);
          const A kk = norm > A(0) ? gxd * s * s * rsd / norm : A(0);
          for (int64_t c = 0; c < p.d; c++) {
            const int64_t at_ = qkv_at(p, n, h, 3 * c + j, px);
            dx[at_] = scalar_t(s * A(g[c]) - kk * A(x[at_]));
          }
        }
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("mp_sum_clip", &mp_sum_clip_cpu);
  m.impl("mp_sum_clip_silu", &mp_sum_clip_silu_cpu);
  m.impl("mp_sum_clip_backward", &mp_sum_clip_backward_cpu);
  m.impl("attention_qkv_norm", &attention_qkv_norm_cpu);
  m.impl("attention_qkv_norm_backward", &attention_qkv_norm_backward_cpu);
}

}  // namespace fastdiff
