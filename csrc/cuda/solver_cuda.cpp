// CUDA glue of fastdiff::solver_step: checks and layouts (csrc/solver.h), then the kernel in solver_kernels.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../solver.h"
#include "launch.h"
#include "solver_kernels.cuh"

namespace fastdiff {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> solver_step_cuda(
    const at::Tensor& x, const at::Tensor& d1, const std::optional<at::Tensor>& d0, const at::Tensor& w,
    const at::Tensor& sigma_cur, const at::Tensor& sigma_next, const std::optional<at::Tensor>& d_prev,
    const std::optional<at::Tensor>& x_base) {
  TORCH_CHECK(x.is_cuda(), "fastdiff.solver_step (CUDA kernel): expected CUDA tensors, got x on ", x.device());
  solver::Step s = solver::prepare(x, d1, d0, w, sigma_cur, sigma_next, d_prev, x_base);
  if (s.n * s.m == 0) return {s.x_next, s.d, s.denoised};
  auto p = [](const at::Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  cuda::SolverArgs a;
  a.x = p(s.x);
  a.d1 = p(s.d1);
  a.d0 = p(s.d0);
  a.d_prev = p(s.d_prev);
  a.x_base = p(s.x_base);
  a.w = p(s.w);
  a.sigma_cur = p(s.sigma_cur);
  a.sigma_next = p(s.sigma_next);
  a.x_next = s.x_next.mutable_data_ptr();
  a.d = s.d.mutable_data_ptr();
  a.denoised = s.denoised.mutable_data_ptr();
  a.n = s.n;
  a.m = s.m;
  const cuda::DType dt = cuda::dtype_of(s.x, "solver_step");
  cuda::launch_on(s.x, [&](cudaStream_t st) { cuda::launch_solver_step(a, dt, st); });
  return {s.x_next, s.d, s.denoised};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("solver_step", &fastdiff::solver_step_cuda); }
