// CPU kernel of fastdiff::solver_step (schema and meaning in csrc/ops.cpp): one pass over the batch
// forms the guided D, the derivative and the Euler or Heun update. float32/float16/bfloat16 run the
// vectorized loop of elementwise_simd.h (AVX-512 or AVX2, by active_isa()); float64 and the baseline level run the
// scalar loop below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../solver.h"
#include "isa.h"
#include "elementwise_simd.h"

namespace fastdiff {
namespace cpu {

template <typename T>
using solver_acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// One contiguous run of elements of a single sample. A is the accumulation type; w, the evaluation
// sigma (sigma_cur for Euler, sigma_next for a Heun correction) and h = sigma_next - sigma_cur are
// that sample's scalars.
template <typename T, bool GUIDED, bool HEUN>
void solver_run(const T* x, const T* d1, const T* d0, const T* dp, const T* xb,
                                 solver_acc_t<T> w, solver_acc_t<T> s_eval, solver_acc_t<T> h, T* xo,
                                 T* dout, T* den, int64_t len) {
  using A = solver_acc_t<T>;
  for (int64_t i = 0; i < len; i++) {
    A D;
    if (GUIDED) {
      const A g = static_cast<A>(d0[i]);
      D = g + w * (static_cast<A>(d1[i]) - g);
    } else {
      D = static_cast<A>(d1[i]);
    }
    const A xv = static_cast<A>(x[i]);
    const A d = (xv - D) / s_eval;
    A xn;
    if (HEUN)
      xn = static_cast<A>(xb[i]) + h * (A(0.5) * static_cast<A>(dp[i]) + A(0.5) * d);
    else
      xn = xv + h * d;
    xo[i] = static_cast<T>(xn);
    dout[i] = static_cast<T>(d);
    den[i] = static_cast<T>(D);
  }
}

#define FD_SOLVER_INST(T)                                                                                 \
  template void solver_run<T, false, false>(const T*, const T*, const T*, const T*, const T*,             \
                                            solver_acc_t<T>, solver_acc_t<T>, solver_acc_t<T>, T*, T*, T*, \
                                            int64_t);                                                     \
  template void solver_run<T, true, false>(const T*, const T*, const T*, const T*, const T*,              \
                                           solver_acc_t<T>, solver_acc_t<T>, solver_acc_t<T>, T*, T*, T*,  \
                                           int64_t);                                                      \
  template void solver_run<T, false, true>(const T*, const T*, const T*, const T*, const T*,              \
                                           solver_acc_t<T>, solver_acc_t<T>, solver_acc_t<T>, T*, T*, T*,  \
                                           int64_t);                                                      \
  template void solver_run<T, true, true>(const T*, const T*, const T*, const T*, const T*,               \
                                          solver_acc_t<T>, solver_acc_t<T>, solver_acc_t<T>, T*, T*, T*,   \
                                          int64_t);
FD_SOLVER_INST(float)
FD_SOLVER_INST(double)
FD_SOLVER_INST(c10::Half)
FD_SOLVER_INST(c10::BFloat16)
#undef FD_SOLVER_INST

}  // namespace cpu

namespace {

constexpr int64_t kSolverGrain = 16384;

// The vectorized loop for storage type T at the active level, or nullptr for the scalar one.
template <typename T> cpu::simd::SolverFn solver_simd(bool guided, bool heun) {
  const cpu::simd::Table* t = cpu::simd_table<T>();
  return t != nullptr ? t->solver[guided][heun] : nullptr;
}

template <typename T, bool GUIDED, bool HEUN> void solver_cpu_impl(solver::Step& s) {
  using A = cpu::solver_acc_t<T>;
  const cpu::simd::SolverFn vec = solver_simd<T>(GUIDED, HEUN);
  const T* x = s.x.const_data_ptr<T>();
  const T* d1 = s.d1.const_data_ptr<T>();
  const T* d0 = solver::ptr_or_null<T>(s.d0);
  const T* dp = solver::ptr_or_null<T>(s.d_prev);
  const T* xb = solver::ptr_or_null<T>(s.x_base);
  const A* w = s.w.const_data_ptr<A>();
  const A* sc = s.sigma_cur.const_data_ptr<A>();
  const A* sn = s.sigma_next.const_data_ptr<A>();
  T* xo = s.x_next.mutable_data_ptr<T>();
  T* dout = s.d.mutable_data_ptr<T>();
  T* den = s.denoised.mutable_data_ptr<T>();
  const int64_t m = s.m;
  at::parallel_for(0, s.n * m, kSolverGrain, [&](int64_t begin, int64_t end) {
    // Split [begin, end) at sample boundaries; each piece has one set of per-sample scalars.
    for (int64_t i = begin; i < end;) {
      const int64_t k = i / m;
      const int64_t stop = std::min(end, (k + 1) * m);
      const A s_eval = HEUN ? sn[k] : sc[k];
      if (vec != nullptr)
        vec(x + i, d1 + i, GUIDED ? d0 + i : nullptr, HEUN ? dp + i : nullptr, HEUN ? xb + i : nullptr,
            float(w[k]), float(s_eval), float(sn[k] - sc[k]), xo + i, dout + i, den + i, stop - i);
      else
        cpu::solver_run<T, GUIDED, HEUN>(x + i, d1 + i, GUIDED ? d0 + i : nullptr, HEUN ? dp + i : nullptr,
                                         HEUN ? xb + i : nullptr, w[k], s_eval, sn[k] - sc[k], xo + i,
                                         dout + i, den + i, stop - i);
      i = stop;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solver_step_cpu(
    const at::Tensor& x, const at::Tensor& d1, const std::optional<at::Tensor>& d0, const at::Tensor& w,
    const at::Tensor& sigma_cur, const at::Tensor& sigma_next, const std::optional<at::Tensor>& d_prev,
    const std::optional<at::Tensor>& x_base) {
  TORCH_CHECK(x.device().is_cpu(), "fastdiff.solver_step (CPU kernel): expected CPU tensors, got x on ",
              x.device());
  solver::Step s = solver::prepare(x, d1, d0, w, sigma_cur, sigma_next, d_prev, x_base);
  if (s.n * s.m > 0) {
    const bool guided = s.d0.defined(), heun = s.d_prev.defined();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.x.scalar_type(), "solver_step", [&] {
      if (guided && heun) solver_cpu_impl<scalar_t, true, true>(s);
      else if (guided) solver_cpu_impl<scalar_t, true, false>(s);
      else if (heun) solver_cpu_impl<scalar_t, false, true>(s);
      else solver_cpu_impl<scalar_t, false, false>(s);
    });
  }
  return {s.x_next, s.d, s.denoised};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("solver_step", &fastdiff::solver_step_cpu); }
