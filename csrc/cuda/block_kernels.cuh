// Plain CUDA launchers of the block-level fusions (block_kernels.cu): the block epilogue mp_sum + clip (+ the
// next mp_silu), the modulation with its conditioning cast inside the kernel, and the q/k/v
// normalization that feeds scaled_dot_product_attention. Raw pointers, sizes, a dtype tag and a
// stream, as elementwise_kernels.cuh; cuda/block_cuda.cpp does the checks, layouts and allocation.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace fastdiff {
namespace cuda {

// --- block epilogue on flat dense memory (a, b, x, s share one layout) ---------------------------
// x = clip(wa * a + wb * b, limit) (no clip when limit <= 0; NaN passes through), and, when s is not
// null, s = mp_silu(x) of the stored (rounded) x. One read of a and b, one or two writes.
void sum_clip(DType t, const void* a, const void* b, void* x, void* s, int64_t n, double wa, double wb, double limit,
              cudaStream_t stream);
// Backward: with x0 = wa a + wb b recomputed, x = clip(x0) rounded, g' = (gx + gs * mp_silu'(x)) where
// -limit <= x0 (rounded to the storage type, as the unfused clip(mp_sum(a, b)) sees it) <= limit, else 0
// (gs may be null): da = wa g', db = wb g'.
void sum_clip_bwd(DType t, const void* gx, const void* gs, const void* a, const void* b, void* da, void* db,
                  int64_t n, double wa, double wb, double limit, cudaStream_t stream);

// --- modulation, the factor 1 + c formed in the kernel ---------------------------------------------
// out[n, c, s] = mp_silu(y[n, c, s] * (1 + cond[n, c])), cond a contiguous [N, C] of dtype ct (t or
// Float); y laid out N x C x S (channels_last: C innermost). Replaces the cast and the add that the
// factor used to cost as two extra launches.
bool modulate_cond_supports(DType t, DType ct);
void modulate_cond(DType t, DType ct, const void* y, const void* cond, void* out, int64_t N, int64_t C, int64_t S,
                   bool channels_last, cudaStream_t stream);

// --- q/k/v pixel norm for scaled_dot_product_attention -----------------------------------------------
// qkv: N x (3 heads D) x S, channel (h, c, j) at (h D + c) 3 + j (EDM2's [N, heads, D, 3, S] view),
// channels-first (S innermost) or channels-last (channels innermost). Writes q, k, v, each
// [N][S][heads][D] (the [batch, tokens, heads, dim] memory flash attention reads without a copy), as
// x / (eps + ||x|| / sqrt(D)) over the D channels of one head and pixel, computed in float (double).
// Returns false when D is too large for one tile (D > 1024).
bool qkv_norm(DType t, const void* qkv, void* q, void* k, void* v, int64_t N, int64_t S, int64_t heads, int64_t D,
              bool channels_last, double eps, cudaStream_t stream);
// Backward: gq, gk, gv in the [N][S][heads][D] memory above; gqkv in qkv's layout.
bool qkv_norm_bwd(DType t, const void* gq, const void* gk, const void* gv, const void* qkv, void* gqkv, int64_t N,
                  int64_t S, int64_t heads, int64_t D, bool channels_last, double eps, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
