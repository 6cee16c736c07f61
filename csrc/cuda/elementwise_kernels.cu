// Elementwise and channel-indexed fastdiff kernels: one pass over memory, grid-stride loops,
// 16-byte vector accesses where the pointers' alignment and the sizes allow.
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
// Flat elementwise: y[i] = f(a[i], b[i]) (b unused for unary ops).

template <typename A> struct SiluOp {
  static constexpr bool kBinary = false;
  __device__ __forceinline__ A operator()(A x, A) const { return silu(x) * silu_inv<A>(); }
};
template <typename A> struct SiluBwdOp {  // (grad, x)
  static constexpr bool kBinary = true;
  __device__ __forceinline__ A operator()(A g, A x) const { return g * silu_grad(x) * silu_inv<A>(); }
};
template <typename A> struct AxpbyOp {
  static constexpr bool kBinary = true;
  A wa, wb;
  __device__ __forceinline__ A operator()(A a, A b) const { return wa * a + wb * b; }
};
template <typename A> struct ClipOp {
  static constexpr bool kBinary = false;
  float limit;
  __device__ __forceinline__ A operator()(A v, A) const {
    const A lo = -A(limit), hi = A(limit);
    v = v < lo ? lo : v;  // NaN passes through, as in the CPU kernel
    v = v > hi ? hi : v;
    return v;
  }
};
template <typename A> struct ClipBwdOp {  // (grad, x)
  static constexpr bool kBinary = true;
  float limit;
  __device__ __forceinline__ A operator()(A g, A v) const {
    const A lim = A(limit);
    return (v >= -lim && v <= lim) ? g : A(0);
  }
};

template <typename T, typename F>
__global__ void __launch_bounds__(kThreads)
    ew_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, int64_t n, bool vec, F f) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t nv = n / V;
    for (int64_t i = tid; i < nv; i += stride) {
      const P pa = reinterpret_cast<const P*>(a)[i];
      P pb, py;
      if (F::kBinary) pb = reinterpret_cast<const P*>(b)[i];
#pragma unroll
      for (int j = 0; j < V; j++) py.v[j] = Cvt<T>::to(f(ld(pa.v[j]), F::kBinary ? ld(pb.v[j]) : A(0)));
      reinterpret_cast<P*>(y)[i] = py;
    }
    done = nv * V;
  }
  for (int64_t i = done + tid; i < n; i += stride)
    y[i] = Cvt<T>::to(f(ld(a[i]), F::kBinary ? ld(b[i]) : A(0)));
}

template <typename T, typename F>
void launch_ew(const void* a, const void* b, void* y, int64_t n, F f, cudaStream_t stream) {
  if (n <= 0) return;
  constexpr int V = vec_width<T>();
  const bool vec = aligned(a, 16) && aligned(b, 16) && aligned(y, 16) && n >= V;
  const unsigned grid = grid_for(vec ? n / V : n, kThreads);
  ew_kernel<T, F><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                  static_cast<T*>(y), n, vec, f);
}

// ---------------------------------------------------------------------------------------------
// Channel-indexed: y[n, c, s] = f(x[n, c, s], m[n * msn + c]) on an N x C x S tensor. Index maths
// in 32 bits when the tensor is small enough. x and y may alias (no __restrict__).

template <typename A> struct ScaleOp {
  __device__ __forceinline__ A operator()(A x, A m) const { return x * m; }
};
template <typename A> struct ModulateOp {
  __device__ __forceinline__ A operator()(A y, A m) const {
    const A z = y * m;
    return silu(z) * silu_inv<A>();
  }
};

template <typename I, typename T, typename O, typename F>
__device__ __forceinline__ void chan_body(const T* x, const acc_t<T>* m, O* y, I total, I C, I S, I msn, bool cl,
                                          bool vec, F f) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  const I stride = I(gridDim.x) * I(blockDim.x);
  const I tid = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  I done = 0;
  if (vec) {  // channels-first: S % V == 0 (one factor per pack); channels-last: C % V == 0
    const I nv = total / V;
    for (I i = tid; i < nv; i += stride) {
      const I e = i * V;
      const Pack<T, V> px = reinterpret_cast<const Pack<T, V>*>(x)[i];
      Pack<O, V> py;
      if (cl) {
        const A* mp = m + (e / (S * C)) * msn + e % C;
#pragma unroll
        for (int j = 0; j < V; j++) py.v[j] = Cvt<O>::to(f(ld(px.v[j]), mp[j]));
      } else {
        const I row = e / S;
        const A mv = m[(row / C) * msn + row % C];
#pragma unroll
        for (int j = 0; j < V; j++) py.v[j] = Cvt<O>::to(f(ld(px.v[j]), mv));
      }
      reinterpret_cast<Pack<O, V>*>(y)[i] = py;
    }
    done = nv * V;
  }
  for (I i = done + tid; i < total; i += stride) {
    I mi;
    if (cl) {
      mi = (i / (S * C)) * msn + i % C;
    } else {
      const I row = i / S;
      mi = (row / C) * msn + row % C;
    }
    y[i] = Cvt<O>::to(f(ld(x[i]), m[mi]));
  }
}

template <typename T, typename O, typename F>
__global__ void __launch_bounds__(kThreads) chan_kernel(const T* x, const acc_t<T>* m, O* y, int64_t total, int64_t C,
                                                        int64_t S, int64_t msn, bool cl, bool vec, F f) {
  if (total < (int64_t(1) << 31))
    chan_body<uint32_t>(x, m, y, uint32_t(total), uint32_t(C), uint32_t(S), uint32_t(msn), cl, vec, f);
  else
    chan_body<int64_t>(x, m, y, total, C, S, msn, cl, vec, f);
}

template <typename T, typename O, typename F>
void launch_chan(const void* x, const void* m, void* y, int64_t N, int64_t C, int64_t S, int64_t msn, bool cl, F f,
                 cudaStream_t stream) {
  const int64_t total = N * C * S;
  if (total <= 0) return;
  constexpr int V = vec_width<T>();
  const bool vec = aligned(x, 16) && aligned(y, int64_t(sizeof(O)) * V) && (cl ? C % V == 0 : S % V == 0);
  const unsigned grid = grid_for(vec ? total / V : total, kThreads);
  chan_kernel<T, O, F><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const acc_t<T>*>(m),
                                                      static_cast<O*>(y), total, C, S, msn, cl, vec, f);
}

// ---------------------------------------------------------------------------------------------
// mp_cat: y viewed as `outer` chunks of La + Lb elements, the first La from a, the rest from b.

template <typename I, typename T>
__device__ __forceinline__ void cat_body(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, I total,
                                         I La, I Lb, acc_t<T> wa, acc_t<T> wb, bool vec) {
  constexpr int V = vec_width<T>();
  using P = Pack<T, V>;
  const I L = La + Lb;
  const I stride = I(gridDim.x) * I(blockDim.x);
  const I tid = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  if (vec) {  // La, Lb multiples of V: a pack never straddles the two halves
    const I nv = total / V;
    for (I i = tid; i < nv; i += stride) {
      const I e = i * V, o = e / L, r = e - o * L;
      const bool in_a = r < La;
      const P p = in_a ? *reinterpret_cast<const P*>(a + o * La + r) : *reinterpret_cast<const P*>(b + o * Lb + (r - La));
      const acc_t<T> w = in_a ? wa : wb;
      P q;
#pragma unroll
      for (int j = 0; j < V; j++) q.v[j] = Cvt<T>::to(w * ld(p.v[j]));
      reinterpret_cast<P*>(y)[i] = q;
    }
    return;
  }
  for (I i = tid; i < total; i += stride) {
    const I o = i / L, r = i - o * L;
    y[i] = r < La ? Cvt<T>::to(wa * ld(a[o * La + r])) : Cvt<T>::to(wb * ld(b[o * Lb + (r - La)]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cat_kernel(const T* a, const T* b, T* y, int64_t total, int64_t La,
                                                       int64_t Lb, acc_t<T> wa, acc_t<T> wb, bool vec) {
  if (total < (int64_t(1) << 31))
    cat_body<uint32_t>(a, b, y, uint32_t(total), uint32_t(La), uint32_t(Lb), wa, wb, vec);
  else
    cat_body<int64_t>(a, b, y, total, La, Lb, wa, wb, vec);
}

}  // namespace

void mp_silu(DType t, const void* x, void* y, int64_t n, cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_ew<T>(x, nullptr, y, n, SiluOp<acc_t<T>>{}, stream));
}

void mp_silu_bwd(DType t, const void* g, const void* x, void* dx, int64_t n, cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_ew<T>(g, x, dx, n, SiluBwdOp<acc_t<T>>{}, stream));
}

void axpby(DType t, const void* a, const void* b, void* y, int64_t n, double wa, double wb, cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_ew<T>(a, b, y, n, AxpbyOp<acc_t<T>>{acc_t<T>(wa), acc_t<T>(wb)}, stream));
}

void clip(DType t, const void* x, void* y, int64_t n, float limit, cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_ew<T>(x, nullptr, y, n, ClipOp<acc_t<T>>{limit}, stream));
}

void clip_bwd(DType t, const void* g, const void* x, void* dx, int64_t n, float limit, cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_ew<T>(g, x, dx, n, ClipBwdOp<acc_t<T>>{limit}, stream));
}

bool scale_channels_supports(DType t, DType out) {
  return t == out || (t == DType::Float && (out == DType::Half || out == DType::BFloat16));
}

void scale_channels(DType t, const void* x, const void* coef, void* y, DType out, int64_t N, int64_t C, int64_t S,
                    bool channels_last, cudaStream_t stream) {
  if (t == out) {
    FD_CUDA_DISPATCH(t, launch_chan<T, T>(x, coef, y, N, C, S, 0, channels_last, ScaleOp<acc_t<T>>{}, stream));
  } else if (t == DType::Float && out == DType::Half) {
    launch_chan<float, __half>(x, coef, y, N, C, S, 0, channels_last, ScaleOp<float>{}, stream);
  } else if (t == DType::Float && out == DType::BFloat16) {
    launch_chan<float, __nv_bfloat16>(x, coef, y, N, C, S, 0, channels_last, ScaleOp<float>{}, stream);
  }
}

void modulate(DType t, const void* y, const void* m, void* out, int64_t N, int64_t C, int64_t S, bool channels_last,
              cudaStream_t stream) {
  FD_CUDA_DISPATCH(t, launch_chan<T, T>(y, m, out, N, C, S, C, channels_last, ModulateOp<acc_t<T>>{}, stream));
}

void mp_cat(DType t, const void* a, const void* b, void* y, int64_t N, int64_t Ca, int64_t Cb, int64_t S,
            bool channels_last, double wa, double wb, cudaStream_t stream) {
  const int64_t total = N * (Ca + Cb) * S;
  if (total <= 0) return;
  // Channels-first: one chunk per sample (Ca*S then Cb*S); channels-last: one chunk per pixel.
  const int64_t La = channels_last ? Ca : Ca * S, Lb = channels_last ? Cb : Cb * S;
  FD_CUDA_DISPATCH(t, {
    constexpr int V = vec_width<T>();
    const bool vec = aligned(a, 16) && aligned(b, 16) && aligned(y, 16) && La % V == 0 && Lb % V == 0;
    const unsigned grid = grid_for(vec ? total / V : total, kThreads);
    cat_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                 static_cast<T*>(y), total, La, Lb, acc_t<T>(wa), acc_t<T>(wb),
                                                 vec);
  });
}

}  // namespace cuda
}  // namespace fastdiff
