// Definitions of the raw CPU loops declared in kernels.h. Only light headers here: this file is the
// hot code, compiled once per instruction set by target_clones.
#include "kernels.h"
#include "isa.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>


namespace fastdiff {
namespace cpu {
namespace {

constexpr double kSiluDiv = 0.596;  // A(kSiluDiv) is exact to each compute type

// exp for float that the compiler can vectorize (no branches, no libm call): range reduction
// x = k ln2 + r with k rounded by the 1.5*2^23 shifter trick, Cody-Waite split of ln2, a degree-6
// polynomial for e^r on [-ln2/2, ln2/2] (Cephes coefficients), and 2^k built in the exponent bits.
// Relative error about 2e-7 on the clamped range [-87, 88].
FD_INLINE float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;
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
  const int32_t bits = (k + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}
FD_INLINE double exp_f(double x) { return std::exp(x); }

template <typename A> FD_INLINE A sigmoid(A x) { return A(1) / (A(1) + exp_f(-x)); }
template <typename A> FD_INLINE A silu_grad(A x) {
  A s = sigmoid(x);
  return s * (A(1) + x * (A(1) - s));
}
template <typename T> FD_INLINE acc_t<T> ld(T v) { return static_cast<acc_t<T>>(v); }

}  // namespace

template <typename T> FD_INLINE void impl_mp_silu(const T* x, T* y, int64_t n) {
  using A = acc_t<T>;
  const A inv = A(1) / A(kSiluDiv);
  for (int64_t i = 0; i < n; i++) {
    A v = ld(x[i]);
    y[i] = static_cast<T>(v * sigmoid(v) * inv);
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
      out[i] = static_cast<T>(z * sigmoid(z) * inv);
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      A z = ld(y[i]) * m[i];
      out[i] = static_cast<T>(z * sigmoid(z) * inv);
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

FD_MULTIVERSION(void, mp_silu, impl_mp_silu, (const T* x, T* y, int64_t n), (x, y, n))
FD_MULTIVERSION(void, mp_silu_bwd, impl_mp_silu_bwd, (const T* g, const T* x, T* dx, int64_t n), (g, x, dx, n))
FD_MULTIVERSION(void, axpby, impl_axpby, (const T* a, const T* b, T* y, int64_t n, double wa, double wb), (a, b, y, n, wa, wb))
FD_MULTIVERSION(void, scale, impl_scale, (const T* x, T* y, int64_t n, double w), (x, y, n, w))
FD_MULTIVERSION(void, scale_by, impl_scale_by, (const T* x, const acc_t<T>* s, int64_t s_step, T* y, int64_t n), (x, s, s_step, y, n))
FD_MULTIVERSION(void, clip, impl_clip, (const T* x, T* y, int64_t n, float limit), (x, y, n, limit))
FD_MULTIVERSION(void, clip_bwd, impl_clip_bwd, (const T* g, const T* x, T* dx, int64_t n, float limit), (g, x, dx, n, limit))
FD_MULTIVERSION(void, modulate, impl_modulate, (const T* y, const acc_t<T>* m, int64_t m_step, T* out, int64_t n), (y, m, m_step, out, n))
FD_MULTIVERSION(acc_t<T>, modulate_bwd, impl_modulate_bwd, (const T* g, const T* y, const acc_t<T>* m, int64_t m_step, T* dy, acc_t<T>* dm, int64_t n), (g, y, m, m_step, dy, dm, n))
FD_MULTIVERSION(acc_t<T>, sumsq, impl_sumsq, (const T* x, int64_t n), (x, n))
FD_MULTIVERSION(void, sumsq_dot, impl_sumsq_dot, (const T* g, const T* x, int64_t n, acc_t<T>* ss, acc_t<T>* gx), (g, x, n, ss, gx))
FD_MULTIVERSION(void, sumsq_acc, impl_sumsq_acc, (const T* x, acc_t<T>* acc, int64_t n), (x, acc, n))
FD_MULTIVERSION(void, dot_acc, impl_dot_acc, (const T* g, const T* x, acc_t<T>* acc, int64_t n), (g, x, acc, n))
FD_MULTIVERSION(void, norm_bwd, impl_norm_bwd, (const T* g, const T* x, const acc_t<T>* s, const acc_t<T>* k, int64_t step, T* dx, int64_t n), (g, x, s, k, step, dx, n))

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
