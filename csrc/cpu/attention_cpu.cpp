// CPU glue of the fused EDM2 cosine attention: input checks, scratch buffers, threading
// (at::parallel_for over batch x heads x tiles) and registration. The loops are attention_kernels.inc,
// compiled per instruction set (attention_kernels.h).
//
// Forward:  phase 1 normalizes k and v of every (n, head) once into float scratch (O(HW * 64) per head);
//           phase 2 runs query tiles against all key tiles (scores tile by tile, never HW x HW).
// Backward: phase 1 normalizes q, k, v again and converts dY; a key-tile pass accumulates dK, dV over
//           all queries and a query-tile pass accumulates dQ over all keys, each tile owned by one task.
//           With many heads, one task runs both passes of a head at once (no recomputation of the
//           scores); it accumulates in the same order, so the result is bitwise the same either way:
//           deterministic and independent of the thread count.
// Heads are processed in groups so the scratch stays bounded (about 64 MiB) for any batch size.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../attention_checks.h"
#include "../common.h"
#include "attention_kernels.h"

namespace fastdiff {
namespace {

using cpu::kAttnBK;
using cpu::kAttnBQ;
using cpu::kAttnDim;

constexpr int64_t kScratchBytes = int64_t(64) << 20;
constexpr int64_t kPrepChunk = 256;  // pixels per phase-1 task

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tasks per parallel_for chunk so that a chunk is worth waking another thread for (~2^18 flops): tiny
// problems (a few pixels, as in gradcheck) then run on the calling thread alone.
int64_t grain_for(int64_t flops_per_task) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(flops_per_task, 1));
}

// Number of heads (over the whole batch) processed at once, so that `per_head` bytes of scratch per
// head stay within kScratchBytes (at least one head).
int64_t head_group(int64_t per_head, int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>(total, kScratchBytes / std::max<int64_t>(per_head, 1)));
}

std::tuple<at::Tensor, at::Tensor> cosine_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads) {
  const AttnShape sh = check_attention_qkv(qkv_in, num_heads, "cosine_attention");
  at::Tensor qkv = qkv_in.contiguous();
  const at::ScalarType st = qkv.scalar_type();
  at::Tensor y = at::empty({sh.n, sh.c, qkv.size(2), qkv.size(3)}, qkv.options());
  at::Tensor lse = at::empty({sh.n, sh.heads, sh.hw}, qkv.options().dtype(acc_type(st)));
  if (y.numel() == 0) return {y, lse};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "cosine_attention", [&] {
    using A = cpu::attn_acc_t<scalar_t>;
    const int64_t HW = sh.hw, ldk = cpu::attn_pad(HW), total = sh.n * sh.heads;
    const int64_t kt_sz = kAttnDim * ldk, v_sz = HW * kAttnDim;
    const int64_t G = head_group((kt_sz + v_sz) * int64_t(sizeof(A)), total);
    at::Tensor scratch = at::empty({G * (kt_sz + v_sz)}, qkv.options().dtype(acc_type(st)));
    A* ktp = scratch.mutable_data_ptr<A>();
    A* vp = ktp + G * kt_sz;
    const scalar_t* xp = qkv.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* lp = lse.mutable_data_ptr<A>();
    const int64_t nprep = ceil_div(HW, kPrepChunk), ntile = ceil_div(HW, kAttnBQ);

    for (int64_t g0 = 0; g0 < total; g0 += G) {
      const int64_t g = std::min(G, total - g0);
      // bh = n * heads + h; the head's qkv base is ((n * heads + h) * 3 * 64) rows of HW.
      const int64_t prep_grain = grain_for(std::min(HW, kPrepChunk) * kAttnDim * 8);
      at::parallel_for(0, g * nprep, prep_grain, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; t++) {
          const int64_t gi = t / nprep, p0 = (t % nprep) * kPrepChunk, bh = g0 + gi;
          cpu::attn_fwd_prep<scalar_t>(xp + bh * 3 * kAttnDim * HW, HW, p0, std::min(HW, p0 + kPrepChunk),
                                       ktp + gi * kt_sz, ldk, vp + gi * v_sz);
        }
      });
      const int64_t tile_grain = grain_for(std::min(HW, kAttnBQ) * HW * kAttnDim * 4);
      at::parallel_for(0, g * ntile, tile_grain, [&](int64_t b, int64_t e) {
        std::vector<A> work(cpu::kAttnFwdWork);
        for (int64_t t = b; t < e; t++) {
          const int64_t gi = t / ntile, q0 = (t % ntile) * kAttnBQ, bh = g0 + gi;
          cpu::attn_fwd_tile<scalar_t>(xp + bh * 3 * kAttnDim * HW, HW, q0, std::min(kAttnBQ, HW - q0),
                                       ktp + gi * kt_sz, ldk, vp + gi * v_sz,
                                       yp + bh * kAttnDim * HW, lp + bh * HW, work.data());
        }
      });
    }
  });
  return {y, lse};
}

at::Tensor cosine_attention_backward_cpu(const at::Tensor& grad_in, const at::Tensor& qkv_in,
                                         const at::Tensor& y_in, const at::Tensor& lse_in,
                                         int64_t num_heads) {
  const AttnShape sh = check_attention_backward(grad_in, qkv_in, y_in, lse_in, num_heads);
  const at::ScalarType st = qkv_in.scalar_type();

  at::Tensor qkv = qkv_in.contiguous(), g = grad_in.contiguous(), y = y_in.contiguous(),
             lse = lse_in.contiguous();
  at::Tensor gx = at::empty(qkv.sizes(), qkv.options());
  if (gx.numel() == 0) return gx;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "cosine_attention_backward", [&] {
    using A = cpu::attn_acc_t<scalar_t>;
    const int64_t HW = sh.hw, ldk = cpu::attn_pad(HW), total = sh.n * sh.heads;
    const int64_t pm = HW * kAttnDim, cm = kAttnDim * ldk;  // pixel-major / channel-major sizes
    const int64_t per = 3 * pm + 2 * cm + HW;                // qs, kn, dy + kt, vt + D
    const int64_t G = head_group(per * int64_t(sizeof(A)), total);
    at::Tensor scratch = at::empty({G * per}, qkv.options().dtype(acc_type(st)));
    A* qs = scratch.mutable_data_ptr<A>();
    A* kn = qs + G * pm;
    A* dy = kn + G * pm;
    A* kt = dy + G * pm;
    A* vt = kt + G * cm;
    A* Dv = vt + G * cm;
    const scalar_t* xp = qkv.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const A* lp = lse.const_data_ptr<A>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    const int64_t nprep = ceil_div(HW, kPrepChunk), nqt = ceil_div(HW, kAttnBQ), nkt = ceil_div(HW, kAttnBK);

    for (int64_t g0 = 0; g0 < total; g0 += G) {
      const int64_t gn = std::min(G, total - g0);
      const int64_t prep_grain = grain_for(std::min(HW, kPrepChunk) * kAttnDim * 12);
      at::parallel_for(0, gn * nprep, prep_grain, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; t++) {
          const int64_t gi = t / nprep, p0 = (t % nprep) * kPrepChunk, bh = g0 + gi;
          cpu::attn_bwd_prep<scalar_t>(xp + bh * 3 * kAttnDim * HW, gp + bh * kAttnDim * HW,
                                       yp + bh * kAttnDim * HW, HW, p0, std::min(HW, p0 + kPrepChunk),
                                       qs + gi * pm, kn + gi * pm, kt + gi * cm, vt + gi * cm, ldk,
                                       dy + gi * pm, Dv + gi * HW);
        }
      });
      if (gn >= 2 * at::get_num_threads()) {
        // Enough heads for every thread: one task per head, both passes fused (no recomputation).
        at::parallel_for(0, gn, grain_for(HW * HW * kAttnDim * 10), [&](int64_t b, int64_t e) {
          std::vector<A> work(cpu::kAttnBwdWork), dq(pm);
          for (int64_t gi = b; gi < e; gi++) {
            const int64_t bh = g0 + gi;
            cpu::attn_bwd_head<scalar_t>(xp + bh * 3 * kAttnDim * HW, HW, qs + gi * pm, kn + gi * pm,
                                         kt + gi * cm, vt + gi * cm, ldk, dy + gi * pm, Dv + gi * HW,
                                         lp + bh * HW, op + bh * 3 * kAttnDim * HW, dq.data(), work.data());
          }
        });
        continue;
      }
      // Few heads: one task list of the key tiles (dK, dV) then the query tiles (dQ) of every head.
      const int64_t per_head = nkt + nqt;
      const int64_t tile_grain = grain_for(std::min(HW, kAttnBQ) * HW * kAttnDim * 8);
      at::parallel_for(0, gn * per_head, tile_grain, [&](int64_t b, int64_t e) {
        std::vector<A> work(cpu::kAttnBwdWork);
        for (int64_t t = b; t < e; t++) {
          const int64_t gi = t / per_head, r = t % per_head, bh = g0 + gi;
          const scalar_t* xh = xp + bh * 3 * kAttnDim * HW;
          scalar_t* gxh = op + bh * 3 * kAttnDim * HW;
          if (r < nkt) {
            const int64_t k0 = r * kAttnBK;
            cpu::attn_bwd_kv_tile<scalar_t>(xh, HW, k0, std::min(kAttnBK, HW - k0), qs + gi * pm,
                                            kt + gi * cm, vt + gi * cm, ldk, dy + gi * pm, Dv + gi * HW,
                                            lp + bh * HW, gxh, work.data());
          } else {
            const int64_t q0 = (r - nkt) * kAttnBQ;
            cpu::attn_bwd_q_tile<scalar_t>(xh, HW, q0, std::min(kAttnBQ, HW - q0), qs + gi * pm,
                                           kn + gi * pm, kt + gi * cm, vt + gi * cm, ldk, dy + gi * pm,
                                           Dv + gi * HW, lp + bh * HW, gxh, work.data());
          }
        }
      });
    }
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("cosine_attention", &cosine_attention_cpu);
  m.impl("cosine_attention_backward", &cosine_attention_backward_cpu);
}

}  // namespace fastdiff
