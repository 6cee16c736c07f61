// Plain CUDA launchers for the fastdiff MP ops. They take raw device pointers, sizes, a dtype tag and
// a stream, and know nothing of tensors: cuda/elementwise_cuda.cpp does the checks, layouts and allocation.
// Storage types are double, float, half, bfloat16; arithmetic is in float (double for double), and
// every "acc" pointer below points to float (double when the storage dtype is double).
// Launchers return after enqueueing; the caller checks the launch (launch.h). Zero sizes are no-ops.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace fastdiff {
namespace cuda {

// --- elementwise on flat dense memory (all pointers share one layout) ------------------------------
// y = silu(x) / 0.596 and its backward dx = g * silu'(x) / 0.596.
void mp_silu(DType t, const void* x, void* y, int64_t n, cudaStream_t stream);
void mp_silu_bwd(DType t, const void* g, const void* x, void* dx, int64_t n, cudaStream_t stream);
// y = wa * a + wb * b.
void axpby(DType t, const void* a, const void* b, void* y, int64_t n, double wa, double wb, cudaStream_t stream);
// y = clamp(x, -limit, limit) (NaN passes through); dx = g where -limit <= x <= limit, else 0.
void clip(DType t, const void* x, void* y, int64_t n, float limit, cudaStream_t stream);
void clip_bwd(DType t, const void* g, const void* x, void* dx, int64_t n, float limit, cudaStream_t stream);

// --- channel-indexed, on an N x C x S tensor (channels_last: C innermost, else S innermost) -------
// y[n, c, s] = x[n, c, s] * coef[c] (acc coef), written as dtype `out`. `y` may alias `x` (same
// dtype). Supported (t, out): (t, t) for the four dtypes, and (Float, Half), (Float, BFloat16).
bool scale_channels_supports(DType t, DType out);
void scale_channels(DType t, const void* x, const void* coef, void* y, DType out, int64_t N, int64_t C,
                    int64_t S, bool channels_last, cudaStream_t stream);
// out[n, c, s] = mp_silu(y[n, c, s] * m[n, c]) with m acc [N, C].
void modulate(DType t, const void* y, const void* m, void* out, int64_t N, int64_t C, int64_t S,
              bool channels_last, cudaStream_t stream);
// y = cat([wa * a, wb * b], dim=1) with a N x Ca x S, b N x Cb x S, y N x (Ca+Cb) x S, one layout.
void mp_cat(DType t, const void* a, const void* b, void* y, int64_t N, int64_t Ca, int64_t Cb, int64_t S,
            bool channels_last, double wa, double wb, cudaStream_t stream);

// --- reductions ------------------------------------------------------------------------------------
// Per row r of a contiguous rows x n matrix: s_r = 1 / (eps + ||x_r|| / sqrt(n)); writes scale[r] = s_r
// (acc, if scale != nullptr) and y_r = s_r * x_r (if y != nullptr; y may alias x). Serves
// weight_norm(_scale) (rows = out channels) and channels-last pixel_norm (rows = pixels, n = C).
void row_normalize(DType t, const void* x, void* y, void* scale, int64_t rows, int64_t n, double eps,
                   cudaStream_t stream);
// Backward of the above: dx_r = s_r g_r - k_r x_r, k_r = <g_r, x_r> s_r^2 / (sqrt(n) ||x_r||), and
// dot[r] = s_r <g_r, x_r> (acc, if dot != nullptr).
void row_normalize_bwd(DType t, const void* g, const void* x, void* dx, void* dot, int64_t rows, int64_t n,
                       double eps, cudaStream_t stream);
// Pixel norm over C in the channels-first layout (N x C x S, S innermost), forward and backward.
void pixel_norm_cf(DType t, const void* x, void* y, int64_t N, int64_t C, int64_t S, double eps,
                   cudaStream_t stream);
void pixel_norm_bwd_cf(DType t, const void* g, const void* x, void* dx, int64_t N, int64_t C, int64_t S,
                       double eps, cudaStream_t stream);
// Backward of modulate: dy = g * m * mp_silu'(y m) and dm[n, c] = sum_s g * mp_silu'(y m) * y (acc
// [N, C]). Needs an acc workspace of modulate_bwd_workspace(...) elements (may be 0 -> nullptr ok).
int64_t modulate_bwd_workspace(int64_t N, int64_t C, int64_t S, bool channels_last);
void modulate_bwd(DType t, const void* g, const void* y, const void* m, void* dy, void* dm, void* workspace,
                  int64_t N, int64_t C, int64_t S, bool channels_last, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
