// The instruction-set level of the CPU kernels (isa.h): CPUID once, FASTDIFF_ISA, and the private op
// fastdiff::_isa that reports (and, for tests, lowers) the level each kernel family runs.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>

namespace fastdiff {
namespace cpu {
namespace {

Isa parse_isa(const std::string& s, const char* where) {
  if (s == "avx512") return Isa::kAvx512;
  if (s == "avx2") return Isa::kAvx2;
  if (s == "baseline") return Isa::kBaseline;
  TORCH_CHECK(false, "fastdiff: ", where, " must be one of avx512, avx2, baseline, got '", s, "'");
  return Isa::kBaseline;
}

Isa detect() {
#if FD_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
#else
  return Isa::kBaseline;
#endif
}

Isa lower(Isa a, Isa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

std::atomic<int>& active() {
  static std::atomic<int> level([] {
    Isa isa = host_isa();
    // An unknown value is ignored here: fastdiff/ops/_ext.py rejects it with a clear error at import,
    // before any kernel runs (this may first run inside a worker thread, where throwing is no option).
    const char* env = std::getenv("FASTDIFF_ISA");
    const std::string name = env != nullptr ? env : "";
    if (name == "avx512" || name == "avx2" || name == "baseline") isa = lower(isa, parse_isa(name, "FASTDIFF_ISA"));
    return static_cast<int>(isa);
  }());
  return level;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa host_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

Isa set_active_isa(Isa isa) {
  active().store(static_cast<int>(lower(isa, host_isa())), std::memory_order_relaxed);
  return active_isa();
}

// fastdiff::_isa(level): with a level, sets it (capped at the host's); returns, for each kernel family,
// the instruction set it runs now, as "family:isa" pairs joined by commas. The elementwise and solver
// loops and the Winograd per-point GEMMs have AVX-512 code (below AVX2 those GEMMs are ATen's BLAS); the
// attention loops and the Winograd transforms go up to AVX2.
std::string isa_op(std::optional<std::string> level) {
  if (level.has_value()) set_active_isa(parse_isa(*level, "fastdiff._isa's level"));
  const Isa now = active_isa();
  const char* avx2_max = isa_name(lower(now, Isa::kAvx2));
  const char* gemm = now == Isa::kBaseline ? "blas" : isa_name(now);
  return std::string("elementwise:") + isa_name(now) + ",solver:" + isa_name(now) + ",attention:" + avx2_max +
         ",winograd_transforms:" + avx2_max + ",winograd_gemm:" + gemm;
}

}  // namespace cpu
}  // namespace fastdiff
