// The storage-dtype tag every CUDA launcher takes (kernels.cuh, solver.cuh, attention_cuda.h). Plain
// C++, so the .cu files need no ATen header; launch.h converts an at::ScalarType to it.
#pragma once

namespace fastdiff {
namespace cuda {

enum class DType : int { Double = 0, Float = 1, Half = 2, BFloat16 = 3 };

}  // namespace cuda
}  // namespace fastdiff
