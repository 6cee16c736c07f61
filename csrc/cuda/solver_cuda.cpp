// CUDA glue of fastdiff::solver_step: checks and layouts (csrc/solver.h), then the kernel in solver.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../solver.h"
#include "solver.cuh"

namespace fastdiff {
namespace {

cuda::SolverDtype solver_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::SolverDtype::kFloat;
    case at::kDouble: return cuda::SolverDtype::kDouble;
    case at::kHalf: return cuda::SolverDtype::kHalf;
    case at::kBFloat16: return cuda::SolverDtype::kBFloat16;
    default: TORCH_CHECK(false, "fastdiff.solver_step: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solver_step_cuda(
    const at::Tensor& x, const at::Tensor& d1, const std::optional<at::Tensor>& d0, const at::Tensor& w,
    const at::Tensor& sigma_cur, const at::Tensor& sigma_next, const std::optional<at::Tensor>& d_prev,
    const std::optional<at::Tensor>& x_base) {
  TORCH_CHECK(x.is_cuda(), "fastdiff.solver_step (CUDA kernel): expected CUDA tensors, got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
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
  const cudaError_t err =
      cuda::launch_solver_step(a, solver_dtype(s.x.scalar_type()), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fastdiff.solver_step: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {s.x_next, s.d, s.denoised};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("solver_step", &fastdiff::solver_step_cuda); }
