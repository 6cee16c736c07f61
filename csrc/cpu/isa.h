// Run-time choice of instruction set for the CPU kernels, by the CPU's feature bits.
//
// Three levels: baseline x86-64 (SSE2), AVX2 (avx2+fma+f16c) and AVX-512 (avx512f+bw+vl+dq on top of
// AVX2). The host's level is read once from CPUID (__builtin_cpu_supports, which checks the features
// themselves, not the CPU model: GCC's target_clones("arch=...") ran the baseline clone on AMD Zen).
// FASTDIFF_ISA=avx512|avx2|baseline lowers it (never above what the CPU has), and the private op
// fastdiff::_isa switches it at run time for tests. No global -march flag is used anywhere.
//
// One dispatch mechanism, per-ISA tables. A kernel family writes its loops once, as always-inline code
// in `<family>.inc`, and ends the .inc with a table (a struct of function pointers) of its entry points.
// Each instruction set has a translation unit `<family>_<isa>.cpp` that includes standard headers (and,
// where the loops store c10::Half / c10::BFloat16, c10/util/Half.h and BFloat16.h) first, then switches
// the target with `#pragma GCC target(...)`, then includes the .inc inside an anonymous namespace and
// exports the table through one named function. Functions defined before the pragma keep the baseline
// target, and everything after it has internal linkage, so no inline function of a shared header is
// ever emitted with wider instructions than the baseline (the ODR trap of per-ISA files). The caller
// picks a table per call with select_table() below: the active level's table, or the next lower one
// that exists.
//
//   family                   .inc (loops)               per-ISA units                 levels
//   elementwise + solver     elementwise_simd.inc       elementwise_simd_{avx2,avx512} avx512, avx2 (the
//                                                                                   baseline and float64: the
//                                                                                   scalar loops of
//                                                                                   elementwise_kernels.cpp)
//   GEMM (Winograd, 1x1)     gemm.inc                   gemm_{avx2,avx512}            avx512, avx2 (below:
//                                                                                   ATen's BLAS)
//   cosine attention         attention_kernels.inc      attention_kernels_{avx2,baseline}  avx2, baseline
//   Winograd transforms      winograd_kernels.inc       winograd_kernels_{avx2,baseline}   avx2, baseline
// e^x, the sigmoid and mp_silu are written once, in vmath.h, for every family and level.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define FD_X86 1
#else
#define FD_X86 0
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

// The table of the active level among a family's per-ISA tables, falling back to the next lower level
// where a table is null (a unit the compiler could not build, or a level the family has no code for);
// null when none is left (the caller then runs its portable fallback).
template <typename Table>
const Table* select_table(const Table* avx512, const Table* avx2, const Table* baseline) {
  const Isa isa = active_isa();
  if (isa >= Isa::kAvx512 && avx512 != nullptr) return avx512;
  if (isa >= Isa::kAvx2 && avx2 != nullptr) return avx2;
  return baseline;
}

}  // namespace cpu
}  // namespace fastdiff
