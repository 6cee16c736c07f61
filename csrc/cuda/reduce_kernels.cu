// Reduction kernels of the fastdiff ops: per-row norms (weight norm, channels-last pixel norm) and
// their backward dot products, per-pixel norms over strided channels (channels-first pixel norm), and
// the modulation backward's sum over space. All sums run in a fixed order (warp shuffles, shared-memory
// trees, two-stage partial sums): results are bitwise reproducible for a given shape and device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device.cuh"
#include "elementwise_kernels.cuh"

namespace fastdiff {
namespace cuda {
namespace {

using namespace dev;
constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Row kernels: blockDim = (G, R), G * R = 256; a group of G threads owns one row of n elements.

struct RowConfig {
  dim3 block;
  unsigned grid;
};

// G: about four accesses per thread, a power of two in [1, 256].
RowConfig row_config(int64_t rows, int64_t units) {
  int g = next_pow2(ceil_div(units, 4));
  if (g > kThreads) g = kThreads;
  const int r = kThreads / g;
  return {dim3(g, r), grid_for(rows, r)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_norm_kernel(const T* x, T* y, acc_t<T>* scale, int64_t rows, int64_t n,
                                                            acc_t<T> eps, acc_t<T> rsn, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  __shared__ A smem[8];
  const int G = blockDim.x, tx = threadIdx.x;
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool active = row < rows;
    A ss = 0;
    if (active) {
      const T* xr = x + row * n;
      if (vec) {
        for (int64_t i = tx; i < n / V; i += G) {
          const P p = reinterpret_cast<const P*>(xr)[i];
#pragma unroll
          for (int j = 0; j < V; j++) ss += ld(p.v[j]) * ld(p.v[j]);
        }
      } else {
        for (int64_t i = tx; i < n; i += G) ss += ld(xr[i]) * ld(xr[i]);
      }
    }
    ss = group_sum(ss, smem);
    if (!active) continue;
    const A s = A(1) / (eps + sqrt(ss) * rsn);
    if (scale != nullptr && tx == 0) scale[row] = s;
    if (y == nullptr) continue;
    // Each element is read and written by the same thread in both passes: y may alias x.
    const T* xr = x + row * n;
    T* yr = y + row * n;
    if (vec) {
      for (int64_t i = tx; i < n / V; i += G) {
        const P p = reinterpret_cast<const P*>(xr)[i];
        P q;
#pragma unroll
        for (int j = 0; j < V; j++) q.v[j] = Cvt<T>::to(s * ld(p.v[j]));
        reinterpret_cast<P*>(yr)[i] = q;
      }
    } else {
      for (int64_t i = tx; i < n; i += G) yr[i] = Cvt<T>::to(s * ld(xr[i]));
    }
  }
}

template <typename A>
__device__ __forceinline__ void norm_coeffs(A ss, A gx, A eps, A sn, A* s, A* k) {
  const A norm = sqrt(ss);
  *s = A(1) / (eps + norm / sn);
  *k = norm > A(0) ? gx * (*s) * (*s) / (sn * norm) : A(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_norm_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, acc_t<T>* dot,
                        int64_t rows, int64_t n, acc_t<T> eps, acc_t<T> sn, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  __shared__ A smem[8];
  const int G = blockDim.x, tx = threadIdx.x;
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool active = row < rows;
    const T* xr = x + row * n;
    const T* gr = g + row * n;
    A ss = 0, gx = 0;
    if (active) {
      if (vec) {
        for (int64_t i = tx; i < n / V; i += G) {
          const P px = reinterpret_cast<const P*>(xr)[i];
          const P pg = reinterpret_cast<const P*>(gr)[i];
#pragma unroll
          for (int j = 0; j < V; j++) {
            const A xv = ld(px.v[j]);
            ss += xv * xv;
            gx += ld(pg.v[j]) * xv;
          }
        }
      } else {
        for (int64_t i = tx; i < n; i += G) {
          const A xv = ld(xr[i]);
          ss += xv * xv;
          gx += ld(gr[i]) * xv;
        }
      }
    }
    ss = group_sum(ss, smem);
    gx = group_sum(gx, smem);
    if (!active) continue;
    A s, k;
    norm_coeffs(ss, gx, eps, sn, &s, &k);
    if (dot != nullptr && tx == 0) dot[row] = s * gx;
    T* dr = dx + row * n;
    if (vec) {
      for (int64_t i = tx; i < n / V; i += G) {
        const P px = reinterpret_cast<const P*>(xr)[i];
        const P pg = reinterpret_cast<const P*>(gr)[i];
        P q;
#pragma unroll
        for (int j = 0; j < V; j++) q.v[j] = Cvt<T>::to(s * ld(pg.v[j]) - k * ld(px.v[j]));
        reinterpret_cast<P*>(dr)[i] = q;
      }
    } else {
      for (int64_t i = tx; i < n; i += G) dr[i] = Cvt<T>::to(s * ld(gr[i]) - k * ld(xr[i]));
    }
  }
}

// Channels-first modulation backward: one row per (sample, channel), n = S; single pass.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mod_bwd_rows_kernel(const T* __restrict__ g, const T* __restrict__ y, const acc_t<T>* __restrict__ m,
                        T* __restrict__ dy, acc_t<T>* __restrict__ dm, int64_t rows, int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  __shared__ A smem[8];
  const A inv = silu_inv<A>();
  const int G = blockDim.x, tx = threadIdx.x;
  for (int64_t r0 = int64_t(blockIdx.x) * blockDim.y; r0 < rows; r0 += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = r0 + threadIdx.y;
    const bool active = row < rows;
    A total = 0;
    if (active) {
      const A f = m[row];
      const T* yr = y + row * n;
      const T* gr = g + row * n;
      T* dr = dy + row * n;
      if (vec) {
        for (int64_t i = tx; i < n / V; i += G) {
          const P py = reinterpret_cast<const P*>(yr)[i];
          const P pg = reinterpret_cast<const P*>(gr)[i];
          P q;
#pragma unroll
          for (int j = 0; j < V; j++) {
            const A yv = ld(py.v[j]);
            const A gz = ld(pg.v[j]) * silu_grad(yv * f) * inv;
            q.v[j] = Cvt<T>::to(gz * f);
            total += gz * yv;
          }
          reinterpret_cast<P*>(dr)[i] = q;
        }
      } else {
        for (int64_t i = tx; i < n; i += G) {
          const A yv = ld(yr[i]);
          const A gz = ld(gr[i]) * silu_grad(yv * f) * inv;
          dr[i] = Cvt<T>::to(gz * f);
          total += gz * yv;
        }
      }
    }
    total = group_sum(total, smem);
    if (active && tx == 0) dm[row] = total;
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-first pixel norm: blockDim = (TX, TY); TX pixels of one sample per block pass, the TY
// thread rows split the C channels and meet in a shared-memory tree.

struct ColConfig {
  int tx, ty;
};
ColConfig col_config(int64_t inner) {
  int tx = next_pow2(inner);
  if (tx > 32) tx = 32;
  return {tx, kThreads / tx};
}

template <typename A> __device__ __forceinline__ A column_sum(A v, A* red) {
  const int TX = blockDim.x, tx = threadIdx.x, ty = threadIdx.y;
  red[ty * TX + tx] = v;
  __syncthreads();
  for (int off = blockDim.y / 2; off > 0; off >>= 1) {
    if (ty < off) red[ty * TX + tx] += red[(ty + off) * TX + tx];
    __syncthreads();
  }
  const A t = red[tx];
  __syncthreads();
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pn_cf_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t N, int64_t C,
                                                         int64_t S, int64_t tiles, acc_t<T> eps, acc_t<T> rsc) {
  using A = acc_t<T>;
  __shared__ A red[kThreads];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t blk = blockIdx.x; blk < N * tiles; blk += gridDim.x) {
    const int64_t n = blk / tiles, p = (blk % tiles) * TX + tx;
    const bool active = p < S;
    const int64_t base = n * C * S + p;
    A ss = 0;
    if (active)
      for (int64_t c = ty; c < C; c += TY) ss += ld(x[base + c * S]) * ld(x[base + c * S]);
    ss = column_sum(ss, red);
    const A s = A(1) / (eps + sqrt(ss) * rsc);
    if (active)
      for (int64_t c = ty; c < C; c += TY) y[base + c * S] = Cvt<T>::to(s * ld(x[base + c * S]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pn_bwd_cf_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, int64_t N, int64_t C,
                     int64_t S, int64_t tiles, acc_t<T> eps, acc_t<T> sc) {
  using A = acc_t<T>;
  __shared__ A red[kThreads];
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t blk = blockIdx.x; blk < N * tiles; blk += gridDim.x) {
    const int64_t n = blk / tiles, p = (blk % tiles) * TX + tx;
    const bool active = p < S;
    const int64_t base = n * C * S + p;
    A ss = 0, gx = 0;
    if (active)
      for (int64_t c = ty; c < C; c += TY) {
        const A xv = ld(x[base + c * S]);
        ss += xv * xv;
        gx += ld(g[base + c * S]) * xv;
      }
    ss = column_sum(ss, red);
    gx = column_sum(gx, red);
    A s, k;
    norm_coeffs(ss, gx, eps, sc, &s, &k);
    if (active)
      for (int64_t c = ty; c < C; c += TY)
        dx[base + c * S] = Cvt<T>::to(s * ld(g[base + c * S]) - k * ld(x[base + c * S]));
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-last modulation backward: blockDim = (TX channels, TY pixels); each block pass covers TX
// channels of one sample over one split of the pixels and writes one partial sum per channel;
// a second kernel adds the splits in order.

struct ModClConfig {
  int tx, ty;
  int64_t ctiles, splits, chunk;
};
ModClConfig mod_cl_config(int64_t C, int64_t S) {
  const ColConfig cc = col_config(C);
  int64_t splits = ceil_div(S, int64_t(cc.ty) * 16);
  if (splits > 256) splits = 256;
  if (splits < 1) splits = 1;
  const int64_t chunk = ceil_div(S, splits);
  splits = S > 0 ? ceil_div(S, chunk) : 1;
  return {cc.tx, cc.ty, ceil_div(C, cc.tx), splits, chunk};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    mod_bwd_cl_kernel(const T* __restrict__ g, const T* __restrict__ y, const acc_t<T>* __restrict__ m,
                      T* __restrict__ dy, acc_t<T>* __restrict__ part, int64_t N, int64_t C, int64_t S, int64_t ctiles,
                      int64_t splits, int64_t chunk) {
  using A = acc_t<T>;
  __shared__ A red[kThreads];
  const A inv = silu_inv<A>();
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t blk = blockIdx.x; blk < N * splits * ctiles; blk += gridDim.x) {
    const int64_t ct = blk % ctiles, rest = blk / ctiles, sp = rest % splits, n = rest / splits;
    const int64_t c = ct * TX + tx;
    const bool active = c < C;
    const int64_t s0 = sp * chunk, s1 = s0 + chunk < S ? s0 + chunk : S;
    A total = 0;
    if (active) {
      const A f = m[n * C + c];
      for (int64_t s = s0 + ty; s < s1; s += TY) {
        const int64_t i = (n * S + s) * C + c;
        const A yv = ld(y[i]);
        const A gz = ld(g[i]) * silu_grad(yv * f) * inv;
        dy[i] = Cvt<T>::to(gz * f);
        total += gz * yv;
      }
    }
    total = column_sum(total, red);
    if (active && ty == 0) part[(n * splits + sp) * C + c] = total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t N,
                                                              int64_t C, int64_t splits) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * C; i += stride) {
    const int64_t n = i / C, c = i % C;
    A t = 0;
    for (int64_t k = 0; k < splits; k++) t += part[(n * splits + k) * C + c];
    out[i] = t;
  }
}

}  // namespace

void row_normalize(DType t, const void* x, void* y, void* scale, int64_t rows, int64_t n, double eps,
                   cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const bool vec = n % V == 0 && aligned(x, 16) && aligned(y, 16);
    const RowConfig cfg = row_config(rows, vec ? n / V : n);
    const A rsn = A(1) / sqrt(A(n));
    row_norm_kernel<T><<<cfg.grid, cfg.block, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                           static_cast<A*>(scale), rows, n, A(eps), rsn, vec);
  });
}

void row_normalize_bwd(DType t, const void* g, const void* x, void* dx, void* dot, int64_t rows, int64_t n, double eps,
                       cudaStream_t stream) {
  if (rows <= 0 || n <= 0) return;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const bool vec = n % V == 0 && aligned(x, 16) && aligned(g, 16) && aligned(dx, 16);
    const RowConfig cfg = row_config(rows, vec ? n / V : n);
    const A sn = sqrt(A(n));
    row_norm_bwd_kernel<T><<<cfg.grid, cfg.block, 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                               static_cast<T*>(dx), static_cast<A*>(dot), rows, n,
                                                               A(eps), sn, vec);
  });
}

void pixel_norm_cf(DType t, const void* x, void* y, int64_t N, int64_t C, int64_t S, double eps, cudaStream_t stream) {
  if (N <= 0 || C <= 0 || S <= 0) return;
  const ColConfig cc = col_config(S);
  const int64_t tiles = ceil_div(S, cc.tx);
  const unsigned grid = grid_for(N * tiles, 1);
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    pn_cf_kernel<T><<<grid, dim3(cc.tx, cc.ty), 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), N, C, S,
                                                             tiles, A(eps), A(1) / sqrt(A(C)));
  });
}

void pixel_norm_bwd_cf(DType t, const void* g, const void* x, void* dx, int64_t N, int64_t C, int64_t S, double eps,
                       cudaStream_t stream) {
  if (N <= 0 || C <= 0 || S <= 0) return;
  const ColConfig cc = col_config(S);
  const int64_t tiles = ceil_div(S, cc.tx);
  const unsigned grid = grid_for(N * tiles, 1);
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    pn_bwd_cf_kernel<T><<<grid, dim3(cc.tx, cc.ty), 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(x),
                                                                 static_cast<T*>(dx), N, C, S, tiles, A(eps),
                                                                 sqrt(A(C)));
  });
}

int64_t modulate_bwd_workspace(int64_t N, int64_t C, int64_t S, bool channels_last) {
  if (!channels_last || N <= 0 || C <= 0 || S <= 0) return 0;
  const ModClConfig cfg = mod_cl_config(C, S);
  return cfg.splits > 1 ? N * cfg.splits * C : 0;
}

void modulate_bwd(DType t, const void* g, const void* y, const void* m, void* dy, void* dm, void* workspace, int64_t N,
                  int64_t C, int64_t S, bool channels_last, cudaStream_t stream) {
  if (N <= 0 || C <= 0) return;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    if (S <= 0) {
      cudaMemsetAsync(dm, 0, size_t(N * C) * sizeof(A), stream);
    } else if (!channels_last) {
      constexpr int V = vec_width<T>();
      const bool vec = S % V == 0 && aligned(g, 16) && aligned(y, 16) && aligned(dy, 16);
      const RowConfig cfg = row_config(N * C, vec ? S / V : S);
      mod_bwd_rows_kernel<T><<<cfg.grid, cfg.block, 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(y), static_cast<const A*>(m), static_cast<T*>(dy),
          static_cast<A*>(dm), N * C, S, vec);
    } else {
      const ModClConfig cfg = mod_cl_config(C, S);
      A* part = cfg.splits > 1 ? static_cast<A*>(workspace) : static_cast<A*>(dm);
      const unsigned grid = grid_for(N * cfg.splits * cfg.ctiles, 1);
      mod_bwd_cl_kernel<T><<<grid, dim3(cfg.tx, cfg.ty), 0, stream>>>(
          static_cast<const T*>(g), static_cast<const T*>(y), static_cast<const A*>(m), static_cast<T*>(dy), part, N, C,
          S, cfg.ctiles, cfg.splits, cfg.chunk);
      if (cfg.splits > 1)
        sum_splits_kernel<A><<<grid_for(N * C, kThreads), kThreads, 0, stream>>>(part, static_cast<A*>(dm), N, C,
                                                                                  cfg.splits);
    }
  });
}

}  // namespace cuda
}  // namespace fastdiff
