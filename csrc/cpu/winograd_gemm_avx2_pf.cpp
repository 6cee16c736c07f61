// A second AVX2 + FMA table of the GEMM micro-kernel (winograd_gemm.h), the same code as
// winograd_gemm_avx2.cpp with the software prefetch of U 32 rows ahead (FD_GEMM_PREFETCH in
// winograd_gemm.inc), for the Winograd products that stream a transformed weight too large for the
// last-level cache (winograd_tiles.h streaming_kernels). Measured on AMD Zen 2 (AVX2 its best level,
// about 14 GB/s from memory per core), 1 thread, interleaved on a loaded host: 1.2-1.7x for 576 channels
// on 16x16 and 768 on 8x8 at batch 1; but 1.3-2x slower for the 1x1 convolution (whose B rows are a
// whole feature map apart) and slightly slower for small weights, hence a table of its own.
#include <immintrin.h>

#include <cstdint>

#include "winograd_gemm.h"
#include "winograd_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#pragma GCC diagnostic ignored "-Wpsabi"
#define FD_GEMM_INLINE inline __attribute__((always_inline))
#define FD_GEMM_TABLE gemm_kernels_avx2_prefetch
#define VW 256
#define FD_GEMM_PREFETCH 32
#define MR_W 6
#define MR_H 12

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
const GemmKernels* gemm_kernels_avx2_prefetch() { return nullptr; }
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
#endif
