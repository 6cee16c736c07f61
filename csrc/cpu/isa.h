// Run-time choice of instruction set for the CPU kernels, by the CPU's feature bits.
//
// Three levels: baseline x86-64 (SSE2), AVX2 (avx2+fma+f16c) and AVX-512 (avx512f+bw+vl+dq on top of
// AVX2). The host's level is read once from CPUID (__builtin_cpu_supports, which checks the features
// themselves, not the CPU model: GCC's target_clones("arch=...") ran the baseline clone on AMD Zen).
// FASTDIFF_ISA=avx512|avx2|baseline lowers it (never above what the CPU has), and the private op
// fastdiff::_isa switches it at run time for tests. No global -march flag is used anywhere.
//
// One dispatch mechanism: per-ISA tables. A kernel family writes its loops once, as always-inline code in
// `<family>.inc` (helpers in an anonymous namespace, so each unit compiles its own copy), ending with a
// table (a struct of function pointers) of its entry points. Each instruction set has a translation unit
// `<family>_<isa>.cpp` that includes standard headers (and, where the loops store c10::Half /
// c10::BFloat16, c10/util/Half.h and BFloat16.h) first, then switches the target with
// `#pragma GCC target(...)`, then includes vmath.h and the .inc and so defines its table function. Functions
// defined before the pragma keep the baseline target and everything after it has internal linkage (but
// the table function), so no inline function of a shared header is ever emitted with wider instructions
// than the baseline (the ODR trap of per-ISA files). Callers pick a table per call with select_table()
// below: the active level's table, or the next lower one that exists.
//
//   family               loops (.inc)            per-ISA units                       table, selector
//   elementwise, solver  elementwise_simd.inc    elementwise_simd_{avx2,avx512}.cpp  simd::Table, simd_table<T>()
//   GEMM micro-kernel    gemm.inc                gemm_{avx2,avx512}.cpp              GemmKernels, gemm_kernels()
//   cosine attention     attention_kernels.inc   attention_kernels_{avx2,baseline}   AttnKernels, attention_kernels<T>()
//   Winograd transforms  winograd_kernels.inc    winograd_kernels_{avx2,baseline}    TransformKernels, transform_kernels<T>()
// Below AVX2 the elementwise and solver loops run the scalar loops of elementwise_kernels.cpp / solver_cpu.cpp
// (float64 always does), and the GEMMs ATen's BLAS. e^x, the sigmoid and mp_silu are written once, in
// vmath.h, with the vector style of the CPU code (GCC vector types and operators, a policy for the rest).
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
