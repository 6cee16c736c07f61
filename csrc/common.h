// ATen-side helpers shared by the CPU and CUDA glue: input checks and the layout view that the
// channel-wise kernels work on.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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
  int64_t n = x.size(0), c = x.size(1), s = x.numel() / std::max<int64_t>(n * c, 1);
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

}  // namespace fastdiff
