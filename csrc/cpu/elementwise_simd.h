// Interface of the explicitly vectorized CPU loops (float32, float16 and bfloat16 storage, float32
// arithmetic). Each instruction set has its own translation unit that includes elementwise_simd.inc once
// (isa.h): elementwise_simd_avx2.cpp (AVX2+FMA+F16C, 8 lanes) and elementwise_simd_avx512.cpp (AVX-512
// F/BW/VL/DQ, 16 lanes). elementwise_kernels.cpp and solver_cpu.cpp get the active table from
// simd_table<T>() (select_table, isa.h); float64 and the baseline level run the scalar loops.
//
// The meaning of each entry is that of the function of the same name in elementwise_kernels.h (storage pointers
// passed as void*, scalars and factor arrays as float).
#pragma once
#include <cstdint>

namespace fastdiff {
namespace cpu {
namespace simd {

// Storage tags with the bit layout of c10::Half and c10::BFloat16.
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

using SolverFn = void (*)(const void* x, const void* d1, const void* d0, const void* dp, const void* xb,
                          float w, float s_eval, float h, void* xo, void* dout, void* den, int64_t n);

struct Table {
  void (*mp_silu)(const void* x, void* y, int64_t n);
  void (*mp_silu_bwd)(const void* g, const void* x, void* dx, int64_t n);
  void (*axpby)(const void* a, const void* b, void* y, int64_t n, float wa, float wb);
  void (*scale)(const void* x, void* y, int64_t n, float w);
  void (*scale_by)(const void* x, const float* s, int64_t s_step, void* y, int64_t n);
  void (*clip)(const void* x, void* y, int64_t n, float limit);
  void (*clip_bwd)(const void* g, const void* x, void* dx, int64_t n, float limit);
  void (*modulate)(const void* y, const float* m, int64_t m_step, void* out, int64_t n);
  float (*modulate_bwd)(const void* g, const void* y, const float* m, int64_t m_step, void* dy, float* dm,
                        int64_t n);
  float (*sumsq)(const void* x, int64_t n);
  void (*sumsq_dot)(const void* g, const void* x, int64_t n, float* ss, float* gx);
  void (*sumsq_acc)(const void* x, float* acc, int64_t n);
  void (*dot_acc)(const void* g, const void* x, float* acc, int64_t n);
  void (*norm_bwd)(const void* g, const void* x, const float* s, const float* k, int64_t step, void* dx,
                   int64_t n);
  // solver_step's loop, indexed [guided][heun] (see cpu/solver_cpu.cpp).
  SolverFn solver[2][2];
};

const Table* table_avx2(Dtype dt);
const Table* table_avx512(Dtype dt);

}  // namespace simd

// The table for storage type T (float, c10::Half, c10::BFloat16; double has none) at the active level
// (isa.h's select_table), or nullptr where the scalar loops of elementwise_kernels.cpp run.
template <typename T> const simd::Table* simd_table();
}  // namespace cpu
}  // namespace fastdiff
