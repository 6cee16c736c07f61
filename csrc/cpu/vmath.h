// e^x, the sigmoid, mp_silu and its derivative, written once for every CPU kernel family and every
// instruction set, against a vector policy V (see isa.h for the per-ISA units that compile them).
//
// The vector style of csrc/cpu: GCC vector-extension types with C operators for arithmetic (__m256 and
// __m512 are such types, so intrinsics and operators mix freely); a policy struct V supplies only what
// operators cannot say, with x86 semantics throughout:
//   F, I, M             float (or double) vector, int32 vector, lane mask; W lanes
//   set1, fma(a, b, c) = a*b + c (one rounding where the target has FMA), min_(a, b) / max_(a, b) (b when
//   a operand is NaN), round (to nearest even), cvt (integral float -> int), iadd, isub, srai, slli,
//   iset1, as_float (bit cast), eq, ge, le, mand, select(m, a, b) (a where m)
// The intrinsics policies (AVX2, AVX-512) live in elementwise_simd_{avx2,avx512}.cpp; Portable<F, I>
// below serves plain float / double (the scalar twins) and GCC vectors of any width (the baseline build
// and the loops written on generic vectors).
//
// This header has internal linkage (an anonymous namespace): include it after the unit's
// `#pragma GCC target`, with <cmath>, <cstdint> and <cstring> already included before the pragma.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"

// Vector-typed helpers are always inlined, so the ABI note about passing AVX vectors does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wignored-attributes"  // __m256 / __m512 as template arguments

namespace fastdiff {
namespace cpu {
namespace {

constexpr double kSiluDiv = 0.596;                              // mp_silu(x) = silu(x) / 0.596
constexpr float kInvSiluDiv = static_cast<float>(1.0 / kSiluDiv);

// Policy for plain scalars and GCC vector types: F = float / double or a vector of them, I the integer
// type of the same shape. fma is a*b + c, contracted to one instruction where the target has FMA.
template <typename FT, typename IT> struct Portable {
  using F = FT;
  using I = IT;
  using M = decltype(FT{} == FT{});
  static FD_INLINE F set1(float v) { return F{} + v; }
  static FD_INLINE F fma(F a, F b, F c) { return a * b + c; }
  static FD_INLINE F min_(F a, F b) { return a < b ? a : b; }
  static FD_INLINE F max_(F a, F b) { return a > b ? a : b; }
  static FD_INLINE F round(F a) {  // adding and taking back 1.5 * 2^23 rounds to nearest even (|a| < 2^22)
    const F shifter = set1(12582912.0f);
    return (a + shifter) - shifter;
  }
  static FD_INLINE I cvt(F a) {
    if constexpr (std::is_arithmetic<F>::value) return static_cast<I>(a);
    else return __builtin_convertvector(a, I);
  }
  static FD_INLINE I iset1(int v) { return I{} + v; }
  static FD_INLINE I iadd(I a, I b) { return a + b; }
  static FD_INLINE I isub(I a, I b) { return a - b; }
  static FD_INLINE I srai(I a, int n) { return a >> n; }
  static FD_INLINE I slli(I a, int n) { return a << n; }
  static FD_INLINE F as_float(I a) {
    F f;
    std::memcpy(&f, &a, sizeof(f));
    return f;
  }
  static FD_INLINE M eq(F a, F b) { return a == b; }
  static FD_INLINE M ge(F a, F b) { return a >= b; }
  static FD_INLINE M le(F a, F b) { return a <= b; }
  static FD_INLINE M mand(M a, M b) { return a & b; }
  static FD_INLINE F select(M m, F a, F b) { return m ? a : b; }
  static FD_INLINE bool any(M m) {
    if constexpr (std::is_arithmetic<F>::value) {
      return m;
    } else {
      uint64_t w[sizeof(M) / 8], acc = 0;
      std::memcpy(w, &m, sizeof(M));
      for (int i = 0; i < int(sizeof(M) / 8); i++) acc |= w[i];
      return acc != 0;
    }
  }
};

// The float lane type of F (F itself for a scalar).
template <typename F> struct lane_of {
  using type = std::remove_cvref_t<decltype(F{}[0])>;
};
template <> struct lane_of<float> { using type = float; };
template <> struct lane_of<double> { using type = double; };

// e^x in float32: x = k ln2 + r with k = round(x / ln2), r by a two-constant Cody-Waite reduction
// (0.693359375 has 9 significant bits, so k * it is exact for |k| <= 150), e^r on [-ln2/2, ln2/2] by the
// degree-7 minimax form 1 + r + r^2 P(r) (Cephes' expf coefficients), then 2^k applied as two factors
// 2^(k/2) 2^(k - k/2), each a normal float, so results down to the subnormal range (x > -103.97) and up to
// overflow (x > 88.72 gives +inf) come out right. Clamping x to [-104, 89] first keeps k in range;
// -inf gives 0, +inf gives +inf, NaN stays NaN (the clamps pass a NaN operand through). About 1 ulp.
// kSubnormal false: for callers that never need e^x below e^-87 (vmp_silu_above_floor): x is clamped to -87
// instead and 2^k applied as one factor (k <= 127 then; x above 88.72 must not reach it).
// float64 lanes use std::exp lane by lane.
template <typename V, bool kSubnormal = true> FD_INLINE typename V::F vexp(typename V::F x) {
  using F = typename V::F;
  if constexpr (std::is_same<typename lane_of<F>::type, double>::value) {
    if constexpr (std::is_arithmetic<F>::value) {
      return std::exp(x);
    } else {
      F out;
      for (int i = 0; i < int(sizeof(F) / sizeof(double)); i++) out[i] = std::exp(x[i]);
      return out;
    }
  } else {
    using I = typename V::I;
    x = V::max_(V::set1(kSubnormal ? -104.0f : -87.0f), x);
    x = V::min_(V::set1(89.0f), x);
    const F kf = V::round(x * V::set1(1.44269504088896341f));
    F r = V::fma(kf, V::set1(-0.693359375f), x);
    r = V::fma(kf, V::set1(2.12194440e-4f), r);
    F p = V::set1(1.9875691500e-4f);
    p = V::fma(p, r, V::set1(1.3981999507e-3f));
    p = V::fma(p, r, V::set1(8.3334519073e-3f));
    p = V::fma(p, r, V::set1(4.1665795894e-2f));
    p = V::fma(p, r, V::set1(1.6666665459e-1f));
    p = V::fma(p, r, V::set1(5.0000001201e-1f));
    p = V::fma(p, r * r, r + V::set1(1.0f));
    const I k = V::cvt(kf);
    if constexpr (!kSubnormal) return p * V::as_float(V::slli(V::iadd(k, V::iset1(127)), 23));
    const I k1 = V::srai(k, 1);
    const I k2 = V::isub(k, k1);
    const F s1 = V::as_float(V::slli(V::iadd(k1, V::iset1(127)), 23));
    const F s2 = V::as_float(V::slli(V::iadd(k2, V::iset1(127)), 23));
    return (p * s1) * s2;
  }
}

// sigmoid(x) from t = e^-|x| (never overflows): 1 / (1 + t) for x >= 0, t / (1 + t) for x < 0, so that
// silu keeps its tiny values for x down to about -104 instead of dividing by an overflowed e^-x.
template <typename V> FD_INLINE typename V::F vsigmoid(typename V::F x) {
  using F = typename V::F;
  const F one = V::set1(1.0f), zero = V::set1(0.0f);
  const F t = vexp<V>(V::min_(x, zero - x));  // e^-|x|; NaN stays NaN
  return V::select(V::ge(x, zero), one, t) / (one + t);
}

// The factor 1 / 0.596 in the lanes' precision.
template <typename V> FD_INLINE typename V::F vinv_silu_div() {
  using L = typename lane_of<typename V::F>::type;
  return typename V::F{} + (std::is_same<L, double>::value ? L(1) / L(kSiluDiv) : L(kInvSiluDiv));
}

// mp_silu(x) = silu(x) / 0.596 = x sigmoid(x) / 0.596; the limit 0 at x = -inf (where the product is
// -inf * 0).
// Below this, e^-x may overflow and silu(x) = x e^x / (1 + e^x) is subnormal: vmp_silu's careful form.
constexpr float kSiluFastFloor = -87.0f;

// mp_silu(x) = x / ((1 + e^-x) 0.596) for lanes all above kSiluFastFloor (or NaN, which stays NaN): e^-x is
// finite there, so no limit needs care. About 3 ulp.
template <typename V> FD_INLINE typename V::F vmp_silu_above_floor(typename V::F x) {
  using F = typename V::F;
  return (x * vinv_silu_div<V>()) / (vexp<V, false>(F{} - x) + V::set1(1.0f));
}

// mp_silu for the fused epilogues of the convolutions: vmp_silu_above_floor of max(x, kSiluFastFloor), so no
// branch at all: the same values as vmp_silu above -87, and below it (-inf included) the value at -87,
// -2.4e-36, instead of the subnormal tail (an absolute difference under 2.4e-36). NaN stays NaN.
template <typename V> FD_INLINE typename V::F vmp_silu_floored(typename V::F x) {
  return vmp_silu_above_floor<V>(V::max_(V::set1(kSiluFastFloor), x));
}

// Whether any lane of x is at or below kSiluFastFloor (then vmp_silu takes its careful form).
template <typename V> FD_INLINE bool silu_needs_tail(typename V::F x) {
  return V::any(V::le(x, V::set1(kSiluFastFloor)));
}

// mp_silu(x) = silu(x) / 0.596 = x sigmoid(x) / 0.596: vmp_silu_above_floor where every lane allows it (the
// common case), else x sigmoid(x) with sigmoid from e^-|x|, which keeps the subnormal values of silu down
// to x = -104 and the limit 0 at x = -inf (where the product is -inf * 0).
template <typename V> FD_INLINE typename V::F vmp_silu(typename V::F x) {
  using F = typename V::F;
  if (!silu_needs_tail<V>(x)) return vmp_silu_above_floor<V>(x);
  const F y = (x * vsigmoid<V>(x)) * vinv_silu_div<V>();
  return V::select(V::eq(x, F{} - INFINITY), F{}, y);
}

// mp_silu'(x) = s (1 + x (1 - s)) / 0.596 with s = sigmoid(x); the limits 1/0.596 at +inf, 0 at -inf.
template <typename V> FD_INLINE typename V::F vmp_silu_grad(typename V::F x) {
  using F = typename V::F;
  const F one = V::set1(1.0f), inv = vinv_silu_div<V>();
  const F s = vsigmoid<V>(x);
  F d = (s * V::fma(x, one - s, one)) * inv;
  d = V::select(V::eq(x, F{} + INFINITY), inv, d);
  return V::select(V::eq(x, F{} - INFINITY), F{}, d);
}

// The scalar twins (the baseline and float64 loops): the same formulas on one value.
using ScalarF = Portable<float, int32_t>;
using ScalarD = Portable<double, int64_t>;
FD_INLINE float mp_silu_scalar(float x) { return vmp_silu<ScalarF>(x); }
FD_INLINE double mp_silu_scalar(double x) { return vmp_silu<ScalarD>(x); }
FD_INLINE float mp_silu_grad_scalar(float x) { return vmp_silu_grad<ScalarF>(x); }
FD_INLINE double mp_silu_grad_scalar(double x) { return vmp_silu_grad<ScalarD>(x); }

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
