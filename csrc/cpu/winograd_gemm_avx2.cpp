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
// Software prefetch of U 32 rows ahead (winograd_gemm.inc): on AMD Zen 2 (AVX2 its best level; 14 GB/s
// from memory per core), 1 thread, interleaved on a loaded host, 1.2-1.7x for the batch-1 products that
// stream a large transformed weight (576 channels on 16x16, 768 on 8x8), neutral elsewhere; on AMD Zen 4
// forced to AVX2 it measured a loss, but there the AVX-512 table runs.
#define FD_GEMM_PREFETCH 32
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
