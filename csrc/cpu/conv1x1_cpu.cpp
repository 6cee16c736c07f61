// The 1x1 MP convolution's product y[i] = W x[i] ([out, in] @ [in, H W] per sample) on the register-blocked
// micro-kernel of gemm.inc (float32, AVX2 / AVX-512), samples and column blocks over threads (one 8x8 map:
// blocks of output channels).
// It stands in for ATen's 1x1 convolution in eval mode (MPConv with a cached effective weight): at EDM2's
// attention and skip shapes that ran at 45-100 GFLOP/s (oneDNN at 2 threads, the im2col path at 1), the
// micro-kernel at 100-110 in cache. float64, channels-last inputs, maps whose H W is not a multiple of 8
// and hosts without AVX2 take at::matmul.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../common.h"
#include "gemm.h"
#include "workspace.h"

namespace fastdiff {
namespace {

at::Tensor conv1x1_cpu(const at::Tensor& x_in, const at::Tensor& w_in) {
  const char* op = "conv1x1";
  check_float(x_in, op, "x");
  check_same(x_in, w_in, op, "x", "w", /*same_shape=*/false);
  TORCH_CHECK(x_in.dim() == 4, "fastdiff.conv1x1: expected x of shape [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK((w_in.dim() == 2 || (w_in.dim() == 4 && w_in.size(2) == 1 && w_in.size(3) == 1)) &&
                  w_in.size(1) == x_in.size(1),
              "fastdiff.conv1x1: expected w of shape [out, ", x_in.size(1), "] or [out, ", x_in.size(1),
              ", 1, 1], got ", w_in.sizes());
  const int64_t n = x_in.size(0), cin = x_in.size(1), h = x_in.size(2), wd = x_in.size(3), hw = h * wd;
  const int64_t cout = w_in.size(0);
  const at::Tensor w = w_in.reshape({cout, cin}).contiguous();
  const cpu::GemmKernels* kern = x_in.scalar_type() == at::kFloat ? cpu::gemm_kernels() : nullptr;
  const auto gemm = kern != nullptr ? kern->plain : nullptr;
  const bool channels_last = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (gemm == nullptr || hw % 8 != 0 || channels_last || x_in.numel() == 0 || cin == 0) {
    at::Tensor y = at::matmul(w, x_in.reshape({n, cin, hw})).reshape({n, cout, h, wd});
    return channels_last ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({n, cout, h, wd}, x.options());
  const int64_t threads = std::max(1, at::get_num_threads());
  const float* wp = w.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  if (threads > 1 && n == 1 && hw <= 64 && cout >= 48 * threads) {
    // One small map (8x8 at batch 1): the threads share the output channels (row blocks of W, multiples of
    // the micro-kernel's 6 rows), so each reads its part of the weight once; split by columns, each thread
    // streamed all of it for 32 pixels. Same products, same sums: the same bits. AMD Zen 2, 2 threads, a
    // weight made cold by 7 others, interleaved: 768 -> 2304 channels 1.61 -> 1.32 ms, 768 -> 768 0.50 ->
    // 0.42, 1536 -> 768 0.96 -> 0.85; hot 1.0-1.07x. On 16x16 maps (rows 1 KiB apart, the packed path
    // below) this order was 1.1-1.15x slower.
    const int64_t per = (cout / threads + 5) / 6 * 6;
    at::parallel_for(0, (cout + per - 1) / per, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; p++) {
        const int64_t r0 = p * per;
        gemm(wp + r0 * cin, cin, xp, hw, yp + r0 * hw, hw, std::min(per, cout - r0), hw, cin);
      }
    });
    return y;
  }
  // Column blocks (multiples of 32 pixels) so that every thread has work even at batch 1.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((threads + n - 1) / n, hw / 32));
  const int64_t block = (hw / parts + 31) / 32 * 32;
  const int64_t nblocks = (hw + block - 1) / block;
  // x's rows are H W floats apart: on a 32x32 or 64x64 map a power of two of 4-16 KiB, so the column strip
  // the micro-kernel keeps in L1 (all input channels, 16 columns) falls into one or a few cache sets and
  // is read from L3 at every row block (45-57 GFLOP/s on EDM2's 1x1 shapes there, against 80-90 on 8x8 /
  // 16x16 maps). Wider maps copy kPanel columns at a time into a contiguous [in][kPanel] panel first.
  constexpr int64_t kPanel = 64;
  const bool packed = hw >= 256;
  const int64_t slots = std::min<int64_t>(threads, n * nblocks);
  at::Tensor panels = packed ? cpu::workspace({{slots, cin, kPanel}}, x.options())[0] : at::Tensor();
  at::parallel_for(0, n * nblocks, 1, [&](int64_t b, int64_t e) {
    float* panel = packed ? panels.mutable_data_ptr<float>() +
                                std::min<int64_t>(at::get_thread_num(), slots - 1) * cin * kPanel
                          : nullptr;
    for (int64_t item = b; item < e; item++) {
      const int64_t i = item / nblocks, c0 = (item % nblocks) * block, nc = std::min(block, hw - c0);
      const float* xi = xp + i * cin * hw;
      float* yi = yp + i * cout * hw;
      if (!packed) {
        gemm(wp, cin, xi + c0, hw, yi + c0, hw, cout, nc, cin);
        continue;
      }
      for (int64_t j = c0; j < c0 + nc; j += kPanel) {
        const int64_t width = std::min(kPanel, c0 + nc - j);  // a multiple of 8, as hw is
        for (int64_t k = 0; k < cin; k++)
          std::memcpy(panel + k * kPanel, xi + k * hw + j, width * sizeof(float));
        gemm(wp, cin, panel, kPanel, yi + j, hw, cout, width, cin);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) { m.impl("conv1x1", &conv1x1_cpu); }

}  // namespace fastdiff
