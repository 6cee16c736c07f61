// ATen-side argument handling shared by the CPU and CUDA glue of fastdiff::solver_step: input checks,
// one common sample-major dense layout for the image-shaped tensors, per-sample scalars in the
// accumulation dtype, and the outputs.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace fastdiff {
namespace solver {

struct Step {
  at::Tensor x, d1, d0, d_prev, x_base;  // d0 / d_prev / x_base undefined when absent
  at::Tensor w, sigma_cur, sigma_next;   // [N], contiguous, float32 (float64 for float64 images)
  at::Tensor x_next, d, denoised;        // outputs, laid out like x
  int64_t n = 0, m = 0;                  // samples, elements per sample
};

// Dense, and sample n occupies the contiguous block [n*m, (n+1)*m) of memory.
inline bool sample_major(const at::Tensor& t, int64_t m) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == m);
}

inline at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  at::Tensor out = at::empty_strided(ref.sizes(), ref.strides(), ref.options());
  out.copy_(t);
  return out;
}

inline at::Tensor per_sample(const at::Tensor& t, int64_t n, at::ScalarType acc, const at::Tensor& x,
                             const char* name) {
  TORCH_CHECK(t.defined(), "fastdiff.solver_step: expected a tensor for '", name, "', got None");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastdiff.solver_step: expected '", name,
              "' to be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fastdiff.solver_step: expected '", name,
              "' of shape [N] = [", n, "] (one value per sample), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "fastdiff.solver_step: expected '", name, "' on ", x.device(),
              " like x, got ", t.device());
  return t.to(acc).contiguous();
}

inline Step prepare(const at::Tensor& x_in, const at::Tensor& d1, const std::optional<at::Tensor>& d0,
                    const at::Tensor& w, const at::Tensor& sigma_cur, const at::Tensor& sigma_next,
                    const std::optional<at::Tensor>& d_prev, const std::optional<at::Tensor>& x_base) {
  const char* op = "solver_step";
  check_float(x_in, op, "x");
  TORCH_CHECK(x_in.dim() >= 1, "fastdiff.solver_step: expected x of shape [N, ...], got a 0-d tensor");
  check_float(d1, op, "d1");
  check_same(x_in, d1, op, "x", "d1");
  const bool has_d0 = d0.has_value() && d0->defined();
  const bool has_prev = d_prev.has_value() && d_prev->defined();
  const bool has_base = x_base.has_value() && x_base->defined();
  TORCH_CHECK(has_prev == has_base, "fastdiff.solver_step: 'd_prev' and 'x_base' go together (a Heun "
              "correction needs both), got d_prev ", has_prev ? "set" : "None", " and x_base ",
              has_base ? "set" : "None");
  if (has_d0) check_same(x_in, *d0, op, "x", "d0");
  if (has_prev) {
    check_same(x_in, *d_prev, op, "x", "d_prev");
    check_same(x_in, *x_base, op, "x", "x_base");
  }
  Step s;
  s.n = x_in.size(0);
  s.m = s.n > 0 ? x_in.numel() / s.n : 0;
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  s.w = per_sample(w, s.n, acc, x_in, "w");
  s.sigma_cur = per_sample(sigma_cur, s.n, acc, x_in, "sigma_cur");
  s.sigma_next = per_sample(sigma_next, s.n, acc, x_in, "sigma_next");
  s.x = sample_major(x_in, s.m) ? x_in : x_in.contiguous();
  s.d1 = with_layout_of(d1, s.x);
  if (has_d0) s.d0 = with_layout_of(*d0, s.x);
  if (has_prev) {
    s.d_prev = with_layout_of(*d_prev, s.x);
    s.x_base = with_layout_of(*x_base, s.x);
  }
  s.x_next = at::empty_strided(s.x.sizes(), s.x.strides(), s.x.options());
  s.d = at::empty_strided(s.x.sizes(), s.x.strides(), s.x.options());
  s.denoised = at::empty_strided(s.x.sizes(), s.x.strides(), s.x.options());
  return s;
}

template <typename T> const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace solver
}  // namespace fastdiff
