// Device-agnostic compositions: MP conv / linear and the MP weight, built from the per-backend
// fastdiff kernels (found through the dispatcher) and ATen's convolution / matmul.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fastdiff {
namespace {

template <typename Sig> c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor weight_norm_scale(const at::Tensor& w, double eps) {
  static auto h = op<at::Tensor(const at::Tensor&, double)>("fastdiff::weight_norm_scale");
  return h.call(w, eps);
}
at::Tensor scale_rows(const at::Tensor& w, const at::Tensor& coef, std::optional<at::ScalarType> dtype) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<at::ScalarType>)>(
      "fastdiff::scale_rows");
  return h.call(w, coef, dtype);
}
at::Tensor& scale_channels_(at::Tensor& y, const at::Tensor& coef) {
  static auto h = op<at::Tensor&(at::Tensor&, const at::Tensor&)>("fastdiff::scale_channels_");
  return h.call(y, coef);
}
std::tuple<at::Tensor, at::Tensor> weight_norm_backward(const at::Tensor& g, const at::Tensor& w, double eps) {
  static auto h = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>(
      "fastdiff::weight_norm_backward");
  return h.call(g, w, eps);
}

void check_gain(const at::Tensor& gain, const at::Tensor& w, const char* name) {
  check_float(gain, name, "gain");
  TORCH_CHECK(gain.numel() == 1 && gain.dim() <= 1, "fastdiff.", name,
              ": expected a scalar gain (0-d tensor), got shape ", gain.sizes());
  TORCH_CHECK(gain.device() == w.device() || gain.device().is_cpu(), "fastdiff.", name,
              ": expected gain on ", w.device(), " or the CPU, got ", gain.device());
}

// Per-output-row factor gain * s_o / sqrt(fan_in), float32 (float64 for float64 weights).
at::Tensor row_coef(const at::Tensor& w, const at::Tensor& gain, double eps) {
  at::Tensor s = weight_norm_scale(w, eps);
  const double fan_in = double(w.numel() / w.size(0));
  return s * (gain.to(s.device(), s.scalar_type()).reshape({}) / std::sqrt(fan_in));
}

void check_conv_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gain, const char* name) {
  check_float(x, name, "x");
  check_float(w, name, "w");
  check_gain(gain, w, name);
  TORCH_CHECK(x.device() == w.device(), "fastdiff.", name, ": expected x and w on the same device, got ",
              x.device(), " and ", w.device());
  TORCH_CHECK(w.dim() == 2 || w.dim() == 4, "fastdiff.", name,
              ": expected a 2-D (linear) or 4-D (conv) weight, got shape ", w.sizes());
  TORCH_CHECK(w.numel() > 0, "fastdiff.", name, ": expected a non-empty weight, got shape ", w.sizes());
  if (w.dim() == 4) {
    TORCH_CHECK(x.dim() == 4 && x.size(1) == w.size(1), "fastdiff.", name, ": expected x of shape [N, ", w.size(1),
                ", H, W] for a weight of shape ", w.sizes(), ", got ", x.sizes());
    TORCH_CHECK(w.size(2) % 2 == 1 && w.size(3) % 2 == 1, "fastdiff.", name,
                ": expected an odd kernel size (padding k//2 keeps the size), got ", w.sizes());
  } else {
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "fastdiff.", name, ": expected x of shape [..., ",
                w.size(1), "] for a weight of shape ", w.sizes(), ", got ", x.sizes());
  }
}

// A 1x1 convolution that fastdiff's own GEMM micro-kernel takes (fastdiff::conv1x1, csrc/cpu/conv1x1_cpu.cpp):
// CPU, float32, contiguous, H W a multiple of 8, at least 8 channels each side. Measured against ATen's
// oneDNN / im2col paths at the EDM2 blocks' attention and skip shapes: forward 1.1-7x, backward 1.1-8x.
bool own_1x1(const at::Tensor& x, const at::Tensor& w) {
  return w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && x.is_cpu() && x.scalar_type() == at::kFloat &&
         w.scalar_type() == at::kFloat && x.dim() == 4 && x.is_contiguous() && (x.size(2) * x.size(3)) % 8 == 0 &&
         w.size(0) >= 8 && w.size(1) >= 8 && x.numel() > 0;
}
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w) {
  static auto h = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("fastdiff::conv1x1");
  return h.call(x, w);
}

at::Tensor raw_conv(const at::Tensor& x, const at::Tensor& w) {
  if (w.dim() == 2) return at::matmul(x, w.t());
  if (own_1x1(x, w)) return conv1x1(x, w);
  return at::conv2d(x, w, {}, {1, 1}, {w.size(2) / 2, w.size(3) / 2});
}

at::Tensor mp_weight(const at::Tensor& w, const at::Tensor& gain, double eps, std::optional<at::ScalarType> dtype) {
  check_float(w, "mp_weight", "w");
  check_gain(gain, w, "mp_weight");
  return scale_rows(w, row_coef(w, gain, eps), dtype);
}

at::Tensor mp_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gain, double eps) {
  check_conv_inputs(x, w, gain, "mp_conv");
  at::Tensor coef = row_coef(w, gain, eps);
  const int64_t out_numel = x.numel() / w.size(1) * w.size(0);
  // Apply the per-row factor where it is cheapest: on the weight when a cast copy of it is needed
  // anyway or it is the smaller tensor, else in place on the output (no weight copy at all).
  if (w.scalar_type() != x.scalar_type() || w.numel() <= out_numel)
    return raw_conv(x, scale_rows(w, coef, x.scalar_type()));
  at::Tensor y = raw_conv(x, w);
  if (w.dim() == 2) {
    at::Tensor flat = y.view({-1, w.size(0)});
    scale_channels_(flat, coef);
  } else {
    scale_channels_(y, coef);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mp_conv_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& w, const at::Tensor& gain,
                                                                double eps, std::array<bool, 3> mask) {
  check_conv_inputs(x, w, gain, "mp_conv_backward");
  const double fan_in = double(w.numel() / w.size(0));
  at::Tensor w_hat = scale_rows(w, row_coef(w, gain, eps), x.scalar_type());
  at::Tensor g = grad.to(x.scalar_type());
  at::Tensor dx, gw;  // gw: gradient w.r.t. W_hat
  const bool need_w = mask[1] || mask[2];
  if (w.dim() == 4 && own_1x1(x, w_hat) && g.size(1) >= 8) {
    // dx = W_hat^T g per sample (the same micro-kernel); dW_hat = sum over samples of g x^T (ATen's bmm).
    const int64_t n = x.size(0), hw = x.size(2) * x.size(3), co = w.size(0), ci = w.size(1);
    if (mask[0]) dx = conv1x1(g.contiguous(), w_hat.reshape({co, ci}).t().contiguous());
    if (need_w)
      gw = at::matmul(g.reshape({n, co, hw}), x.reshape({n, ci, hw}).transpose(1, 2)).sum(0).reshape({co, ci, 1, 1});
  } else if (w.dim() == 4) {
    auto r = at::convolution_backward(g, x, w_hat, std::nullopt, {1, 1}, {w.size(2) / 2, w.size(3) / 2}, {1, 1},
                                      false, {0, 0}, 1, {mask[0], need_w, false});
    dx = std::get<0>(r);
    gw = std::get<1>(r);
  } else {
    if (mask[0]) dx = at::matmul(g, w_hat);
    if (need_w) gw = at::mm(g.reshape({-1, w.size(0)}).t(), x.reshape({-1, w.size(1)}));
  }
  at::Tensor dw, dgain;
  if (need_w) {
    auto [dwu, dot] = weight_norm_backward(gw.to(w.scalar_type()), w, eps);
    if (mask[1]) dw = dwu * (gain.to(dwu.device(), dwu.scalar_type()).reshape({}) / std::sqrt(fan_in));
    if (mask[2]) dgain = (dot.sum() / std::sqrt(fan_in)).to(gain.device(), gain.scalar_type()).reshape(gain.sizes());
  }
  return {dx, dw, dgain};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CompositeExplicitAutograd, m) {
  m.impl("mp_weight", &mp_weight);
  m.impl("mp_conv", &mp_conv);
  m.impl("mp_conv_backward", &mp_conv_backward);
}

}  // namespace fastdiff
