// Raw CPU inner loops on plain pointers, templated on the storage type T (double, float, c10::Half,
// c10::BFloat16) and computing in acc_t<T> (double for double, float otherwise). They know nothing of
// tensors; cpu/elementwise_cpu.cpp splits work across threads and calls them on contiguous runs. float32/16/bf16
// run the AVX-512 or AVX2 loops of elementwise_simd.h, float64 and the baseline level scalar loops, by the level of
// isa.h (the CPU's features, lowered by FASTDIFF_ISA); no global -march.
#pragma once
#include <cstdint>
#include <type_traits>

namespace fastdiff {
namespace cpu {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// y = silu(x) / 0.596, and its backward.
template <typename T> void mp_silu(const T* x, T* y, int64_t n);
template <typename T> void mp_silu_bwd(const T* g, const T* x, T* dx, int64_t n);
// y = wa * a + wb * b.
template <typename T> void axpby(const T* a, const T* b, T* y, int64_t n, double wa, double wb);
// y = w * x (y may alias x).
template <typename T> void scale(const T* x, T* y, int64_t n, double w);
// y[i] = x[i] * s[i * s_step] with a float32 (float64 for double) factor array.
template <typename T> void scale_by(const T* x, const acc_t<T>* s, int64_t s_step, T* y, int64_t n);
template <typename T> void clip(const T* x, T* y, int64_t n, float limit);
template <typename T> void clip_bwd(const T* g, const T* x, T* dx, int64_t n, float limit);
// out = mp_silu(y * m) with m[i * m_step] (m_step 0: one factor for the run, 1: per element).
template <typename T>
void modulate(const T* y, const acc_t<T>* m, int64_t m_step, T* out, int64_t n);
// dy = g * m * mp_silu'(y m); with m_step 0 returns sum(g * mp_silu'(y m) * y), with m_step 1 adds
// the per-element products into dm[i] and returns 0.
template <typename T>
acc_t<T> modulate_bwd(const T* g, const T* y, const acc_t<T>* m, int64_t m_step, T* dy,
                      acc_t<T>* dm, int64_t n);
// Reductions in acc_t.
template <typename T> acc_t<T> sumsq(const T* x, int64_t n);
template <typename T> void sumsq_dot(const T* g, const T* x, int64_t n, acc_t<T>* ss, acc_t<T>* gx);
template <typename T> void sumsq_acc(const T* x, acc_t<T>* acc, int64_t n);  // acc[i] += x[i]^2
template <typename T>
void dot_acc(const T* g, const T* x, acc_t<T>* acc, int64_t n);  // acc[i] += g[i] x[i]
// Normalization backward: dx = s * g - k * x, with s, k scalars (step 0) or arrays (step 1).
template <typename T>
void norm_bwd(const T* g, const T* x, const acc_t<T>* s, const acc_t<T>* k, int64_t step, T* dx,
              int64_t n);

}  // namespace cpu
}  // namespace fastdiff
