// Definitions of the raw CPU loops declared in elementwise_kernels.h. float32, float16 and bfloat16 run the
// explicitly vectorized loops of elementwise_simd.h (AVX-512 or AVX2, by active_isa()); float64, and every type at
// the baseline level (no AVX2 on the CPU, or FASTDIFF_ISA=baseline), run the scalar loops below, which
// compute the same formulas with the same limits at +-inf.
#include "elementwise_kernels.h"
#include "isa.h"
#include "elementwise_simd.h"
#include "vmath.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace fastdiff {
namespace cpu {
namespace {

template <typename T> FD_INLINE acc_t<T> ld(T v) { return static_cast<acc_t<T>>(v); }

}  // namespace

template <typename T> FD_INLINE void impl_mp_silu(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = static_cast<T>(mp_silu_scalar(ld(x[i])));
}

template <typename T> FD_INLINE void impl_mp_silu_bwd(const T* g, const T* x, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; i++) dx[i] = static_cast<T>(ld(g[i]) * mp_silu_grad_scalar(ld(x[i])));
}

template <typename T> FD_INLINE void impl_axpby(const T* a, const T* b, T* y, int64_t n, double wa, double wb) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; i++) y[i] = static_cast<T>(A(wa) * ld(a[i]) + A(wb) * ld(b[i]));
}

template <typename T> FD_INLINE void impl_scale(const T* x, T* y, int64_t n, double w) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; i++) y[i] = static_cast<T>(A(w) * ld(x[i]));
}

template <typename T> FD_INLINE void impl_scale_by(const T* x, const acc_t<T>* s, int64_t s_step, T* y, int64_t n) {
  if (s_step == 0) {
    const acc_t<T> w = s[0];
    for (int64_t i = 0; i < n; i++) y[i] = static_cast<T>(w * ld(x[i]));
  } else {
    for (int64_t i = 0; i < n; i++) y[i] = static_cast<T>(s[i] * ld(x[i]));
  }
}

template <typename T> FD_INLINE void impl_clip(const T* x, T* y, int64_t n, float limit) {
  using A = acc_t<T>;
  const A lo = -A(limit), hi = A(limit);
  for (int64_t i = 0; i < n; i++) {
    A v = ld(x[i]);
    v = v < lo ? lo : v;
    v = v > hi ? hi : v;
    y[i] = static_cast<T>(v);
  }
}

template <typename T> FD_INLINE void impl_clip_bwd(const T* g, const T* x, T* dx, int64_t n, float limit) {
  using A = acc_t<T>;
  const A lim = A(limit);
  for (int64_t i = 0; i < n; i++) {
    A v = ld(x[i]);
    dx[i] = static_cast<T>((v >= -lim && v <= lim) ? ld(g[i]) : A(0));
  }
}

template <typename T> FD_INLINE void impl_modulate(const T* y, const acc_t<T>* m, int64_t m_step, T* out, int64_t n) {
  if (m_step == 0) {
    const acc_t<T> f = m[0];
    for (int64_t i = 0; i < n; i++) out[i] = static_cast<T>(mp_silu_scalar(ld(y[i]) * f));
  } else {
    for (int64_t i = 0; i < n; i++) out[i] = static_cast<T>(mp_silu_scalar(ld(y[i]) * m[i]));
  }
}

template <typename T> FD_INLINE acc_t<T> impl_modulate_bwd(const T* g, const T* y, const acc_t<T>* m, int64_t m_step, T* dy, acc_t<T>* dm, int64_t n) {
  using A = acc_t<T>;
  A total = 0;
  if (m_step == 0) {
    const A f = m[0];
    for (int64_t i = 0; i < n; i++) {
      A yv = ld(y[i]);
      A gz = ld(g[i]) * mp_silu_grad_scalar(yv * f);
      dy[i] = static_cast<T>(gz * f);
      total += gz * yv;
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      A yv = ld(y[i]);
      A gz = ld(g[i]) * mp_silu_grad_scalar(yv * m[i]);
      dy[i] = static_cast<T>(gz * m[i]);
      dm[i] += gz * yv;
    }
  }
  return total;
}

template <typename T> FD_INLINE acc_t<T> impl_sumsq(const T* x, int64_t n) {
  acc_t<T> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; i++) s += ld(x[i]) * ld(x[i]);
  return s;
}

template <typename T> FD_INLINE void impl_sumsq_dot(const T* g, const T* x, int64_t n, acc_t<T>* ss, acc_t<T>* gx) {
  acc_t<T> a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; i++) {
    acc_t<T> xv = ld(x[i]);
    a += xv * xv;
    b += ld(g[i]) * xv;
  }
  *ss = a;
  *gx = b;
}

template <typename T> FD_INLINE void impl_sumsq_acc(const T* x, acc_t<T>* acc, int64_t n) {
  for (int64_t i = 0; i < n; i++) acc[i] += ld(x[i]) * ld(x[i]);
}

template <typename T> FD_INLINE void impl_dot_acc(const T* g, const T* x, acc_t<T>* acc, int64_t n) {
  for (int64_t i = 0; i < n; i++) acc[i] += ld(g[i]) * ld(x[i]);
}

template <typename T> FD_INLINE void impl_norm_bwd(const T* g, const T* x, const acc_t<T>* s, const acc_t<T>* k, int64_t step, T* dx, int64_t n) {
  if (step == 0) {
    const acc_t<T> s0 = s[0], k0 = k[0];
    for (int64_t i = 0; i < n; i++) dx[i] = static_cast<T>(s0 * ld(g[i]) - k0 * ld(x[i]));
  } else {
    for (int64_t i = 0; i < n; i++) dx[i] = static_cast<T>(s[i] * ld(g[i]) - k[i] * ld(x[i]));
  }
}

// The vectorized table for storage type T at the active level, or nullptr for the scalar loops.
template <typename T> const simd::Table* simd_table() {
  if constexpr (std::is_same<T, double>::value) {
    return nullptr;
  } else {
    const simd::Dtype dt = std::is_same<T, float>::value       ? simd::kF32
                           : std::is_same<T, c10::Half>::value ? simd::kF16
                                                               : simd::kBF16;
    return select_table<simd::Table>(simd::table_avx512(dt), simd::table_avx2(dt), nullptr);
  }
}

template <typename T> void mp_silu(const T* x, T* y, int64_t n) {
  if (auto* t = simd_table<T>()) return t->mp_silu(x, y, n);
  impl_mp_silu(x, y, n);
}
template <typename T> void mp_silu_bwd(const T* g, const T* x, T* dx, int64_t n) {
  if (auto* t = simd_table<T>()) return t->mp_silu_bwd(g, x, dx, n);
  impl_mp_silu_bwd(g, x, dx, n);
}
template <typename T> void axpby(const T* a, const T* b, T* y, int64_t n, double wa, double wb) {
  if (auto* t = simd_table<T>()) return t->axpby(a, b, y, n, float(wa), float(wb));
  impl_axpby(a, b, y, n, wa, wb);
}
template <typename T> void scale(const T* x, T* y, int64_t n, double w) {
  if (auto* t = simd_table<T>()) return t->scale(x, y, n, float(w));
  impl_scale(x, y, n, w);
}
template <typename T> void scale_by(const T* x, const acc_t<T>* s, int64_t s_step, T* y, int64_t n) {
  if (auto* t = simd_table<T>()) return t->scale_by(x, reinterpret_cast<const float*>(s), s_step, y, n);
  impl_scale_by(x, s, s_step, y, n);
}
template <typename T> void clip(const T* x, T* y, int64_t n, float limit) {
  if (auto* t = simd_table<T>()) return t->clip(x, y, n, limit);
  impl_clip(x, y, n, limit);
}
template <typename T> void clip_bwd(const T* g, const T* x, T* dx, int64_t n, float limit) {
  if (auto* t = simd_table<T>()) return t->clip_bwd(g, x, dx, n, limit);
  impl_clip_bwd(g, x, dx, n, limit);
}
template <typename T> void modulate(const T* y, const acc_t<T>* m, int64_t m_step, T* out, int64_t n) {
  if (auto* t = simd_table<T>()) return t->modulate(y, reinterpret_cast<const float*>(m), m_step, out, n);
  impl_modulate(y, m, m_step, out, n);
}
template <typename T>
acc_t<T> modulate_bwd(const T* g, const T* y, const acc_t<T>* m, int64_t m_step, T* dy, acc_t<T>* dm, int64_t n) {
  if (auto* t = simd_table<T>())
    return t->modulate_bwd(g, y, reinterpret_cast<const float*>(m), m_step, dy, reinterpret_cast<float*>(dm), n);
  return impl_modulate_bwd(g, y, m, m_step, dy, dm, n);
}
template <typename T> acc_t<T> sumsq(const T* x, int64_t n) {
  if (auto* t = simd_table<T>()) return t->sumsq(x, n);
  return impl_sumsq(x, n);
}
template <typename T> void sumsq_dot(const T* g, const T* x, int64_t n, acc_t<T>* ss, acc_t<T>* gx) {
  if (auto* t = simd_table<T>())
    return t->sumsq_dot(g, x, n, reinterpret_cast<float*>(ss), reinterpret_cast<float*>(gx));
  impl_sumsq_dot(g, x, n, ss, gx);
}
template <typename T> void sumsq_acc(const T* x, acc_t<T>* acc, int64_t n) {
  if (auto* t = simd_table<T>()) return t->sumsq_acc(x, reinterpret_cast<float*>(acc), n);
  impl_sumsq_acc(x, acc, n);
}
template <typename T> void dot_acc(const T* g, const T* x, acc_t<T>* acc, int64_t n) {
  if (auto* t = simd_table<T>()) return t->dot_acc(g, x, reinterpret_cast<float*>(acc), n);
  impl_dot_acc(g, x, acc, n);
}
template <typename T>
void norm_bwd(const T* g, const T* x, const acc_t<T>* s, const acc_t<T>* k, int64_t step, T* dx, int64_t n) {
  if (auto* t = simd_table<T>())
    return t->norm_bwd(g, x, reinterpret_cast<const float*>(s), reinterpret_cast<const float*>(k), step, dx, n);
  impl_norm_bwd(g, x, s, k, step, dx, n);
}

#define FD_INSTANTIATE(T)                                                                        \
  template const simd::Table* simd_table<T>();                                                   \
  template void mp_silu<T>(const T*, T*, int64_t);                                               \
  template void mp_silu_bwd<T>(const T*, const T*, T*, int64_t);                                 \
  template void axpby<T>(const T*, const T*, T*, int64_t, double, double);                        \
  template void scale<T>(const T*, T*, int64_t, double);                                          \
  template void scale_by<T>(const T*, const acc_t<T>*, int64_t, T*, int64_t);                    \
  template void clip<T>(const T*, T*, int64_t, float);                                           \
  template void clip_bwd<T>(const T*, const T*, T*, int64_t, float);                             \
  template void modulate<T>(const T*, const acc_t<T>*, int64_t, T*, int64_t);                    \
  template acc_t<T> modulate_bwd<T>(const T*, const T*, const acc_t<T>*, int64_t, T*, acc_t<T>*, \
                                    int64_t);                                                    \
  template acc_t<T> sumsq<T>(const T*, int64_t);                                                 \
  template void sumsq_dot<T>(const T*, const T*, int64_t, acc_t<T>*, acc_t<T>*);                 \
  template void sumsq_acc<T>(const T*, acc_t<T>*, int64_t);                                      \
  template void dot_acc<T>(const T*, const T*, acc_t<T>*, int64_t);                              \
  template void norm_bwd<T>(const T*, const T*, const acc_t<T>*, const acc_t<T>*, int64_t, T*,   \
                            int64_t);

FD_INSTANTIATE(double)
FD_INSTANTIATE(float)
FD_INSTANTIATE(c10::Half)
FD_INSTANTIATE(c10::BFloat16)

}  // namespace cpu
}  // namespace fastdiff
