// The GEMM micro-kernel and its products (gemm.h) for AVX-512 F: 16-float vectors, 12 x 32 register
// blocks (24 accumulators, 2 panel vectors and a broadcast in the 32 zmm registers); a column
// remainder of 16 runs 1-vector blocks, one of 8 the 8-float form.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_GEMM_TABLE gemm_kernels_avx512
#define FD_GEMM_HAVE_512 1
#define VW 512
#define FD_GEMM_PREFETCH 32
#ifndef MR_W
#define MR_W 12
#endif
#ifndef MR_H
#define MR_H 13
#endif

namespace fastdiff {
namespace cpu {
#include "gemm.inc"
}  // namespace cpu
}  // namespace fastdiff

#else
namespace fastdiff {
namespace cpu {
const GemmKernels* gemm_kernels_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace fastdiff
#endif
