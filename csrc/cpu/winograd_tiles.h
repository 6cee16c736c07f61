// The other Winograd tile sizes beside F(4x4, 3x3) (winograd.h): F(2x2, 3x3) (4x4 input patches, 16
// points) and F(6x6, 3x3) (8x8 patches, 64 points), Lavin & Gray 2016, Sec. 4 (Eq. 9 nested in 2-D).
// Same layouts as winograd.h with P = (m + 2)^2 points instead of 36 for an m x m output tile:
//   xt  [N][hp][wp][cp]  hp = m th + 2, wp = m tw + 2 (th, tw: tiles per column / row, ceil(h / m))
//   V   [tiles][P][cinp], U [P][ns][cinp][32], M [tiles][P][coutp].
// Why more than one: at batch 1 the small maps (8x8: 4 tiles of 4x4) read the whole transformed weight
// (P / 9 times the 3x3 weight) from memory for a few tiles' products, so F(2x2)'s 16 points beat
// F(4x4)'s 36 there; on large maps F(6x6) does 21% fewer multiplies per output than F(4x4).
// The forward only (the training path stays on F(4x4)); winograd.cpp runs these by U's point count.
#pragma once
#include <cstdint>

#include "winograd.h"
#include "winograd_gemm.h"

namespace fastdiff {
namespace cpu {
namespace winograd {

// Output tile side of a U with `points` points: 2 (16), 4 (36) or 6 (64); 0 for anything else.
inline int64_t tile_of_points(int64_t points) {
  return points == 16 ? 2 : points == 36 ? 4 : points == 64 ? 6 : 0;
}

// The transforms of winograd.h for an m x m tile (m = 2 or 6; m = 4 runs winograd.h's own).
template <typename T>
void tile_input_transform(int m, const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v);
template <typename T>
void tile_output_transform(int m, const T* mm, const Geometry& g, int64_t t0, int64_t ta, int64_t tb,
                           const Epilogue<T>& ep, bool channels_last, T* y);
template <typename T> void tile_weight_transform(int m, const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1);

// The AVX2 table with software prefetch of U (winograd_gemm_avx2_pf.cpp), or null where not built.
const GemmKernels* gemm_kernels_avx2_prefetch();
// The kernels for products that stream a transformed weight larger than the last-level cache: the
// prefetching AVX2 table when AVX2 is the active level (the AVX-512 table prefetches already), else
// gemm_kernels().
const GemmKernels* streaming_kernels();

// M[:, k] = V[:, k] U[k] for the P points (float32 on `kern`'s plain product), columns [n0, n1).
void tile_point_gemms(const GemmKernels* kern, int64_t points, const float* v, const float* u, float* m, int64_t nt,
                      int64_t cinp, int64_t coutp, int64_t n0, int64_t n1);

}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
