// Raw loops of the Winograd F(4x4, 3x3) convolution (Lavin & Gray 2016, "Fast Algorithms for
// Convolutional Neural Networks", Sec. 4): Y = A^T [ (G g G^T) . (B^T d B) ] A per 4x4 output tile,
// 6x6 input patch d, 3x3 filter g, 36 points per tile. The per-point products are GEMMs that the caller
// (winograd_cpu.cpp) runs on gemm.h's micro-kernel; these loops are the transforms, written on
// 32-byte vectors over channels (8 floats or 4 doubles) in winograd_kernels.inc and compiled per
// instruction set into a table (TransformKernels below; isa.h): AVX2 + FMA and the baseline. The
// functions below call the active one.
//
// Layouts (channel counts padded to a multiple of kLanes with zeros):
//   xt  [N][hp][wp][cp]          the input, zero-padded by one pixel (and up to whole tiles), NHWC
//   V   [tiles][36][cinp]        input transform of a chunk of tiles (t - t0), a tile's points together
//   U   [36][ns][cinp][32]       weight transform in panels of 32 output channels (ns = strips(coutp),
//                                columns past coutp zero): each GEMM panel is one contiguous stream
//   M   [tiles][36][coutp]       M[:, k] = V[:, k] @ U[k] (rows 36 cinp / 36 coutp apart)
#pragma once
#include <cstdint>

#include "isa.h"

namespace fastdiff {
namespace cpu {
namespace winograd {

constexpr int64_t kLanes = 8;  // channel padding unit (a multiple of the lanes of every vector type)

inline int64_t round_up(int64_t c) { return (c + kLanes - 1) / kLanes * kLanes; }

// U is stored in strips of kStrip output channels (the micro-kernel's widest column block), so that the
// panel a column strip of the GEMM reads is contiguous; read cold at batch 1, that streamed 1.3-2x
// faster than rows of the whole [cinp][coutp] matrix (AMD Zen 4).
constexpr int64_t kStrip = 32;
inline int64_t strips(int64_t coutp) { return (coutp + kStrip - 1) / kStrip; }

struct Geometry {
  int64_t n, h, w;  // batch and spatial size of input and output
  int64_t th, tw;   // tiles per column / row: ceil(h / 4), ceil(w / 4)
  int64_t hp, wp;   // padded input: 4 th + 2, 4 tw + 2
  int64_t cin, cinp, cout, coutp;
  int64_t tiles() const { return n * th * tw; }
};

// What follows the convolution in the output transform, per output element (n, o, p):
//   y = conv * scale[o];  if mod: y = mp_silu(y * mod[n * coutp + o]);
//   if res: y = wa * res + wb * y;  if clip > 0: y = clamp(y, -clip, clip).
template <typename T> struct Epilogue {
  const T* scale = nullptr;  // [coutp]
  const T* mod = nullptr;    // [N][coutp] (the factor 1 + c), or null
  const T* res = nullptr;    // residual in the output's layout, or null
  T wa = 0, wb = 1, clip = 0;
};

// One instruction set's transforms (the meaning of each: the function of the same name below).
template <typename T> struct TransformKernels {
  void (*pack_input)(const T* x, bool channels_last, bool silu, const Geometry& g, T* xt, int64_t r0, int64_t r1);
  void (*input_transform)(const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v);
  void (*output_transform)(const T* m, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, const Epilogue<T>& ep,
                           bool channels_last, T* y);
  void (*weight_transform)(const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1);
  void (*grad_transform)(const T* gp, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* gt);
  void (*weight_grad_transform)(const T* du, const Geometry& g, T* dw, int64_t c0, int64_t c1);
  void (*tile_input_transform)(int m, const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v);
  void (*tile_output_transform)(int m, const T* mm, const Geometry& g, int64_t t0, int64_t ta, int64_t tb,
                                const Epilogue<T>& ep, bool channels_last, T* y);
  void (*tile_weight_transform)(int m, const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1);
};

// The per-ISA tables (winograd_kernels_avx2.cpp, winograd_kernels_baseline.cpp; the AVX2 one null where
// the compiler could not build it), and the active one.
template <typename T> const TransformKernels<T>* transform_kernels_avx2();
template <typename T> const TransformKernels<T>* transform_kernels_baseline();
template <typename T> const TransformKernels<T>* transform_kernels() {
  return select_table<TransformKernels<T>>(nullptr, transform_kernels_avx2<T>(), transform_kernels_baseline<T>());
}

// Rows [r0, r1) of the N * hp rows of xt from x ([N, C, H, W] channels-first, or channels-last),
// applying mp_silu when `silu`.
template <typename T>
void pack_input(const T* x, bool channels_last, bool silu, const Geometry& g, T* xt, int64_t r0, int64_t r1) {
  transform_kernels<T>()->pack_input(x, channels_last, silu, g, xt, r0, r1);
}
// V[t - t0][k][:] for tiles t in [ta, tb), tile index t = (n * th + ty) * tw + tx.
template <typename T>
void input_transform(const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v) {
  transform_kernels<T>()->input_transform(xt, g, t0, ta, tb, v);
}
// Output elements of tiles [ta, tb) from M (rows t - t0), through the epilogue, into y.
template <typename T>
void output_transform(const T* m, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, const Epilogue<T>& ep,
                      bool channels_last, T* y) {
  transform_kernels<T>()->output_transform(m, g, t0, ta, tb, ep, channels_last, y);
}
// U from w [cout][cin][3][3] (contiguous) for padded input channels [c0, c1) of [0, cinp) (rows past cin
// and columns past cout, up to whole strips, written as zeros).
template <typename T> void weight_transform(const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1) {
  transform_kernels<T>()->weight_transform(w, g, u, c0, c1);
}

// The weight gradient (Lavin & Gray 2016, Sec. 5: the same algorithm on the transposed problem): with
// Gt = A g A^T the 6x6 transform of each 4x4 tile of the output gradient g and V the input's transform,
// dU[k] = sum over tiles of V[:, k]^T Gt[:, k] and dW = G^T dU G.
// Gt[t - t0][k][:] for tiles [ta, tb) from the output gradient packed like xt (pack_input with the
// output's channels: [N][hp][wp][coutp], one pixel of zeros in front).
template <typename T>
void grad_transform(const T* gp, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* gt) {
  transform_kernels<T>()->grad_transform(gp, g, t0, ta, tb, gt);
}
// dW [cout][cin][3][3] (contiguous) from dU [36][cinp][coutp] for input channels [c0, c1) of [0, cin).
template <typename T> void weight_grad_transform(const T* du, const Geometry& g, T* dw, int64_t c0, int64_t c1) {
  transform_kernels<T>()->weight_grad_transform(du, g, dw, c0, c1);
}

// The other tile sizes beside F(4x4, 3x3): F(2x2, 3x3) (4x4 input patches, 16 points) and F(6x6, 3x3)
// (8x8 patches, 64 points), Lavin & Gray 2016, Sec. 4 (Eq. 9 nested in 2-D), in winograd_tiles_kernels.inc.
// Same layouts as above with P = (m + 2)^2 points instead of 36 for an m x m output tile (hp = m th + 2,
// wp = m tw + 2, th and tw = ceil(h / m), ceil(w / m)): V [tiles][P][cinp], U [P][ns][cinp][32],
// M [tiles][P][coutp]. At batch 1 the small maps (8x8: 4 tiles of 4x4) read the whole transformed weight
// (P / 9 times the 3x3 weight) from memory for a few tiles' products, so F(2x2)'s 16 points beat F(4x4)'s
// 36 there; F(6x6) does 21% fewer multiplies per output than F(4x4) on large maps. Forward only.

// Output tile side of a U with `points` points: 2 (16), 4 (36) or 6 (64); 0 for anything else.
inline int64_t tile_of_points(int64_t points) {
  return points == 16 ? 2 : points == 36 ? 4 : points == 64 ? 6 : 0;
}
// input_transform, output_transform and weight_transform for an m x m tile (m = 2 or 6).
template <typename T>
void tile_input_transform(int m, const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v) {
  transform_kernels<T>()->tile_input_transform(m, xt, g, t0, ta, tb, v);
}
template <typename T>
void tile_output_transform(int m, const T* mm, const Geometry& g, int64_t t0, int64_t ta, int64_t tb,
                           const Epilogue<T>& ep, bool channels_last, T* y) {
  transform_kernels<T>()->tile_output_transform(m, mm, g, t0, ta, tb, ep, channels_last, y);
}
template <typename T> void tile_weight_transform(int m, const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1) {
  transform_kernels<T>()->tile_weight_transform(m, w, g, u, c0, c1);
}

}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
