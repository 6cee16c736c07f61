// The weight transform of the F(2x2, 3x3) / F(6x6, 3x3) Winograd tiles (winograd_tiles.h) as the op
// winograd_weight_tile, and their per-point products on the GEMM micro-kernel; the convolution itself is
// winograd_conv (winograd.cpp), which picks the tile by the point count of the U it is given.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"
#include "isa.h"
#include "winograd_tiles.h"

namespace fastdiff {
namespace cpu {
namespace winograd {

const GemmKernels* streaming_kernels() {
  if (active_isa() == Isa::kAvx2 && gemm_kernels_avx2_prefetch() != nullptr) return gemm_kernels_avx2_prefetch();
  return gemm_kernels();
}

void tile_point_gemms(const GemmKernels* kern, int64_t points, const float* v, const float* u, float* m, int64_t nt,
                      int64_t cinp, int64_t coutp, int64_t n0, int64_t n1) {
  if (points == 36) return kern->point(v, u, m, nt, cinp, coutp, n0, n1);
  const int64_t ns = strips(coutp);
  for (int64_t k = 0; k < points; k++)
    for (int64_t s = n0 / kStrip; s * kStrip < n1; s++) {
      const int64_t width = std::min<int64_t>(kStrip, n1 - kStrip * s);
      kern->plain(v + k * cinp, points * cinp, u + (k * ns + s) * cinp * kStrip, kStrip, m + k * coutp + kStrip * s,
                  points * coutp, nt, width, cinp);
    }
}

}  // namespace winograd
}  // namespace cpu

namespace {

namespace wg = cpu::winograd;

// [(tile + 2)^2, ceil(out_p / 32), in_p, 32] in w's dtype (float32 or float64): winograd_weight's layout
// for the F(2x2) (tile 2) or F(6x6) (tile 6) transform.
at::Tensor winograd_weight_tile_cpu(const at::Tensor& w_in, int64_t tile) {
  const char* op = "winograd_weight_tile";
  check_float(w_in, op, "w");
  TORCH_CHECK(w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kDouble,
              "fastdiff.winograd_weight_tile: expected 'w' in float32 or float64, got ", w_in.scalar_type());
  TORCH_CHECK(tile == 2 || tile == 6, "fastdiff.winograd_weight_tile: expected tile 2 or 6 (F(2x2, 3x3) or ",
              "F(6x6, 3x3); winograd_weight is F(4x4, 3x3)), got ", tile);
  TORCH_CHECK(w_in.dim() == 4 && w_in.size(2) == 3 && w_in.size(3) == 3 && w_in.size(0) > 0 && w_in.size(1) > 0,
              "fastdiff.winograd_weight_tile: expected a non-empty 3x3 weight [out, in, 3, 3], got shape ",
              w_in.sizes());
  at::Tensor w = w_in.contiguous();
  wg::Geometry g{};
  g.cout = w.size(0), g.cin = w.size(1), g.coutp = wg::round_up(g.cout), g.cinp = wg::round_up(g.cin);
  at::Tensor u = at::empty({(tile + 2) * (tile + 2), wg::strips(g.coutp), g.cinp, wg::kStrip}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_weight_tile", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.cinp, std::max<int64_t>(1, 4096 / g.coutp), [&](int64_t b, int64_t e) {
      wg::tile_weight_transform<scalar_t>(int(tile), wp, g, up, b, e);
    });
  });
  return u;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // The F(2x2, 3x3) (tile 2: 16 points) or F(6x6, 3x3) (tile 6: 64 points) weight transform of a
  // [out, in, 3, 3] weight, laid out like winograd_weight's ([points, ceil(out_p / 32), in_p, 32]);
  // winograd_conv takes either and tiles the output accordingly.
  m.def("winograd_weight_tile(Tensor w, int tile) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("winograd_weight_tile", &winograd_weight_tile_cpu); }

}  // namespace fastdiff
