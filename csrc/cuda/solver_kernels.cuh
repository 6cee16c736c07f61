// Launcher of the CUDA kernel of fastdiff::solver_step (meaning in csrc/ops.cpp). Plain types only, so
// that solver_kernels.cu needs no ATen headers; the ATen glue is solver_cuda.cpp.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace fastdiff {
namespace cuda {

struct SolverArgs {
  // [N, M] sample-major images of the storage dtype; d0, d_prev, x_base may be null.
  const void* x;
  const void* d1;
  const void* d0;
  const void* d_prev;
  const void* x_base;
  // [N] per-sample scalars: float (double for DType::Double).
  const void* w;
  const void* sigma_cur;
  const void* sigma_next;
  void* x_next;
  void* d;
  void* denoised;
  int64_t n;  // samples
  int64_t m;  // elements per sample
};

// Enqueues the kernel on `stream`; the caller checks the launch (launch.h).
void launch_solver_step(const SolverArgs& args, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
