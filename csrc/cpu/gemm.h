// The register-blocked FMA GEMM micro-kernel (float32) and the products built on it: the 36 per-point
// products of the Winograd convolution, M[k] = V[k] @ U[k] (k = 0 .. 35), those of its weight gradient,
// and the plain product of the 1x1 convolution (conv1x1_cpu.cpp). One translation unit per instruction
// set (isa.h): gemm_avx2.cpp (8-float vectors) and gemm_avx512.cpp (16-float vectors), each including
// gemm.inc once after its `#pragma GCC target`. Winograd layouts (winograd_kernels.h): V [nt][36][cinp],
// U [36][ns][cinp][32] (panels of 32 output channels), M [nt][36][coutp]; cinp and coutp are multiples
// of winograd::kLanes.
//
// Why not ATen's bmm: at EDM2 shapes (tens of tiles per chunk, 64-768 channels) the BLAS packs both
// operands and zero-fills the output for each of the 36 small products; here U[k]'s panels are read in
// place (U is stored as the B panels) and each output block is written once.
#pragma once
#include <cstdint>

#include "isa.h"

namespace fastdiff {
namespace cpu {

// The kernels of one instruction set. Layouts of winograd_kernels.h throughout.
struct GemmKernels {
  // M[:, k] = V[:, k] U[k] for the nt tiles of a chunk, output columns [n0, n1) of [0, coutp) (n0 a
  // multiple of 32, n1 of 8), so that threads can share one chunk's products.
  void (*point)(const float* v, const float* u, float* m, int64_t nt, int64_t cinp, int64_t coutp, int64_t n0,
                int64_t n1);
  // The weight gradient's products dU[k] += V[:, k]^T Gt[:, k] for points k in [k0, k1) (sum over the nt
  // tiles; Gt [nt][36][coutp] the output gradient's transform A g A^T, dU [36][cinp][coutp] in place).
  void (*wgrad)(const float* v, const float* gt, float* du, int64_t nt, int64_t cinp, int64_t coutp, int64_t k0,
                int64_t k1);
  // One plain product C[m][n] = A[m][k] B[k][n] (row-major, leading dimensions lda / ldb / ldc; n a
  // multiple of 8): the 1x1 MP convolution (conv1x1_cpu.cpp), y[i] = W x[i] per sample.
  void (*plain)(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                int64_t n, int64_t k);
};

// Each translation unit's table, or null where the compiler could not build it.
const GemmKernels* gemm_kernels_avx2();
const GemmKernels* gemm_kernels_avx512();

// The table of the active instruction set (isa.h), or null below AVX2 (callers then use ATen's BLAS).
inline const GemmKernels* gemm_kernels() {
  return select_table<GemmKernels>(gemm_kernels_avx512(), gemm_kernels_avx2(), nullptr);
}

// A second AVX2 table with software prefetch of the B panels 32 rows ahead (gemm_prefetch_avx2.cpp), or
// null where not built: for the Winograd products, whose B (a transformed weight) comes from memory on each
// call. Measured on AMD Zen 2 (AVX2 its best level, about 14 GB/s from memory per core), 1 thread: 1.2-1.7x
// for 576 channels on 16x16 and 768 on 8x8 at batch 1, 1.1-1.3x for 128-256 channels' cold weights, the
// same for cache-resident ones; but 1.3-2x slower for the 1x1 convolution (whose B rows are a whole feature
// map apart), hence a table of its own.
const GemmKernels* gemm_kernels_avx2_prefetch();

// The kernels for products that stream B from memory: the prefetching AVX2 table
// when AVX2 is the active level (the AVX-512 table prefetches already), else gemm_kernels().
inline const GemmKernels* streaming_gemm_kernels() {
  const GemmKernels* pf = gemm_kernels_avx2_prefetch();
  return active_isa() == Isa::kAvx2 && pf != nullptr ? pf : gemm_kernels();
}

}  // namespace cpu
}  // namespace fastdiff
