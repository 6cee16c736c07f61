// ATen-side planning shared by the CPU and CUDA glue of the block-level fusions (cpu/block_cpu.cpp,
// cuda/block_cuda.cpp): input checks and the layouts the kernels run on.
//   mp_sum_clip(_silu)(_backward): flat elementwise over one shared dense layout (any dense layout is
//     kept, channels_last included; mismatched layouts fall back to contiguous).
//   attention_qkv_norm(_backward): qkv [N, 3C, H, W] read channels-first or channels-last as it comes;
//     q, k, v written as [N, H W, heads, D] memory and returned as [N, heads, H W, D] views, the layout
//     scaled_dot_product_attention's flash / memory-efficient kernels read without a copy.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common.h"

namespace fastdiff {

struct SumClipPlan {
  std::vector<at::Tensor> ts;  // the inputs, in one shared dense layout
  double wa, wb, limit;
};

inline void check_limit(double limit, const char* op) {
  TORCH_CHECK(!std::isnan(limit), "fastdiff.", op, ": expected a clip limit (<= 0 for none), got NaN");
}

// The inputs in one dense layout: kept where they already share one, else all made contiguous.
inline std::vector<at::Tensor> shared_layout(std::vector<at::Tensor> ts) {
  bool same = true;
  for (auto& t : ts) t = dense(t);
  for (auto& t : ts) same = same && t.strides() == ts[0].strides();
  if (!same)
    for (auto& t : ts) t = t.contiguous();
  return ts;
}

inline SumClipPlan plan_sum_clip(const at::Tensor& a, const at::Tensor& b, double t, double limit, const char* op) {
  check_float(a, op, "a");
  check_float(b, op, "b");
  check_same(a, b, op, "a", "b");
  check_limit(limit, op);
  check_t(t, op);
  const auto w = mp_sum_weights(t);
  return {shared_layout({a, b}), w.first, w.second, limit};
}

inline SumClipPlan plan_sum_clip_backward(const at::Tensor& grad, const std::optional<at::Tensor>& grad_silu,
                                          const at::Tensor& a, const at::Tensor& b, double t, double limit) {
  const char* op = "mp_sum_clip_backward";
  SumClipPlan p = plan_sum_clip(a, b, t, limit, op);
  check_same(grad, a, op, "grad", "a");
  std::vector<at::Tensor> ts = {grad, a, b};
  if (grad_silu.has_value() && grad_silu->defined()) {
    check_same(*grad_silu, a, op, "grad_silu", "a");
    ts.push_back(*grad_silu);
  }
  p.ts = shared_layout(ts);  // grad, a, b[, grad_silu]
  return p;
}

struct QkvPlan {
  at::Tensor qkv;  // channels-first contiguous or channels-last
  int64_t n, s, heads, d;
  bool channels_last;
};

inline QkvPlan plan_qkv(const at::Tensor& qkv, int64_t num_heads, const char* op) {
  check_float(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 4, "fastdiff.", op, ": expected qkv of shape [N, 3C, H, W], got ", qkv.sizes());
  TORCH_CHECK(num_heads >= 1 && qkv.size(1) % (3 * num_heads) == 0 && qkv.size(1) > 0, "fastdiff.", op,
              ": expected the channel count (", qkv.size(1), ") to be a positive multiple of 3 * num_heads = ",
              3 * num_heads);
  QkvPlan p;
  p.n = qkv.size(0);
  p.s = qkv.size(2) * qkv.size(3);
  p.heads = num_heads;
  p.d = qkv.size(1) / (3 * num_heads);
  if (qkv.is_contiguous()) {
    p.qkv = qkv;
    p.channels_last = false;
  } else if (qkv.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    p.qkv = qkv;
    p.channels_last = true;
  } else {
    p.qkv = qkv.contiguous();
    p.channels_last = false;
  }
  return p;
}

// A fresh [N, S, heads, D] buffer seen as [N, heads, S, D].
inline at::Tensor qkv_out(const QkvPlan& p) {
  return at::empty({p.n, p.s, p.heads, p.d}, p.qkv.options()).transpose(1, 2);
}

// A gradient [N, heads, S, D] as contiguous [N, S, heads, D] memory (no copy when it already is).
inline at::Tensor qkv_grad_in(const at::Tensor& g, const QkvPlan& p, const char* name) {
  const char* op = "attention_qkv_norm_backward";
  check_same(g, p.qkv, op, name, "qkv", /*same_shape=*/false);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == p.n && g.size(1) == p.heads && g.size(2) == p.s && g.size(3) == p.d,
              "fastdiff.", op, ": expected '", name, "' of shape [", p.n, ", ", p.heads, ", ", p.s, ", ", p.d,
              "], got ", g.sizes());
  return g.transpose(1, 2).contiguous();
}

// The gradient w.r.t. qkv, in the layout the kernel read qkv in.
inline at::Tensor qkv_grad_out(const QkvPlan& p) {
  return at::empty(p.qkv.sizes(), p.qkv.options().memory_format(p.channels_last ? at::MemoryFormat::ChannelsLast
                                                                                  : at::MemoryFormat::Contiguous));
}

// Checks of mp_silu_modulate's conditioning c ([N, C], same device as y).
inline void check_cond(const at::Tensor& y, const at::Tensor& c, const char* op) {
  check_float(c, op, "c");
  TORCH_CHECK(c.device() == y.device(), "fastdiff.", op, ": expected y and c on the same device, got ", y.device(),
              " and ", c.device());
  TORCH_CHECK(y.dim() >= 2 && c.dim() == 2 && c.size(0) == y.size(0) && c.size(1) == y.size(1), "fastdiff.", op,
              ": expected c of shape [N, C] = [", y.size(0), ", ", y.size(1), "], got ", c.sizes());
}

}  // namespace fastdiff
