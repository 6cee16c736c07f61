// The Winograd per-point GEMMs (winograd_gemm.h) for AVX2 + FMA: 8-float vectors, 6 x 16 register
// blocks (12 accumulators, 2 panel vectors and a broadcast in the 16 ymm registers).
#include <immintrin.h>

#include <cstdint>

#include "winograd_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_GEMM_INLINE inline __attribute__((always_inline))
#define FD_GEMM_TABLE gemm_kernels_avx2
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
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff

#else
namespace fastdiff {
namespace cpu {
namespace winograd {
const GemmKernels* gemm_kernels_avx2() { return nullptr; }
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
#endif
