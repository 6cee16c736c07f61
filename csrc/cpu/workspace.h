// Scratch memory for the CPU kernels' glue (the Winograd convolution's packed input and transform-domain
// chunks, and whatever else needs large per-call buffers).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastdiff {
namespace cpu {

// Tensors of the given shapes for one call's scratch buffers, carved out of a block each thread keeps
// and grows between calls, up to 64 MiB in all (beyond that, fresh tensors). Fresh multi-MiB buffers on
// every call cost page faults, and glibc's moving mmap threshold made that cost come and go. The tensors
// are valid until the same thread's next call; they are not zeroed.
std::vector<at::Tensor> workspace(const std::vector<std::vector<int64_t>>& shapes, const at::TensorOptions& opt);

}  // namespace cpu
}  // namespace fastdiff
