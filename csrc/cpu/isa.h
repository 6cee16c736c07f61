// Run-time choice of instruction set for the CPU kernels, by the CPU's feature bits.
//
// Each hot loop is written once as an always-inline body and compiled twice: for AVX2+FMA+F16C and for
// the x86-64 baseline; FD_MULTIVERSION defines both and a public function that calls the one this CPU
// supports. (GCC's target_clones("arch=...") was not used: it dispatches on the CPU model, not its
// features, and so ran the baseline clone on AMD Zen.) No global -march flag is needed.
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

// Whether this CPU runs the AVX2+FMA+F16C variants; decided once.
inline bool cpu_has_avx2() {
#if FD_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastdiff

// Defines `template <typename T> RET PUBLIC PARAMS` that runs `BODY<T> ARGS` compiled for AVX2+FMA when
// the CPU has it, and the baseline build otherwise.
#define FD_MULTIVERSION(RET, PUBLIC, BODY, PARAMS, ARGS)                                             \
  namespace {                                                                                        \
  template <typename T> FD_TARGET_AVX2 __attribute__((noinline)) RET PUBLIC##_avx2 PARAMS {          \
    return BODY<T> ARGS;                                                                             \
  }                                                                                                  \
  template <typename T> __attribute__((noinline)) RET PUBLIC##_base PARAMS { return BODY<T> ARGS; } \
  }                                                                                                  \
  template <typename T> RET PUBLIC PARAMS {                                                          \
    return ::fastdiff::cpu::cpu_has_avx2() ? PUBLIC##_avx2<T> ARGS : PUBLIC##_base<T> ARGS;          \
  }
