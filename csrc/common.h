// ATen-side helpers shared by the CPU and CUDA glue: input checks and the layout view that the
// channel-wise kernels work on.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>
#include <vector>

namespace fastdiff {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "fastdiff.", op, ": expected a tensor for '", name, "', got None");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastdiff.", op, ": expected '", name,
              "' to be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na,
                       const char* nb, bool same_shape = true) {
  TORCH_CHECK(a.device() == b.device(), "fastdiff.", op, ": expected '", na, "' and '", nb,
              "' on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastdiff.", op, ": expected '", na, "' and '",
              nb, "' to have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  if (same_shape)
    TORCH_CHECK(a.sizes() == b.sizes(), "fastdiff.", op, ": expected '", na, "' and '", nb,
                "' to have the same shape, got ", a.sizes(), " and ", b.sizes());
}

// A tensor [N, C, *spatial] seen as N x C x S with C either the middle (NCS, "channels first") or the
// innermost (NSC, "channels last") memory dimension. Anything else is made contiguous first.
struct ChannelView {
  at::Tensor t;  // dense tensor in one of the two layouts
  int64_t n, c, s;
  bool channels_last;
};

inline ChannelView channel_view(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "fastdiff.", op, ": expected '", name,
              "' with at least 2 dims [N, C, ...], got shape ", x.sizes());
  int64_t n = x.size(0), c = x.size(1), s = 1;
  for (int64_t d = 2; d < x.dim(); d++) s *= x.size(d);  // not numel / (n c): n or c may be 0
  if (x.dim() == 2) return {x.contiguous(), n, c, s, true};  // [N, C]: both layouts coincide
  if (x.is_contiguous()) return {x, n, c, s, false};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, n, c, s, true};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {x, n, c, s, true};
  return {x.contiguous(), n, c, s, false};
}

// The same view for a second tensor that must share the first one's layout.
inline at::Tensor like_layout(const at::Tensor& x, const ChannelView& ref) {
  if (x.strides() == ref.t.strides()) return x;
  if (!ref.channels_last || ref.t.dim() == 2) return x.contiguous();
  return x.contiguous(ref.t.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                       : at::MemoryFormat::ChannelsLast3d);
}

// Flat dense view for purely elementwise ops: returns tensors that share one dense layout.
inline at::Tensor dense(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous();
}

// Accumulation type of the kernels: double for double, float for everything else.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_weight(const at::Tensor& w, const char* op) {
  check_float(w, op, "w");
  TORCH_CHECK(w.dim() >= 1 && w.size(0) > 0 && w.numel() > 0, "fastdiff.", op,
              ": expected a non-empty weight [out_channels, ...], got shape ", w.sizes());
}

inline void check_t(double t, const char* op) {
  TORCH_CHECK(std::isfinite(t), "fastdiff.", op, ": expected a finite blend weight t, got ", t);
}

// mp_sum's weights on a and b: (1-t, t) / sqrt((1-t)^2 + t^2).
inline std::pair<double, double> mp_sum_weights(double t) {
  check_t(t, "mp_sum");
  const double d = std::sqrt((1 - t) * (1 - t) + t * t);
  return {(1 - t) / d, t / d};
}

// Everything mp_cat needs before its kernel runs: checked inputs in one shared layout, the output
// (channels-last when both inputs are), the N x C x S sizes and the two weights.
struct CatPlan {
  at::Tensor a, b, y;
  int64_t n, ca, cb, s;
  bool channels_last;
  double wa, wb;
};

inline CatPlan plan_mp_cat(const at::Tensor& a_in, const at::Tensor& b_in, double t) {
  check_float(a_in, "mp_cat", "a");
  check_float(b_in, "mp_cat", "b");
  check_same(a_in, b_in, "mp_cat", "a", "b", /*same_shape=*/false);
  TORCH_CHECK(a_in.dim() >= 2 && a_in.dim() == b_in.dim(),
              "fastdiff.mp_cat: expected a and b of the same rank >= 2, got shapes ", a_in.sizes(), " and ",
              b_in.sizes());
  for (int64_t d = 0; d < a_in.dim(); d++)
    TORCH_CHECK(d == 1 || a_in.size(d) == b_in.size(d),
                "fastdiff.mp_cat: expected a and b to match in every dim but 1, got shapes ", a_in.sizes(), " and ",
                b_in.sizes());
  ChannelView va = channel_view(a_in, "mp_cat", "a");
  ChannelView vb = channel_view(b_in, "mp_cat", "b");
  CatPlan p;
  p.channels_last = va.channels_last && vb.channels_last && a_in.dim() > 2;
  p.a = p.channels_last ? va.t : a_in.contiguous();
  p.b = p.channels_last ? vb.t : b_in.contiguous();
  p.n = va.n, p.ca = va.c, p.cb = vb.c, p.s = va.s;
  std::vector<int64_t> shape = p.a.sizes().vec();
  shape[1] = p.ca + p.cb;
  p.y = at::empty(shape, p.a.options());
  if (p.channels_last)
    p.y = p.y.contiguous(p.a.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  check_t(t, "mp_cat");
  const double k = std::sqrt(double(p.ca + p.cb) / ((1 - t) * (1 - t) + t * t));
  p.wa = p.ca > 0 ? k / std::sqrt(double(p.ca)) * (1 - t) : 0.0;  // an empty half has no weight
  p.wb = p.cb > 0 ? k / std::sqrt(double(p.cb)) * t : 0.0;
  return p;
}

// The per-(sample, channel) factor 1 + c of mp_silu_modulate, checked, in the accumulation type.
inline at::Tensor modulation_factor(const at::Tensor& y, const at::Tensor& c, const char* op) {
  check_float(c, op, "c");
  TORCH_CHECK(c.device() == y.device(), "fastdiff.", op, ": expected y and c on the same device, got ", y.device(),
              " and ", c.device());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == y.size(0) && c.size(1) == y.size(1), "fastdiff.", op,
              ": expected c of shape [N, C] = [", y.size(0), ", ", y.size(1), "], got ", c.sizes());
  return (c.to(acc_type(y.scalar_type())) + 1).contiguous();
}

}  // namespace fastdiff
