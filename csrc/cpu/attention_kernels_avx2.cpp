// The attention loops (attention_kernels.inc) for AVX2 + FMA + F16C. Standard headers and c10's Half /
// BFloat16 (the storage types) come before the #pragma, so their inline functions keep the baseline
// target (isa.h); everything after it is compiled for AVX2.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_kernels.h"
#include "isa.h"

#if FD_X86
#pragma GCC target("avx2,fma,f16c")
#define FD_ATTN_TABLE attention_kernels_avx2
#include "attention_kernels.inc"
#else  // not x86-64 GCC/Clang: never selected (host_isa() is the baseline there)
namespace fastdiff {
namespace cpu {
template <typename T> const AttnKernels<T>* attention_kernels_avx2() { return nullptr; }
template const AttnKernels<double>* attention_kernels_avx2<double>();
template const AttnKernels<float>* attention_kernels_avx2<float>();
template const AttnKernels<c10::Half>* attention_kernels_avx2<c10::Half>();
template const AttnKernels<c10::BFloat16>* attention_kernels_avx2<c10::BFloat16>();
}  // namespace cpu
}  // namespace fastdiff
#endif
