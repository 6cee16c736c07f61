// The loops of elementwise_simd.h for AVX-512 F/BW/VL/DQ (16 float lanes; F16C and FMA come with it). Everything
// after the #pragma is compiled for that instruction set; only standard headers and <immintrin.h> come
// before it, with plain declarations (isa.h).
// GCC 12 warns falsely about the _mm512_undefined_* inside its own intrinsics headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elementwise_simd.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"
#include "vmath.h"

namespace fastdiff {
namespace cpu {
namespace simd {
namespace {

struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static FD_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
  static FD_INLINE F load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static FD_INLINE F load(const bf16* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static FD_INLINE void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static FD_INLINE void store(f16* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // Round to nearest even on the upper 16 bits; NaN becomes the quiet NaN 0x7fc0 (as c10::BFloat16).
  static FD_INLINE void store(bf16* p, F v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }

  static FD_INLINE F set1(float v) { return _mm512_set1_ps(v); }
  static FD_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static FD_INLINE F min_(F a, F b) { return _mm512_min_ps(a, b); }
  static FD_INLINE F max_(F a, F b) { return _mm512_max_ps(a, b); }
  static FD_INLINE F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static FD_INLINE I cvt(F a) { return _mm512_cvtps_epi32(a); }
  static FD_INLINE I iset1(int v) { return _mm512_set1_epi32(v); }
  static FD_INLINE I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static FD_INLINE I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static FD_INLINE I srai(I a, int n) { return _mm512_srai_epi32(a, n); }
  static FD_INLINE I slli(I a, int n) { return _mm512_slli_epi32(a, n); }
  static FD_INLINE F as_float(I a) { return _mm512_castsi512_ps(a); }
  static FD_INLINE M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static FD_INLINE M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static FD_INLINE M le(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static FD_INLINE M mand(M a, M b) { return static_cast<M>(a & b); }
  static FD_INLINE F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static FD_INLINE bool any(M m) { return m != 0; }
  static FD_INLINE float hsum(F a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "elementwise_simd.inc"

}  // namespace

const Table* table_avx512(Dtype dt) { return table_for(dt); }

}  // namespace simd
}  // namespace cpu
}  // namespace fastdiff

#else  // not x86-64 GCC/Clang: never selected (host_isa() is the baseline there)
namespace fastdiff { namespace cpu { namespace simd {
const Table* table_avx512(Dtype) { return nullptr; }
}}}
#endif
