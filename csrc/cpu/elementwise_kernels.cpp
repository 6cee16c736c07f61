// Definitions of the raw CPU loops declared in elementwise_kernels.h. float32, float16 and bfloat16 run the
// explicitly vectorized loops of elementwise_simd.h (AVX-512 or AVX2, by active_isa()); float64, and every type at
// the baseline level (no AVX2 on the CPU, or FASTDIFF_ISA=baseline), run the scalar loops below, which
// compute the same formulas with the same limits at +-inf.
#include "elementwise_kernels.h"
#include "isa.h"
#include "elementwise_simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace fastdiff {
namespace cpu {
namespace {

constexpr double kSiluDiv = 0.596;  // A(kSiluDiv) is exact to each compute type

// Scalar e^x for float, the same reduction and polynomial as elementwise_simd.inc's vexp (see there):
// branch-free, so the baseline build can still auto-vectorize it; -inf -> 0, +inf -> +inf, NaN -> NaN.
FD_INLINE float exp_f(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float fk = t - shifter;
  int32_t k;
  std::memcpy(&k, &t, sizeof(k));
  k -= 0x4B400000;  // the bits of the shifter: what remains is round(x / ln2)
  const float r = x - fk * 0.693359375f + fk * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t k1 = k >> 1, k2 = k - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(s1));
  std::memcpy(&s2, &b2, sizeof(s2));
  return p * s1 * s2;
}
FD_INLINE double exp_f(double x) { return std::exp(x); }

// sigmoid from t = e^-|x|, which never overflows (as elementwise_simd.inc's vsigmoid).
template <typename A> FD_INLINE A sigmoid(A x) {
  const A t = exp_f(x < A(0) ? x : -x);
  return (x >= A(0) ? A(1) : t) / (A(1) + t);
}
constexpr float kInf = std::numeric_limits<float>::infinity();
// silu(x) = x sigmoid(x), with its limit 0 at x = -inf (where the product is -inf * 0).
template <typename A> FD_INLINE A silu(A x) { return x == A(-kInf) ? A(0) : x * sigmoid(x); }
// silu'(x) = s (1 + x (1 - s)), with its limits 1 at +inf and 0 at -inf.
template <typename A> FD_INLINE A silu_grad(A x) {
  A s = sigmoid(x);
  A d = s * (A(1) + x * (A(1) - s));
  d = x == A(kInf) ? A(1) : d;
  return x == A(-kInf) ? A(0) : d;
}
template <typename T> FD_INLINE acc_t<T> ld(T v) { return static_cast<acc_t<T>>(v); }

}  // namespace

template <typename T> FD_INLINE void impl_mp_silu(const T* x, T* y, int64_t n) {
  using A = acc_t<T>;
  const A inv = A(1) / A(kSiluDiv);
  for (int64_t i = 0; i < n; i++) {
    A v = ld(x[i]);
    y[i] = static_cast<T>(silu(v) * inv);
  }
}

template <typename T> FD_INLINE void impl_mp_silu_bwd(const T* g, const T* x, T* dx, int64_t n) {
  using A = acc_t<T>;
  const A inv = A(1) / A(kSiluDiv);
  for (int64_t i = 0; i < n; i++) dx[i] = static_cast<T>(ld(g[i]) * silu_grad(ld(x[i])) * inv);
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
  using A = acc_t<T>;
  const A inv = A(1) / A(kSiluDiv);
  if (m_step == 0) {
    const A f = m[0];
    for (int64_t i = 0; i < n; i++) {
      A z = ld(y[i]) * f;
      out[i] = static_cast<T>(silu(z) * inv);
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      A z = ld(y[i]) * m[i];
      out[i] = static_cast<T>(silu(z) * inv);
    }
  }
}

template <typename T> FD_INLINE acc_t<T> impl_modulate_bwd(const T* g, const T* y, const acc_t<T>* m, int64_t m_step, T* dy, acc_t<T>* dm, int64_t n) {
  using A = acc_t<T>;
  const A inv = A(1) / A(kSiluDiv);
  A total = 0;
  if (m_step == 0) {
    const A f = m[0];
    for (int64_t i = 0; i < n; i++) {
      A yv = ld(y[i]);
      A gz = ld(g[i]) * silu_grad(yv * f) * inv;
      dy[i] = static_cast<T>(gz * f);
      total += gz * yv;
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      A yv = ld(y[i]);
      A gz = ld(g[i]) * silu_grad(yv * m[i]) * inv;
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
    switch (active_isa()) {
      case Isa::kAvx512: return simd::table_avx512(dt);
      case Isa::kAvx2: return simd::table_avx2(dt);
      default: return nullptr;
    }
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
