// Raw CPU loops of the fused EDM2 cosine attention (head dim 64), on plain pointers. They know nothing
// of tensors; cpu/attention_cpu.cpp allocates the scratch buffers, splits the work across threads and calls
// them per tile. The loops are attention_kernels.inc, compiled per instruction set into a table
// (AttnKernels below; isa.h): AVX2 + FMA and the baseline; the functions below call the active one. Templated on the storage type T (double, float, c10::Half, c10::BFloat16); everything is
// computed in A = attn_acc_t<T> (double for double, float otherwise).
//
// Pointer conventions, for one (batch n, head h):
//   xh  qkv head base: the raw channel (c, j) (c < 64, j = 0 q / 1 k / 2 v) is the row xh + (3c + j) * HW
//   yh  output head base: channel c is the row yh + c * HW (the same for dY and grad_qkv's head base)
//   "pixel-major" scratch: [HW][64]; "channel-major" scratch: [64][ldk] with ldk = attn_pad(HW) and the
//   padding columns zero.
//
// Scores: qn, kn, vn are the pixel norms of q, k, v; s_ij = qn_i . kn_j / 8. Since |qn|, |kn| < 8, every
// score lies in (-8, 8), so the softmax is taken with the fixed shift 8 instead of a running maximum:
// exp(s - 8) never overflows nor underflows in float32, and no rescaling pass is needed.
#pragma once
#include <cstdint>
#include <type_traits>

#include "isa.h"

namespace fastdiff {
namespace cpu {

template <typename T>
using attn_acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

constexpr int64_t kAttnDim = 64;   // head dim (channels per head)
constexpr int64_t kAttnBQ = 64;    // queries per tile
constexpr int64_t kAttnBK = 128;   // keys per tile
constexpr int64_t kAttnPad = 16;   // key counts are padded to a multiple of this

inline int64_t attn_pad(int64_t n) { return (n + kAttnPad - 1) / kAttnPad * kAttnPad; }

// Scratch (in elements of A) that one call of the tile functions below needs.
constexpr int64_t kAttnFwdWork = kAttnBQ * kAttnDim * 2 + kAttnBQ * kAttnBK + 2 * kAttnBQ;
constexpr int64_t kAttnBwdWork = 2 * kAttnBQ * kAttnBK + 2 * kAttnBK * kAttnDim + 4 * kAttnBK;

// One instruction set's entry points (the meaning of each: the function of the same name below).
template <typename T> struct AttnKernels {
  using A = attn_acc_t<T>;
  void (*fwd_prep)(const T* xh, int64_t HW, int64_t p0, int64_t p1, A* kt, int64_t ldk, A* v);
  void (*fwd_tile)(const T* xh, int64_t HW, int64_t q0, int64_t nq, const A* kt, int64_t ldk, const A* v, T* yh,
                   A* lse, A* work);
  void (*bwd_prep)(const T* xh, const T* gh, const T* yh, int64_t HW, int64_t p0, int64_t p1, A* qs, A* kn, A* kt,
                   A* vt, int64_t ldk, A* dy, A* D);
  void (*bwd_kv_tile)(const T* xh, int64_t HW, int64_t k0, int64_t nk, const A* qs, const A* kt, const A* vt,
                      int64_t ldk, const A* dy, const A* D, const A* lse, T* gxh, A* work);
  void (*bwd_q_tile)(const T* xh, int64_t HW, int64_t q0, int64_t nq, const A* qs, const A* kn, const A* kt,
                     const A* vt, int64_t ldk, const A* dy, const A* D, const A* lse, T* gxh, A* work);
  void (*bwd_head)(const T* xh, int64_t HW, const A* qs, const A* kn, const A* kt, const A* vt, int64_t ldk,
                   const A* dy, const A* D, const A* lse, T* gxh, A* dq, A* work);
};

// The per-ISA tables (attention_kernels_avx2.cpp, attention_kernels_baseline.cpp; the AVX2 one null where
// the compiler could not build it), and the active one.
template <typename T> const AttnKernels<T>* attention_kernels_avx2();
template <typename T> const AttnKernels<T>* attention_kernels_baseline();
template <typename T> const AttnKernels<T>* attention_kernels() {
  return select_table<AttnKernels<T>>(nullptr, attention_kernels_avx2<T>(), attention_kernels_baseline<T>());
}

// Forward, phase 1: normalize k and v of pixels [p0, p1) into kt (channel-major) and v (pixel-major).
// The call with p1 == HW also zeroes kt's padding columns.
template <typename T>
void attn_fwd_prep(const T* xh, int64_t HW, int64_t p0, int64_t p1, attn_acc_t<T>* kt, int64_t ldk,
                   attn_acc_t<T>* v) {
  attention_kernels<T>()->fwd_prep(xh, HW, p0, p1, kt, ldk, v);
}

// Forward, phase 2: queries [q0, q0 + nq) (nq <= kAttnBQ) against all keys; writes y and lse.
template <typename T>
void attn_fwd_tile(const T* xh, int64_t HW, int64_t q0, int64_t nq, const attn_acc_t<T>* kt,
                   int64_t ldk, const attn_acc_t<T>* v, T* yh, attn_acc_t<T>* lse,
                   attn_acc_t<T>* work) {
  attention_kernels<T>()->fwd_tile(xh, HW, q0, nq, kt, ldk, v, yh, lse, work);
}

// Backward, phase 1, pixels [p0, p1): qs = qn / 8 (pixel-major), kn (pixel-major), kt and vt
// (channel-major), dy (pixel-major, A) and D_i = <dY_i, Y_i>.
template <typename T>
void attn_bwd_prep(const T* xh, const T* gh, const T* yh, int64_t HW, int64_t p0, int64_t p1,
                   attn_acc_t<T>* qs, attn_acc_t<T>* kn, attn_acc_t<T>* kt, attn_acc_t<T>* vt,
                   int64_t ldk, attn_acc_t<T>* dy, attn_acc_t<T>* D) {
  attention_kernels<T>()->bwd_prep(xh, gh, yh, HW, p0, p1, qs, kn, kt, vt, ldk, dy, D);
}

// Backward, key-tile pass: keys [k0, k0 + nk) (nk <= kAttnBK) against all queries; writes the k and v
// rows of grad_qkv (head base gxh) for these pixels, through the pixel norms.
template <typename T>
void attn_bwd_kv_tile(const T* xh, int64_t HW, int64_t k0, int64_t nk, const attn_acc_t<T>* qs,
                      const attn_acc_t<T>* kt, const attn_acc_t<T>* vt, int64_t ldk,
                      const attn_acc_t<T>* dy, const attn_acc_t<T>* D, const attn_acc_t<T>* lse,
                      T* gxh, attn_acc_t<T>* work) {
  attention_kernels<T>()->bwd_kv_tile(xh, HW, k0, nk, qs, kt, vt, ldk, dy, D, lse, gxh, work);
}

// Backward, query-tile pass: queries [q0, q0 + nq) against all keys; writes the q rows of grad_qkv.
template <typename T>
void attn_bwd_q_tile(const T* xh, int64_t HW, int64_t q0, int64_t nq, const attn_acc_t<T>* qs,
                     const attn_acc_t<T>* kn, const attn_acc_t<T>* kt, const attn_acc_t<T>* vt,
                     int64_t ldk, const attn_acc_t<T>* dy, const attn_acc_t<T>* D,
                     const attn_acc_t<T>* lse, T* gxh, attn_acc_t<T>* work) {
  attention_kernels<T>()->bwd_q_tile(xh, HW, q0, nq, qs, kn, kt, vt, ldk, dy, D, lse, gxh, work);
}

// Backward of a whole head in one call (both passes fused; dq: HW * 64 elements of scratch). Bitwise
// the same result as the two tile passes; used when there are enough heads to keep every thread busy.
template <typename T>
void attn_bwd_head(const T* xh, int64_t HW, const attn_acc_t<T>* qs, const attn_acc_t<T>* kn,
                   const attn_acc_t<T>* kt, const attn_acc_t<T>* vt, int64_t ldk, const attn_acc_t<T>* dy,
                   const attn_acc_t<T>* D, const attn_acc_t<T>* lse, T* gxh, attn_acc_t<T>* dq,
                   attn_acc_t<T>* work) {
  attention_kernels<T>()->bwd_head(xh, HW, qs, kn, kt, vt, ldk, dy, D, lse, gxh, dq, work);
}

}  // namespace cpu
}  // namespace fastdiff
