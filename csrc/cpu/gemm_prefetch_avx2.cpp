// The GEMM micro-kernel (gemm.h) for AVX2 + FMA a second time, with the software prefetch of the B panels
// 32 rows ahead (FD_GEMM_PREFETCH in gemm.inc): the table gemm_kernels_avx2_prefetch, which gemm.h's
// streaming_gemm_kernels picks for the Winograd products (B a transformed weight read from memory).
#include <immintrin.h>

#include <cstdint>

#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_GEMM_TABLE gemm_kernels_avx2_prefetch
#define VW 256
#define FD_GEMM_PREFETCH 32
#define MR_W 6
#define MR_H 12

namespace fastdiff {
namespace cpu {
#include "gemm.inc"
}  // namespace cpu
}  // namespace fastdiff

#else
namespace fastdiff {
namespace cpu {
const GemmKernels* gemm_kernels_avx2_prefetch() { return nullptr; }
}  // namespace cpu
}  // namespace fastdiff
#endif
