// Device-side helpers shared by the fastdiff .cu files: accumulation types, conversions, vector
// packs, the MP activation maths, launch sizing and the dtype switch. CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise_kernels.cuh"

namespace fastdiff {
namespace cuda {
namespace dev {

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };
template <typename T> using acc_t = typename AccT<T>::type;

// Load as the accumulation type.
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ double ld(double v) { return v; }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }

// Store from the accumulation type (round to nearest even, like c10::Half / c10::BFloat16).
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  __device__ __forceinline__ static float to(float v) { return v; }
};
template <> struct Cvt<double> {
  __device__ __forceinline__ static double to(double v) { return v; }
};
template <> struct Cvt<__half> {
  __device__ __forceinline__ static __half to(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
};

// V elements loaded / stored as one access of sizeof(T) * V bytes.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
// Elements per 16-byte access.
template <typename T> constexpr int vec_width() { return int(16 / sizeof(T)); }

inline bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) == 0;
}

// The MP activation's divisor 0.596, exact in each compute type (as in the CPU kernels).
template <typename A> __device__ __forceinline__ A silu_inv() { return A(1) / A(0.596); }
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
// silu(x) = x sigmoid(x) with its limit 0 at x = -inf (where the product is -inf * 0), and silu'(x)
// = s (1 + x (1 - s)) with its limits 1 at +inf and 0 at -inf; as the CPU kernels.
template <typename A> __device__ __forceinline__ A silu(A x) { return x == A(-INFINITY) ? A(0) : x * sigmoid(x); }
template <typename A> __device__ __forceinline__ A silu_grad(A x) {
  const A s = sigmoid(x);
  const A d = x == A(INFINITY) ? A(1) : s * (A(1) + x * (A(1) - s));
  return x == A(-INFINITY) ? A(0) : d;
}

// Sum over the G threads (threadIdx.x) that share a threadIdx.y, G a power of two <= 1024, the
// block laid out as blockDim = (G, R). Every thread of the block must call it (it may synchronize);
// all of them get the total. Fixed order: deterministic. smem holds R * max(G / 32, 1) values.
template <typename A> __device__ __forceinline__ A group_sum(A v, A* smem) {
  const int G = blockDim.x;
  if (G <= 32) {
    for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
  }
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int W = G / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[threadIdx.y * W + warp] = v;
  __syncthreads();
  A t = 0;
  for (int k = 0; k < W; k++) t += smem[threadIdx.y * W + k];
  __syncthreads();
  return t;
}

// Multiprocessors of the current device (cached per device).
inline int sm_count() {
  static int cache[128] = {0};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 128) return 132;
  if (cache[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = n > 0 ? n : 132;
  }
  return cache[dev];
}

// Blocks for a grid-stride loop over `items` work items with `per_block` items per block pass.
inline unsigned grid_for(int64_t items, int64_t per_block, int waves = 32) {
  int64_t b = (items + per_block - 1) / per_block;
  const int64_t cap = int64_t(sm_count()) * waves;
  if (b > cap) b = cap;
  if (b < 1) b = 1;
  return unsigned(b);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

}  // namespace dev
}  // namespace cuda
}  // namespace fastdiff

// Runs the statement with `T` bound to the storage type of the DType value.
#define FD_CUDA_DISPATCH(DT, ...)                    \
  switch (DT) {                                      \
    case ::fastdiff::cuda::DType::Double: {          \
      using T = double;                              \
      __VA_ARGS__;                                   \
    } break;                                         \
    case ::fastdiff::cuda::DType::Float: {           \
      using T = float;                               \
      __VA_ARGS__;                                   \
    } break;                                         \
    case ::fastdiff::cuda::DType::Half: {            \
      using T = __half;                              \
      __VA_ARGS__;                                   \
    } break;                                         \
    case ::fastdiff::cuda::DType::BFloat16: {        \
      using T = __nv_bfloat16;                       \
      __VA_ARGS__;                                   \
    } break;                                         \
  }
