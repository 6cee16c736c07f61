// The Winograd per-point GEMMs (winograd_gemm.h) for AVX2 + FMA: 8-float vectors, 6 x 16 register
// blocks (12 accumulators, 2 panel vectors and a broadcast in the 16 ymm registers).
#include <immintrin.h>

#include <cstdint>

#include "winograd_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_GEMM_INLINE inline __attribute__((always_inline))
#define FD_GEMM_NAME point_gemms_avx2
#define FD_GEMM_WGRAD_NAME point_gemms_wgrad_avx2
#define FD_GEMM_PLAIN_NAME gemm_avx2
#define VW 256
#ifndef MR_W
#define MR_W 6
#endif
#ifndef MR_H
#define MR_H 12
#endif

namespace fastdiff {
namespace cpu {
namespace winograd {
#include "winograd_gemm.inc"
bool have_point_gemms_avx2() { return true; }
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff

#else
namespace fastdiff {
namespace cpu {
namespace winograd {
void point_gemms_avx2(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t) {}
void point_gemms_wgrad_avx2(const float*, const float*, float*, int64_t, int64_t, int64_t) {}
void gemm_avx2(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t) {}
bool have_point_gemms_avx2() { return false; }
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
#endif
