// Run-time choice of instruction set for the CPU kernels, by the CPU's feature bits.
//
// Three levels: baseline x86-64 (SSE2), AVX2 (avx2+fma+f16c) and AVX-512 (avx512f+bw+vl+dq on top of
// AVX2). The host's level is read once from CPUID (__builtin_cpu_supports, which checks the features
// themselves, not the CPU model: GCC's target_clones("arch=...") ran the baseline clone on AMD Zen).
// FASTDIFF_ISA=avx512|avx2|baseline lowers it (never above what the CPU has), and the private op
// fastdiff::_isa switches it at run time for tests. No global -march flag is used anywhere.
//
// Two ways the kernels use it:
//   - the elementwise and solver loops are written with intrinsics in per-ISA translation units
//     (elementwise_simd_avx2.cpp, elementwise_simd_avx512.cpp; see elementwise_simd.h) and picked per call from active_isa();
//   - the attention loops are one always-inline body compiled twice by FD_MULTIVERSION below (AVX2 and
//     baseline), picked the same way.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FD_X86 1
#define FD_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define FD_X86 0
#define FD_TARGET_AVX2
#endif

#define FD_INLINE inline __attribute__((always_inline))

namespace fastdiff {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// The best level this CPU supports (CPUID only).
Isa host_isa();
// The level the kernels run now: host_isa() lowered by FASTDIFF_ISA and by set_active_isa().
Isa active_isa();
// Sets the level (capped at host_isa()); returns the level now active.
Isa set_active_isa(Isa isa);

inline bool use_avx2() { return active_isa() >= Isa::kAvx2; }

}  // namespace cpu
}  // namespace fastdiff

// Defines `template <typename T> RET PUBLIC PARAMS` that runs `BODY<T> ARGS` compiled for AVX2+FMA when
// the active level allows it, and the baseline build otherwise.
#define FD_MULTIVERSION(RET, PUBLIC, BODY, PARAMS, ARGS)                                             \
  namespace {                                                                                        \
  template <typename T> FD_TARGET_AVX2 __attribute__((noinline)) RET PUBLIC##_avx2 PARAMS {          \
    return BODY<T> ARGS;                                                                             \
  }                                                                                                  \
  template <typename T> __attribute__((noinline)) RET PUBLIC##_base PARAMS { return BODY<T> ARGS; } \
  }                                                                                                  \
  template <typename T> RET PUBLIC PARAMS {                                                          \
    return ::fastdiff::cpu::use_avx2() ? PUBLIC##_avx2<T> ARGS : PUBLIC##_base<T> ARGS;              \
  }
