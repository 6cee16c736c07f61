// The storage-dtype tag every CUDA launcher takes (elementwise_kernels.cuh, solver_kernels.cuh, attention_kernels.cuh). Plain
// C++, so the .cu files need no ATen header; launch.h converts an at::ScalarType to it.
#pragma once

namespace fastdiff {
namespace cuda {

enum class DType : int { Double = 0, Float = 1, Half = 2, BFloat16 = 3 };

}  // namespace cuda
}  // namespace fastdiff
