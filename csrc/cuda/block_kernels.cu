// Block-level fusions: the epilogue mp_sum + clip (+ the next mp_silu), the modulation with its
// conditioning read in its own dtype, and the q/k/v pixel norm that writes the layout
// scaled_dot_product_attention reads. See block_kernels.cuh for the contracts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "block_kernels.cuh"
#include "device.cuh"

namespace fastdiff {
namespace cuda {
namespace {

using namespace dev;
constexpr int kThreads = 256;

template <typename A> __device__ __forceinline__ A clip_to(A v, A lim, bool on) {
  if (!on) return v;
  v = v < -lim ? -lim : v;  // NaN passes through (both compares false)
  return v > lim ? lim : v;
}

// ---------------------------------------------------------------------------------------------
// Epilogue: x = clip(wa a + wb b), s = mp_silu(x).

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads)
    sum_clip_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ x, T* __restrict__ s, int64_t n,
                    acc_t<T> wa, acc_t<T> wb, acc_t<T> lim, bool clip_on, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
      const P pa = reinterpret_cast<const P*>(a)[i], pb = reinterpret_cast<const P*>(b)[i];
      P px, ps;
#pragma unroll
      for (int j = 0; j < V; j++) {
        px.v[j] = Cvt<T>::to(clip_to(wa * ld(pa.v[j]) + wb * ld(pb.v[j]), lim, clip_on));
        if (kSilu) ps.v[j] = Cvt<T>::to(silu(ld(px.v[j])) * silu_inv<A>());
      }
      reinterpret_cast<P*>(x)[i] = px;
      if (kSilu) reinterpret_cast<P*>(s)[i] = ps;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const T xv = Cvt<T>::to(clip_to(wa * ld(a[i]) + wb * ld(b[i]), lim, clip_on));
    x[i] = xv;
    if (kSilu) s[i] = Cvt<T>::to(silu(ld(xv)) * silu_inv<A>());
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_clip_bwd_kernel(const T* __restrict__ gx, const T* __restrict__ gs, const T* __restrict__ a,
                        const T* __restrict__ b, T* __restrict__ da, T* __restrict__ db, int64_t n, acc_t<T> wa,
                        acc_t<T> wb, acc_t<T> lim, bool clip_on, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  auto grad = [&](A g, A gsv, A av, A bv) -> A {
    const A x0 = wa * av + wb * bv;
    const A xs = ld(Cvt<T>::to(x0));  // the clip decides on the sum as stored, as clip(mp_sum(a, b)) does
    if (clip_on && !(xs >= -lim && xs <= lim)) return A(0);
    if (gs != nullptr) {
      const A xr = ld(Cvt<T>::to(clip_to(x0, lim, clip_on)));  // the stored x the silu saw
      g += gsv * silu_grad(xr) * silu_inv<A>();
    }
    return g;
  };
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
      const P pg = reinterpret_cast<const P*>(gx)[i], pa = reinterpret_cast<const P*>(a)[i],
              pb = reinterpret_cast<const P*>(b)[i];
      P ps;
      if (gs != nullptr) ps = reinterpret_cast<const P*>(gs)[i];
      P qa, qb;
#pragma unroll
      for (int j = 0; j < V; j++) {
        const A g = grad(ld(pg.v[j]), gs != nullptr ? ld(ps.v[j]) : A(0), ld(pa.v[j]), ld(pb.v[j]));
        qa.v[j] = Cvt<T>::to(wa * g);
        qb.v[j] = Cvt<T>::to(wb * g);
      }
      reinterpret_cast<P*>(da)[i] = qa;
      reinterpret_cast<P*>(db)[i] = qb;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const A g = grad(ld(gx[i]), gs != nullptr ? ld(gs[i]) : A(0), ld(a[i]), ld(b[i]));
    da[i] = Cvt<T>::to(wa * g);
    db[i] = Cvt<T>::to(wb * g);
  }
}

// ---------------------------------------------------------------------------------------------
// Modulation: out = mp_silu(y * (1 + cond[n, c])), cond of storage type CT read in the kernel.

template <typename I, typename T, typename CT>
__device__ __forceinline__ void modulate_body(const T* __restrict__ y, const CT* __restrict__ cond, T* __restrict__ out,
                                              I total, I C, I S, bool cl, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  const I stride = I(gridDim.x) * I(blockDim.x);
  const I tid = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  auto f = [](A yv, A m) { return silu(yv * m) * silu_inv<A>(); };
  auto factor = [&](I idx) { return A(1) + A(ld(cond[idx])); };
  I done = 0;
  if (vec) {  // channels-first: S % V == 0 (one factor per pack); channels-last: C % V == 0
    const I nv = total / V;
    for (I i = tid; i < nv; i += stride) {
      const I e = i * V;
      const Pack<T, V> px = reinterpret_cast<const Pack<T, V>*>(y)[i];
      Pack<T, V> py;
      if (cl) {
        const I base = (e / (S * C)) * C + e % C;
#pragma unroll
        for (int j = 0; j < V; j++) py.v[j] = Cvt<T>::to(f(ld(px.v[j]), factor(base + j)));
      } else {
        const A m = factor(e / S);  // row n * C + c
#pragma unroll
        for (int j = 0; j < V; j++) py.v[j] = Cvt<T>::to(f(ld(px.v[j]), m));
      }
      reinterpret_cast<Pack<T, V>*>(out)[i] = py;
    }
    done = nv * V;
  }
  for (I i = done + tid; i < total; i += stride) {
    const I mi = cl ? (i / (S * C)) * C + i % C : i / S;
    out[i] = Cvt<T>::to(f(ld(y[i]), factor(mi)));
  }
}

template <typename T, typename CT>
__global__ void __launch_bounds__(kThreads) modulate_cond_kernel(const T* y, const CT* cond, T* out, int64_t total,
                                                                 int64_t C, int64_t S, bool cl, bool vec) {
  if (total < (int64_t(1) << 31))
    modulate_body<uint32_t>(y, cond, out, uint32_t(total), uint32_t(C), uint32_t(S), cl, vec);
  else
    modulate_body<int64_t>(y, cond, out, total, C, S, cl, vec);
}

template <typename T, typename CT>
void launch_modulate_cond(const void* y, const void* cond, void* out, int64_t N, int64_t C, int64_t S, bool cl,
                          cudaStream_t stream) {
  const int64_t total = N * C * S;
  if (total <= 0) return;
  constexpr int V = vec_width<T>();
  const bool vec = aligned(y, 16) && aligned(out, 16) && (cl ? C % V == 0 : S % V == 0);
  const unsigned grid = grid_for(vec ? total / V : total, kThreads);
  modulate_cond_kernel<T, CT><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(y), static_cast<const CT*>(cond),
                                                             static_cast<T*>(out), total, C, S, cl, vec);
}

// ---------------------------------------------------------------------------------------------
// q/k/v pixel norm. One block per (sample, head, tile of P pixels): the tile's 3D x P inputs are read
// once, coalesced in the input's own order, into shared memory (row r = 3c + j, padded to P + 1 to
// spread the banks), the 3P norms are taken there, and the outputs are written coalesced along the
// head's D contiguous channels. The backward reads x and the three gradients the same way.

struct QkvGeom {
  int64_t S, heads, D, C3;  // C3 = 3 heads D
  int P, tiles;              // pixels per tile, tiles per (sample, head)
  bool cl;
};

// Offset of element (row r of head h, pixel p) of sample n in qkv.
__device__ __forceinline__ int64_t qkv_at(const QkvGeom& g, int64_t n, int64_t h, int64_t r, int64_t p) {
  return g.cl ? (n * g.S + p) * g.C3 + h * 3 * g.D + r : (n * g.C3 + h * 3 * g.D + r) * g.S + p;
}

// Element e of the tile in the input's memory order -> (row, pixel within the tile).
__device__ __forceinline__ void tile_rc(const QkvGeom& g, int e, int* r, int* p) {
  const int R = int(3 * g.D);
  if (g.cl) {
    *p = e / R;
    *r = e - *p * R;
  } else {
    *r = e / g.P;
    *p = e - *r * g.P;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qkv_norm_kernel(const T* __restrict__ qkv, T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, QkvGeom g,
                    acc_t<T> eps, acc_t<T> rsd) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  const int P = g.P, D = int(g.D), R = 3 * D, ld_ = P + 1;
  A* scale = tile + int64_t(R) * ld_;
  const int64_t bid = blockIdx.x;
  const int64_t tile_i = bid % g.tiles, nh = bid / g.tiles;
  const int64_t h = nh % g.heads, n = nh / g.heads;
  const int64_t p0 = tile_i * P;
  const int np = int(g.S - p0 < P ? g.S - p0 : P);
  for (int e = threadIdx.x; e < R * P; e += blockDim.x) {
    int r, p;
    tile_rc(g, e, &r, &p);
    tile[r * ld_ + p] = p < np ? ld(qkv[qkv_at(g, n, h, r, p0 + p)]) : A(0);
  }
  __syncthreads();
  for (int pr = threadIdx.x; pr < 3 * P; pr += blockDim.x) {
    const int j = pr / P, p = pr - j * P;
    A ss = 0;
    for (int c = 0; c < D; c++) {
      const A xv = tile[(3 * c + j) * ld_ + p];
      ss += xv * xv;
    }
    scale[pr] = A(1) / (eps + sqrt(ss) * rsd);
  }
  __syncthreads();
  T* outs[3] = {q, k, v};
  for (int e = threadIdx.x; e < 3 * P * D; e += blockDim.x) {
    const int j = e / (P * D), rem = e - j * (P * D), p = rem / D, c = rem - p * D;
    if (p >= np) continue;
    outs[j][((n * g.S + p0 + p) * g.heads + h) * g.D + c] = Cvt<T>::to(tile[(3 * c + j) * ld_ + p] * scale[j * P + p]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    qkv_norm_bwd_kernel(const T* __restrict__ gq, const T* __restrict__ gk, const T* __restrict__ gv,
                        const T* __restrict__ qkv, T* __restrict__ gqkv, QkvGeom g, acc_t<T> eps, acc_t<T> rsd) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  const int P = g.P, D = int(g.D), R = 3 * D, ld_ = P + 1;
  A* xt = reinterpret_cast<A*>(smem_raw);
  A* gt = xt + int64_t(R) * ld_;
  A* sc = gt + int64_t(R) * ld_;  // [3P] s, then [3P] k
  const int64_t bid = blockIdx.x;
  const int64_t tile_i = bid % g.tiles, nh = bid / g.tiles;
  const int64_t h = nh % g.heads, n = nh / g.heads;
  const int64_t p0 = tile_i * P;
  const int np = int(g.S - p0 < P ? g.S - p0 : P);
  for (int e = threadIdx.x; e < R * P; e += blockDim.x) {
    int r, p;
    tile_rc(g, e, &r, &p);
    xt[r * ld_ + p] = p < np ? ld(qkv[qkv_at(g, n, h, r, p0 + p)]) : A(0);
  }
  const T* gins[3] = {gq, gk, gv};
  for (int e = threadIdx.x; e < 3 * P * D; e += blockDim.x) {
    const int j = e / (P * D), rem = e - j * (P * D), p = rem / D, c = rem - p * D;
    gt[(3 * c + j) * ld_ + p] = p < np ? ld(gins[j][((n * g.S + p0 + p) * g.heads + h) * g.D + c]) : A(0);
  }
  __syncthreads();
  for (int pr = threadIdx.x; pr < 3 * P; pr += blockDim.x) {
    const int j = pr / P, p = pr - j * P;
    A ss = 0, gx = 0;
    for (int c = 0; c < D; c++) {
      const A xv = xt[(3 * c + j) * ld_ + p];
      ss += xv * xv;
      gx += gt[(3 * c + j) * ld_ + p] * xv;
    }
    const A norm = sqrt(ss);
    const A s = A(1) / (eps + norm * rsd);
    sc[pr] = s;
    sc[3 * P + pr] = norm > A(0) ? gx * s * s * rsd / norm : A(0);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < R * P; e += blockDim.x) {
    int r, p;
    tile_rc(g, e, &r, &p);
    if (p >= np) continue;
    const int j = r % 3, pr = j * P + p;
    gqkv[qkv_at(g, n, h, r, p0 + p)] = Cvt<T>::to(sc[pr] * gt[r * ld_ + p] - sc[3 * P + pr] * xt[r * ld_ + p]);
  }
}

constexpr int64_t kSmemLimit = 48 * 1024;  // without the opt-in attribute

// Pixels per tile: the largest power of two <= 32 whose tiles (`tiles` of 3D x (P + 1), plus 2 x 3P
// coefficients) fit the shared-memory limit; 0 if none does.
int pick_tile(int64_t D, int tiles, int64_t elem, int64_t* bytes) {
  for (int P = 32; P >= 1; P /= 2) {
    const int64_t b = (int64_t(tiles) * 3 * D * (P + 1) + 6 * P) * elem;
    if (b <= kSmemLimit) {
      *bytes = b;
      return P;
    }
  }
  return 0;
}

}  // namespace

void sum_clip(DType t, const void* a, const void* b, void* x, void* s, int64_t n, double wa, double wb, double limit,
              cudaStream_t stream) {
  if (n <= 0) return;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const bool vec = aligned(a, 16) && aligned(b, 16) && aligned(x, 16) && aligned(s, 16) && n >= V;
    const unsigned grid = grid_for(vec ? n / V : n, kThreads);
    const bool on = limit > 0;
    if (s != nullptr)
      sum_clip_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                              static_cast<T*>(x), static_cast<T*>(s), n, A(wa), A(wb),
                                                              A(limit), on, vec);
    else
      sum_clip_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                               static_cast<T*>(x), nullptr, n, A(wa), A(wb), A(limit),
                                                               on, vec);
  });
}

void sum_clip_bwd(DType t, const void* gx, const void* gs, const void* a, const void* b, void* da, void* db,
                  int64_t n, double wa, double wb, double limit, cudaStream_t stream) {
  if (n <= 0) return;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const bool vec = aligned(gx, 16) && aligned(gs, 16) && aligned(a, 16) && aligned(b, 16) && aligned(da, 16) &&
                     aligned(db, 16) && n >= V;
    const unsigned grid = grid_for(vec ? n / V : n, kThreads);
    sum_clip_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(gx), static_cast<const T*>(gs), static_cast<const T*>(a), static_cast<const T*>(b),
        static_cast<T*>(da), static_cast<T*>(db), n, A(wa), A(wb), A(limit), limit > 0, vec);
  });
}

bool modulate_cond_supports(DType t, DType ct) { return ct == t || ct == DType::Float; }

void modulate_cond(DType t, DType ct, const void* y, const void* cond, void* out, int64_t N, int64_t C, int64_t S,
                   bool channels_last, cudaStream_t stream) {
  if (ct == t) {
    FD_CUDA_DISPATCH(t, launch_modulate_cond<T, T>(y, cond, out, N, C, S, channels_last, stream));
  } else if (ct == DType::Float) {
    FD_CUDA_DISPATCH(t, launch_modulate_cond<T, float>(y, cond, out, N, C, S, channels_last, stream));
  }
}

bool qkv_norm(DType t, const void* qkv, void* q, void* k, void* v, int64_t N, int64_t S, int64_t heads, int64_t D,
              bool channels_last, double eps, cudaStream_t stream) {
  if (D > 1024) return false;
  if (N * S * heads * D == 0) return true;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    int64_t bytes = 0;
    const int P = pick_tile(D, 1, sizeof(A), &bytes);
    if (P == 0) return false;
    QkvGeom g{S, heads, D, 3 * heads * D, P, int(ceil_div(S, P)), channels_last};
    const int64_t blocks = N * heads * g.tiles;
    qkv_norm_kernel<T><<<unsigned(blocks), kThreads, bytes, stream>>>(
        static_cast<const T*>(qkv), static_cast<T*>(q), static_cast<T*>(k), static_cast<T*>(v), g, A(eps),
        A(1) / sqrt(A(D)));
  });
  return true;
}

bool qkv_norm_bwd(DType t, const void* gq, const void* gk, const void* gv, const void* qkv, void* gqkv, int64_t N,
                  int64_t S, int64_t heads, int64_t D, bool channels_last, double eps, cudaStream_t stream) {
  if (D > 1024) return false;
  if (N * S * heads * D == 0) return true;
  FD_CUDA_DISPATCH(t, {
    using A = acc_t<T>;
    int64_t bytes = 0;
    const int P = pick_tile(D, 2, sizeof(A), &bytes);
    if (P == 0) return false;
    QkvGeom g{S, heads, D, 3 * heads * D, P, int(ceil_div(S, P)), channels_last};
    const int64_t blocks = N * heads * g.tiles;
    qkv_norm_bwd_kernel<T><<<unsigned(blocks), kThreads, bytes, stream>>>(
        static_cast<const T*>(gq), static_cast<const T*>(gk), static_cast<const T*>(gv), static_cast<const T*>(qkv),
        static_cast<T*>(gqkv), g, A(eps), A(1) / sqrt(A(D)));
  });
  return true;
}

}  // namespace cuda
}  // namespace fastdiff
