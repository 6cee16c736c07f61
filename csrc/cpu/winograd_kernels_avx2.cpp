// The Winograd transforms (winograd_kernels.inc) for AVX2 + FMA. Only standard headers come before the
// #pragma (isa.h); everything after it is compiled for AVX2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "isa.h"
#include "winograd_kernels.h"

#if FD_X86
#pragma GCC target("avx2,fma,f16c")
#define FD_WINOGRAD_TABLE transform_kernels_avx2
#include "winograd_kernels.inc"
#else  // not x86-64 GCC/Clang: never selected (host_isa() is the baseline there)
namespace fastdiff {
namespace cpu {
namespace winograd {
template <typename T> const TransformKernels<T>* transform_kernels_avx2() { return nullptr; }
template const TransformKernels<float>* transform_kernels_avx2<float>();
template const TransformKernels<double>* transform_kernels_avx2<double>();
}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
#endif
