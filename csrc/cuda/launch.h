// What every CUDA glue file (elementwise_cuda.cpp, block_cuda.cpp, solver_cuda.cpp, attention_cuda.cpp) needs around
// a raw launcher: the dtype tag of a tensor, the device check, and one call that makes the tensor's device current, passes its
// current stream to the launcher and checks the launch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace fastdiff {
namespace cuda {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::Double;
    case at::kFloat: return DType::Float;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastdiff.", op, ": expected a float32, float64, float16 or bfloat16 tensor, got ",
                  t.scalar_type());
  }
  return DType::Float;  // unreachable
}

// The tensor `name` of op `op` must be on a CUDA device (the CUDA kernels' first check).
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastdiff.", op, ": expected '", name, "' on a CUDA device, got ", t.device());
}

// launch(stream) on `on`'s device and current stream, then the launch error check.
template <typename F> void launch_on(const at::Tensor& on, F&& launch) {
  const c10::cuda::CUDAGuard guard(on.device());
  launch(c10::cuda::getCurrentCUDAStream(on.device().index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastdiff
