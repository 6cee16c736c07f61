// CUDA kernel of fastdiff::solver_step: one pass over [N, M] with per-sample scalars. Each block row
// (blockIdx.y) walks one sample; blocks along x stride over its M elements with 16-byte accesses when
// every pointer and the per-sample length allow it. Accumulates in float (double for double).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "solver_kernels.cuh"

namespace fastdiff {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

constexpr int kThreads = 256;

template <typename T, int V, bool GUIDED, bool HEUN>
__global__ void __launch_bounds__(kThreads)
    solver_step_kernel(const T* __restrict__ x, const T* __restrict__ d1, const T* __restrict__ d0,
                       const T* __restrict__ dp, const T* __restrict__ xb,
                       const typename Acc<T>::type* __restrict__ w,
                       const typename Acc<T>::type* __restrict__ sc,
                       const typename Acc<T>::type* __restrict__ sn, T* __restrict__ xo,
                       T* __restrict__ dout, T* __restrict__ den, int64_t n, int64_t m) {
  using A = typename Acc<T>::type;
  using P = Pack<T, V>;
  const int64_t packs = m / V;
  for (int64_t k = blockIdx.y; k < n; k += gridDim.y) {
    const A wk = w[k], h = sn[k] - sc[k];
    const A s_eval = HEUN ? sn[k] : sc[k];
    const int64_t base = k * m;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
         p += int64_t(gridDim.x) * blockDim.x) {
      const int64_t off = base + p * V;
      const P xv = *reinterpret_cast<const P*>(x + off);
      const P d1v = *reinterpret_cast<const P*>(d1 + off);
      P d0v, dpv, xbv, o_x, o_d, o_D;
      if (GUIDED) d0v = *reinterpret_cast<const P*>(d0 + off);
      if (HEUN) {
        dpv = *reinterpret_cast<const P*>(dp + off);
        xbv = *reinterpret_cast<const P*>(xb + off);
      }
#pragma unroll
      for (int j = 0; j < V; j++) {
        A D;
        if (GUIDED) {
          const A g = to_acc(d0v.v[j]);
          D = g + wk * (to_acc(d1v.v[j]) - g);
        } else {
          D = to_acc(d1v.v[j]);
        }
        const A xa = to_acc(xv.v[j]);
        const A d = (xa - D) / s_eval;
        const A xn = HEUN ? to_acc(xbv.v[j]) + h * (A(0.5) * to_acc(dpv.v[j]) + A(0.5) * d) : xa + h * d;
        o_x.v[j] = from_acc<T>(xn);
        o_d.v[j] = from_acc<T>(d);
        o_D.v[j] = from_acc<T>(D);
      }
      *reinterpret_cast<P*>(xo + off) = o_x;
      *reinterpret_cast<P*>(dout + off) = o_d;
      *reinterpret_cast<P*>(den + off) = o_D;
    }
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int V, bool GUIDED, bool HEUN>
void launch_typed(const SolverArgs& a, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t packs = a.m / V;
  int64_t bx = (packs + kThreads - 1) / kThreads;
  // Enough blocks to fill the GPU several times over, whatever the split between N and M.
  const int64_t max_blocks = 65535;
  bx = bx < 1 ? 1 : (bx > max_blocks ? max_blocks : bx);
  const int64_t by = a.n < max_blocks ? a.n : max_blocks;
  dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  solver_step_kernel<T, V, GUIDED, HEUN><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.d1), static_cast<const T*>(a.d0),
      static_cast<const T*>(a.d_prev), static_cast<const T*>(a.x_base), static_cast<const A*>(a.w),
      static_cast<const A*>(a.sigma_cur), static_cast<const A*>(a.sigma_next), static_cast<T*>(a.x_next),
      static_cast<T*>(a.d), static_cast<T*>(a.denoised), a.n, a.m);
}

template <typename T, bool GUIDED, bool HEUN> void launch_vec(const SolverArgs& a, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.m % V == 0 && aligned16(a.x) && aligned16(a.d1) && aligned16(a.d0) &&
                   aligned16(a.d_prev) && aligned16(a.x_base) && aligned16(a.x_next) && aligned16(a.d) &&
                   aligned16(a.denoised);
  if (vec)
    launch_typed<T, V, GUIDED, HEUN>(a, stream);
  else
    launch_typed<T, 1, GUIDED, HEUN>(a, stream);
}

template <typename T> void launch_modes(const SolverArgs& a, cudaStream_t stream) {
  const bool guided = a.d0 != nullptr, heun = a.d_prev != nullptr;
  if (guided && heun) launch_vec<T, true, true>(a, stream);
  else if (guided) launch_vec<T, true, false>(a, stream);
  else if (heun) launch_vec<T, false, true>(a, stream);
  else launch_vec<T, false, false>(a, stream);
}

}  // namespace

void launch_solver_step(const SolverArgs& args, DType dtype, cudaStream_t stream) {
  if (args.n <= 0 || args.m <= 0) return;
  switch (dtype) {
    case DType::Float: launch_modes<float>(args, stream); break;
    case DType::Double: launch_modes<double>(args, stream); break;
    case DType::Half: launch_modes<__half>(args, stream); break;
    case DType::BFloat16: launch_modes<__nv_bfloat16>(args, stream); break;
  }
}

}  // namespace cuda
}  // namespace fastdiff
