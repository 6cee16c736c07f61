// The loops of elementwise_simd.h for AVX2 + FMA + F16C (8 float lanes). Everything after the #pragma is compiled
// for that instruction set; only standard headers, <immintrin.h> and plain declarations come before it
// (isa.h).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elementwise_simd.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
#include "vmath.h"

namespace fastdiff {
namespace cpu {
namespace simd {
namespace {

struct V {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;

  static FD_INLINE F load(const float* p) { return _mm256_loadu_ps(p); }
  static FD_INLINE F load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static FD_INLINE F load(const bf16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
  static FD_INLINE void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static FD_INLINE void store(f16* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Round to nearest even on the upper 16 bits; NaN becomes the quiet NaN 0x7fc0 (as c10::BFloat16).
  static FD_INLINE void store(bf16* p, F v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }

  static FD_INLINE F set1(float v) { return _mm256_set1_ps(v); }
  static FD_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static FD_INLINE F min_(F a, F b) { return _mm256_min_ps(a, b); }
  static FD_INLINE F max_(F a, F b) { return _mm256_max_ps(a, b); }
  static FD_INLINE F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static FD_INLINE I cvt(F a) { return _mm256_cvtps_epi32(a); }
  static FD_INLINE I iset1(int v) { return _mm256_set1_epi32(v); }
  static FD_INLINE I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static FD_INLINE I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static FD_INLINE I srai(I a, int n) { return _mm256_srai_epi32(a, n); }
  static FD_INLINE I slli(I a, int n) { return _mm256_slli_epi32(a, n); }
  static FD_INLINE F as_float(I a) { return _mm256_castsi256_ps(a); }
  static FD_INLINE M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static FD_INLINE M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static FD_INLINE M le(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static FD_INLINE M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static FD_INLINE F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static FD_INLINE bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static FD_INLINE float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "elementwise_simd.inc"

}  // namespace

const Table* table_avx2(Dtype dt) { return table_for(dt); }

}  // namespace simd
}  // namespace cpu
}  // namespace fastdiff

#else  // not x86-64 GCC/Clang: never selected (host_isa() is the baseline there)
namespace fastdiff { namespace cpu { namespace simd {
const Table* table_avx2(Dtype) { return nullptr; }
}}}
#endif
