// Launcher of the CUDA kernel of fastdiff::solver_step (meaning in csrc/ops.cpp). Plain types only, so
// that solver.cu needs no ATen headers; the ATen glue is solver_cuda.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdiff {
namespace cuda {

enum class SolverDtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct SolverArgs {
  // [N, M] sample-major images of the storage dtype; d0, d_prev, x_base may be null.
  const void* x;
  const void* d1;
  const void* d0;
  const void* d_prev;
  const void* x_base;
  // [N] per-sample scalars: float (double for kDouble).
  const void* w;
  const void* sigma_cur;
  const void* sigma_next;
  void* x_next;
  void* d;
  void* denoised;
  int64_t n;  // samples
  int64_t m;  // elements per sample
};

// Enqueues the kernel on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_solver_step(const SolverArgs& args, SolverDtype dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
