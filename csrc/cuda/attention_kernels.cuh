// Launchers of the CUDA cosine attention kernels (attention_kernels.cu), called from attention_cuda.cpp.
// Raw pointers only, so the .cu file needs no ATen headers. A (the lse / D dtype) is double for float64
// and float otherwise.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace fastdiff {
namespace cuda {

// qkv [BH][3 * 64][HW] (per head: channel (c, j) at row 3c + j) -> y [BH][64][HW], lse [BH][HW].
void attn_forward(DType dtype, const void* qkv, void* y, void* lse, int64_t bh, int64_t hw,
                  cudaStream_t stream);

// grad [BH][64][HW], y, lse as above; dscratch: bh * hw elements of A. Writes gx [BH][3 * 64][HW].
void attn_backward(DType dtype, const void* grad, const void* qkv, const void* y, const void* lse,
                   void* dscratch, void* gx, int64_t bh, int64_t hw, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
