// CPU glue of the Winograd MP convolution (3x3, stride 1, padding 1) and of its weight gradient: checks,
// layouts, tile chunks, scratch memory, threading (at::parallel_for over rows, chunks of tiles or, for
// few tiles, output columns) and the 36 per-point GEMMs of each chunk on the micro-kernel of
// gemm.inc (float32 with AVX2 or AVX-512; ATen's bmm for float64 and the baseline level). The
// transforms are the raw loops of winograd_kernels.inc; scratch memory comes from workspace.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <vector>

#include "../common.h"
#include "isa.h"
#include "gemm.h"
#include "winograd_kernels.h"
#include "workspace.h"

namespace fastdiff {
namespace {

namespace wg = cpu::winograd;

void check_winograd_dtype(const at::Tensor& t, const char* op, const char* name) {
  check_float(t, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastdiff.", op, ": expected '", name,
              "' in float32 or float64 (the Winograd kernels have no float16 / bfloat16 form), got ", t.scalar_type());
}

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// [36, round_up(cin), round_up(cout)] in w's dtype (float32 or float64).
at::Tensor winograd_weight_cpu(const at::Tensor& w_in) {
  check_winograd_dtype(w_in, "winograd_weight", "w");
  TORCH_CHECK(w_in.dim() == 4 && w_in.size(2) == 3 && w_in.size(3) == 3 && w_in.size(0) > 0 && w_in.size(1) > 0,
              "fastdiff.winograd_weight: expected a non-empty 3x3 weight [out, in, 3, 3], got shape ", w_in.sizes());
  at::Tensor w = w_in.contiguous();
  wg::Geometry g{};
  g.cout = w.size(0), g.cin = w.size(1), g.coutp = wg::round_up(g.cout), g.cinp = wg::round_up(g.cin);
  at::Tensor u = at::empty({36, wg::strips(g.coutp), g.cinp, wg::kStrip}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "winograd_weight", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* up = u.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.cinp, std::max<int64_t>(1, 4096 / g.coutp), [&](int64_t b, int64_t e) {
      wg::weight_transform<scalar_t>(wp, g, up, b, e);
    });
  });
  return u;
}

// [(tile + 2)^2, ceil(out_p / 32), in_p, 32] in w's dtype (float32 or float64): winograd_weight's layout
// for the F(2x2) (tile 2) or F(6x6) (tile 6) transform.
at::Tensor winograd_weight_tile_cpu(const at::Tensor& w_in, int64_t tile) {
  check_winograd_dtype(w_in, "winograd_weight_tile", "w");
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

// M[:, k] = V[:, k] U[k] for the P points of a chunk of nt tiles (float32), output columns [n0, n1): the
// micro-kernel's own 36-point loop for F(4x4), its plain product per point and strip for the other tiles.
void point_gemms(const cpu::GemmKernels* kern, int64_t points, const float* v, const float* u, float* m, int64_t nt,
                 int64_t cinp, int64_t coutp, int64_t n0, int64_t n1) {
  if (points == 36) return kern->point(v, u, m, nt, cinp, coutp, n0, n1);
  const int64_t ns = wg::strips(coutp);
  for (int64_t k = 0; k < points; k++)
    for (int64_t s = n0 / wg::kStrip; s * wg::kStrip < n1; s++) {
      const int64_t width = std::min<int64_t>(wg::kStrip, n1 - wg::kStrip * s);
      kern->plain(v + k * cinp, points * cinp, u + (k * ns + s) * cinp * wg::kStrip, wg::kStrip,
                  m + k * coutp + wg::kStrip * s, points * coutp, nt, width, cinp);
    }
}

const cpu::GemmKernels* float_kernels(at::ScalarType st) { return st == at::kFloat ? cpu::gemm_kernels() : nullptr; }

// A [rows] vector (rows <= padded) in `dtype`, zero-padded to `padded`, contiguous (v itself when it is
// that already: the common case, channel counts being multiples of 8).
at::Tensor padded_vector(const at::Tensor& v, int64_t padded, at::ScalarType dtype) {
  if (v.numel() == padded && v.scalar_type() == dtype && v.is_contiguous()) return v.reshape({-1});
  at::Tensor out = at::zeros({padded}, v.options().dtype(dtype));
  out.narrow(0, 0, v.numel()).copy_(v.reshape({-1}));
  return out;
}

// x ([N, C, H, W], contiguous or channels-last) into xt ([N, hp, wp, cinp]), the padded NHWC rows of
// winograd_kernels.h, through mp_silu when `silu`; g's cin / cinp are x's channels.
template <typename T> void pack(const at::Tensor& x, bool channels_last, bool silu, const wg::Geometry& g, at::Tensor& xt) {
  const T* xp = x.const_data_ptr<T>();
  T* xtp = xt.mutable_data_ptr<T>();
  at::parallel_for(0, g.n * g.hp, std::max<int64_t>(1, 16384 / (g.wp * g.cinp)), [&](int64_t b, int64_t e) {
    wg::pack_input<T>(xp, channels_last, silu, g, xtp, b, e);
  });
}

// The most tiles per chunk: transform-domain buffers (V and M, or V and Gt) of about 0.5 MiB each stay
// in L2 (measured: 0.5 MiB beat 2 MiB, 0.25 similar), and at least 32 tiles.
int64_t max_chunk(const wg::Geometry& g, int64_t elem_size, int64_t points = 36) {
  return std::max<int64_t>(32, (int64_t(512) << 10) / (points * std::max(g.cinp, g.coutp) * elem_size));
}

// Tiles per chunk of the convolution: at most max_chunk, and the same number of chunks for every thread
// (3 chunks on 2 threads had one thread do 7 times the other's tiles).
// u_bytes: the transformed weight's size.
int64_t chunk_tiles(const wg::Geometry& g, int64_t elem_size, int64_t points, int64_t u_bytes) {
  const int64_t tiles = g.tiles(), threads = std::max(1, at::get_num_threads());
  // A transformed weight that does not stay in the last-level cache beside the packed input and the chunks
  // (over 8 MiB) is read from memory once per chunk, so larger chunks there (AMD Zen 2, 16 MiB L3,
  // interleaved): 64 tiles against 32 gave 1.15-1.3x for 384-768 channels on 32x32 and 64x64 maps, 128
  // against 64 another 1.05x (1 thread) / 1.1-1.15x (2 threads) for 384 -> 192 channels on a 64x64 map, 1.03x
  // for 384 -> 384, even elsewhere; 32 stays better for a 5 MiB weight.
  const int64_t most = std::max<int64_t>(u_bytes > (int64_t(8) << 20) ? 128 : 32, max_chunk(g, elem_size, points));
  const int64_t per_thread = (tiles + threads - 1) / threads;
  const int64_t chunks_each = (per_thread + most - 1) / most;
  return std::max<int64_t>(1, (per_thread + chunks_each - 1) / chunks_each);
}

at::Tensor winograd_conv_cpu(const at::Tensor& x_in, const at::Tensor& u_in, const at::Tensor& scale, bool silu_in,
                             const std::optional<at::Tensor>& mod, const std::optional<at::Tensor>& res_in, double t,
                             double clip) {
  const char* op = "winograd_conv";
  check_winograd_dtype(x_in, op, "x");
  check_same(x_in, u_in, op, "x", "u", /*same_shape=*/false);
  const at::Tensor u = u_in.contiguous();
  check_float(scale, op, "scale");
  TORCH_CHECK(x_in.dim() == 4, "fastdiff.winograd_conv: expected x of shape [N, C, H, W], got ", x_in.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) > 0,
              "fastdiff.winograd_conv: expected scale of shape [out_channels], got ", scale.sizes());
  wg::Geometry g{};
  g.n = x_in.size(0), g.cin = x_in.size(1), g.h = x_in.size(2), g.w = x_in.size(3);
  g.cout = scale.size(0), g.cinp = wg::round_up(g.cin), g.coutp = wg::round_up(g.cout);
  // U's point count picks the tile: 36 F(4x4, 3x3), 16 F(2x2), 64 F(6x6) (winograd_kernels.h, tile_of_points).
  const int64_t points = u.dim() == 4 ? u.size(0) : 0, tile = wg::tile_of_points(points);
  TORCH_CHECK(tile > 0 && u.size(1) == wg::strips(g.coutp) && u.size(2) == g.cinp && u.size(3) == wg::kStrip,
              "fastdiff.winograd_conv: expected u of shape [36 (or 16 / 64), ", wg::strips(g.coutp), ", ", g.cinp, ", ",
              wg::kStrip, "] (winograd_weight or winograd_weight_tile of a [", g.cout, ", ", g.cin,
              ", 3, 3] weight), got ", u.sizes());
  g.th = (g.h + tile - 1) / tile, g.tw = (g.w + tile - 1) / tile, g.hp = tile * g.th + 2, g.wp = tile * g.tw + 2;

  const bool cl = is_channels_last(x_in);
  at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor y = at::empty({g.n, g.cout, g.h, g.w}, x.options());
  if (cl) y = y.contiguous(at::MemoryFormat::ChannelsLast);
  const at::ScalarType st = x.scalar_type();

  at::Tensor modf, res;
  if (mod.has_value()) {
    modf = modulation_factor(y, *mod, op);  // 1 + c, [N, C] in the accumulation type
    if (modf.numel() > 0 && (g.coutp != g.cout || modf.scalar_type() != st || !modf.is_contiguous()))
      modf = at::constant_pad_nd(modf.to(st), {0, g.coutp - g.cout}).contiguous();
  }
  if (res_in.has_value()) {
    check_same(*res_in, y, op, "res", "the output");
    res = cl ? res_in->contiguous(at::MemoryFormat::ChannelsLast) : res_in->contiguous();
  }
  if (y.numel() == 0) return y;
  at::Tensor sc = padded_vector(scale.to(x.device()), g.coutp, st);

  AT_DISPATCH_FLOATING_TYPES(st, "winograd_conv", [&] {
    using T = scalar_t;

    wg::Epilogue<T> ep;
    ep.scale = sc.const_data_ptr<T>();
    ep.mod = modf.defined() ? modf.const_data_ptr<T>() : nullptr;
    ep.res = res.defined() ? res.const_data_ptr<T>() : nullptr;
    if (ep.res) {
      auto [wa, wb] = mp_sum_weights(t);
      ep.wa = T(wa), ep.wb = T(wb);
    }
    ep.clip = T(clip > 0 ? clip : 0);

    // Tiles in chunks whose transform-domain buffers (V and M, together about 1 MiB) stay in L2, and at
    // least one chunk per thread; each thread runs whole chunks (transform, 36 GEMMs, output transform) on
    // its own buffers, so a convolution is two parallel regions however many chunks it has.
    const int64_t tiles = g.tiles(), threads = std::max(1, at::get_num_threads());
    // The products take the table that prefetches U (gemm.h, streaming_gemm_kernels) at every size: in a
    // network each convolution reads its own transformed weight, 4x the 3x3 weight and evicted by the other
    // layers' (small-32's add up to 89 MiB), so U comes from memory on every call, not only where it
    // exceeds the last-level cache. AMD Zen 2, 1 thread, a weight made cold by 23 others, interleaved: 128
    // channels on 16x16 at batch 1 0.445 -> 0.337 ms, on 8x8 0.24 -> 0.20, 256 on 8x8 0.89 -> 0.75, 128 on
    // 32x32 1.40 -> 1.25, batch 8 of 128 on 8x8 0.78 -> 0.69; a cache-resident weight the same (+-1-2%).
    const cpu::GemmKernels* kern = st == at::kFloat ? cpu::streaming_gemm_kernels() : nullptr;
    const int64_t u_bytes = points * g.cinp * g.coutp * int64_t(sizeof(T));  // the transformed weight's size
    const auto gemm = kern != nullptr ? kern->point : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    // The transforms of U's tile: F(4x4) or, by the tile_* functions, F(2x2) / F(6x6) (winograd_kernels.h).
    auto in_tf = [tile](const T* xt, const wg::Geometry& gg, int64_t t0, int64_t ta, int64_t tb, T* v) {
      if (tile == 4) wg::input_transform<T>(xt, gg, t0, ta, tb, v);
      else wg::tile_input_transform<T>(int(tile), xt, gg, t0, ta, tb, v);
    };
    auto out_tf = [tile](const T* m, const wg::Geometry& gg, int64_t t0, int64_t ta, int64_t tb,
                         const wg::Epilogue<T>& e, bool chl, T* out) {
      if (tile == 4) wg::output_transform<T>(m, gg, t0, ta, tb, e, chl, out);
      else wg::tile_output_transform<T>(int(tile), m, gg, t0, ta, tb, e, chl, out);
    };
    // Few tiles (an 8x8 or 16x16 map at batch 1) and a large transformed weight (4 MiB or more): one chunk
    // whose products the threads share by output columns, so the weight (which then dominates the time) is
    // streamed once, not per thread; below 4M multiply-adds (e.g. 128 channels on an 8x8 map) all on one
    // thread, which measured faster than three parallel regions (idle AMD Zen 4, 2 threads: 0.26 ms split,
    // 0.19 ms on one thread). A smaller weight costs each thread little to read, even from memory (128
    // channels on 16x16, cold: 0.27 ms in tile chunks, 0.31-0.39 split), and the chunks below (tiles split
    // over the threads) scale better: AMD Zen 2, 2 threads, interleaved, 64
    // channels on a 32x32 map 0.44 -> 0.28 ms (the column split was slower than 1 thread's 0.42), 128 on
    // 16x16 0.46 -> 0.40, 128 -> 64 on 32x32 0.64 -> 0.54; 576 on 16x16 (12 MiB) stays split: 3.5 vs 4.7-5.1 ms.
    const bool serial = points * tiles * g.cinp * g.coutp < int64_t(4) << 20;
    if (threads > 1 && gemm != nullptr && tiles <= 64 && g.coutp >= 64 && (serial || u_bytes >= int64_t(4) << 20)) {
      auto par = [serial](int64_t n, const std::function<void(int64_t, int64_t)>& f) {
        if (serial) f(0, n);
        else at::parallel_for(0, n, 1, f);
      };
      auto ws = cpu::workspace({{g.n, g.hp, g.wp, g.cinp}, {tiles, points, g.cinp}, {tiles, points, g.coutp}}, x.options());
      pack<T>(x, cl, silu_in, g, ws[0]);
      const T* xtc = ws[0].const_data_ptr<T>();
      T* vp = ws[1].mutable_data_ptr<T>();
      T* mp = ws[2].mutable_data_ptr<T>();
      par(tiles, [&](int64_t b, int64_t e) { in_tf(xtc, g, 0, b, e, vp); });
      par(g.coutp / 32 + (g.coutp % 32 != 0), [&](int64_t b, int64_t e) {
        point_gemms(kern, points, reinterpret_cast<const float*>(vp),
                             reinterpret_cast<const float*>(u.const_data_ptr<T>()), reinterpret_cast<float*>(mp),
                             tiles, g.cinp, g.coutp, 32 * b, std::min(g.coutp, 32 * e));
      });
      par(tiles, [&](int64_t b, int64_t e) { out_tf(mp, g, 0, b, e, ep, cl, yp); });
      return;
    }
    const int64_t chunk = chunk_tiles(g, sizeof(T), points, u_bytes);
    const int64_t nchunks = (tiles + chunk - 1) / chunk;
    const int64_t slots = std::min<int64_t>(threads, nchunks);
    // The fallback's BLAS takes U as rows [36][cinp][coutp].
    const at::Tensor u_rows = gemm != nullptr ? at::Tensor()
        : u.permute({0, 2, 1, 3}).reshape({points, g.cinp, -1}).narrow(2, 0, g.coutp).contiguous();
    auto ws = cpu::workspace({{g.n, g.hp, g.wp, g.cinp}, {slots, chunk, points, g.cinp}, {slots, chunk, points, g.coutp}},
                        x.options());
    at::Tensor &xt = ws[0], &v = ws[1], &m = ws[2];
    pack<T>(x, cl, silu_in, g, xt);
    const T* xtc = xt.const_data_ptr<T>();
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      const int64_t slot = std::min<int64_t>(at::get_thread_num(), slots - 1);
      at::Tensor vs = v[slot], ms = m[slot];
      T* vp = vs.mutable_data_ptr<T>();
      T* mp = ms.mutable_data_ptr<T>();
      for (int64_t ci = b; ci < e; ci++) {
        const int64_t t0 = ci * chunk, t1 = std::min(tiles, t0 + chunk), nt = t1 - t0;
        in_tf(xtc, g, t0, t0, t1, vp);
        if (gemm != nullptr) {
          point_gemms(kern, points, reinterpret_cast<const float*>(vp),
                               reinterpret_cast<const float*>(u.const_data_ptr<T>()), reinterpret_cast<float*>(mp), nt,
                               g.cinp, g.coutp, 0, g.coutp);
        } else {  // float64, or no AVX2: ATen's bmm on [36, nt, c] views of the tile-major buffers
          ms.narrow(0, 0, nt).transpose(0, 1).copy_(at::bmm(vs.narrow(0, 0, nt).transpose(0, 1), u_rows));
        }
        out_tf(mp, g, t0, t0, t1, ep, cl, yp);
      }
    });
  });
  return y;
}

// d/dW of conv2d(x, W, padding 1) for a 3x3 W and the output gradient `grad`: [out, in, 3, 3] in x's dtype.
at::Tensor winograd_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& grad_in) {
  const char* op = "winograd_weight_grad";
  check_winograd_dtype(x_in, op, "x");
  check_same(x_in, grad_in, op, "x", "grad", /*same_shape=*/false);
  TORCH_CHECK(x_in.dim() == 4 && grad_in.dim() == 4 && grad_in.size(0) == x_in.size(0) &&
                  grad_in.size(2) == x_in.size(2) && grad_in.size(3) == x_in.size(3) && grad_in.size(1) > 0 &&
                  x_in.size(1) > 0,
              "fastdiff.winograd_weight_grad: expected x [N, C_in, H, W] and grad [N, C_out, H, W] (C_in, C_out > 0), "
              "got ", x_in.sizes(), " and ", grad_in.sizes());
  wg::Geometry g{};
  g.n = x_in.size(0), g.cin = x_in.size(1), g.h = x_in.size(2), g.w = x_in.size(3);
  g.cout = grad_in.size(1), g.cinp = wg::round_up(g.cin), g.coutp = wg::round_up(g.cout);
  g.th = (g.h + 3) / 4, g.tw = (g.w + 3) / 4, g.hp = 4 * g.th + 2, g.wp = 4 * g.tw + 2;
  at::Tensor dw = at::zeros({g.cout, g.cin, 3, 3}, x_in.options());
  if (x_in.numel() == 0) return dw;
  const bool xcl = is_channels_last(x_in), gcl = is_channels_last(grad_in);
  const at::Tensor x = xcl ? x_in : x_in.contiguous(), gy = gcl ? grad_in : grad_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_weight_grad", [&] {
    using T = scalar_t;
    wg::Geometry go = g;  // the output gradient packed with the output's channels in the input's slots
    go.cin = g.cout, go.cinp = g.coutp;
    // The result must not depend on the thread count (training resumed with another thread count, or
    // two runs, must agree): chunks of a size fixed by the shape alone, taken in order; within a chunk the
    // threads share the transforms by tiles, then the 36 products by point, so each dU entry is summed
    // over the chunks in the same order however many threads there are.
    const int64_t tiles = g.tiles();
    const int64_t chunk = std::min(tiles, max_chunk(g, sizeof(T)));
    const int64_t nchunks = (tiles + chunk - 1) / chunk;
    auto ws = cpu::workspace({{g.n, g.hp, g.wp, g.cinp}, {g.n, g.hp, g.wp, g.coutp}, {chunk, 36, g.cinp},
                         {chunk, 36, g.coutp}, {36, g.cinp, g.coutp}},
                        x.options());
    at::Tensor &xt = ws[0], &gt_rows = ws[1], &v = ws[2], &gtb = ws[3], &du = ws[4];
    pack<T>(x, xcl, false, g, xt);
    pack<T>(gy, gcl, false, go, gt_rows);
    du.zero_();
    const cpu::GemmKernels* kern = float_kernels(x.scalar_type());
    const auto gemm = kern != nullptr ? kern->wgrad : nullptr;
    const T* xtp = xt.const_data_ptr<T>();
    const T* gp = gt_rows.const_data_ptr<T>();
    T* vp = v.mutable_data_ptr<T>();
    T* gtp = gtb.mutable_data_ptr<T>();
    T* dup_acc = du.mutable_data_ptr<T>();
    for (int64_t ci = 0; ci < nchunks; ci++) {
      const int64_t t0 = ci * chunk, t1 = std::min(tiles, t0 + chunk), nt = t1 - t0;
      at::parallel_for(t0, t1, 4, [&](int64_t b, int64_t e) {
        wg::input_transform<T>(xtp, g, t0, b, e, vp);
        wg::grad_transform<T>(gp, g, t0, b, e, gtp);
      });
      if (gemm != nullptr) {
        at::parallel_for(0, 36, 1, [&](int64_t b, int64_t e) {
          gemm(reinterpret_cast<const float*>(vp), reinterpret_cast<const float*>(gtp),
               reinterpret_cast<float*>(dup_acc), nt, g.cinp, g.coutp, b, e);
        });
      } else {  // float64, or no AVX2: ATen's bmm on [36, c, nt] / [36, nt, c] views
        du.add_(at::bmm(v.narrow(0, 0, nt).permute({1, 2, 0}), gtb.narrow(0, 0, nt).transpose(0, 1)));
      }
    }
    const T* dup = du.const_data_ptr<T>();
    T* dwp = dw.mutable_data_ptr<T>();
    at::parallel_for(0, g.cin, std::max<int64_t>(1, 2048 / g.coutp), [&](int64_t b, int64_t e) {
      wg::weight_grad_transform<T>(dup, g, dwp, b, e);
    });
  });
  return dw;
}

template <typename Sig> c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// MP convolution on the Winograd path: conv2d(x, gain N(w) / sqrt(fan_in), padding 1), the per-row factor
// applied in the output transform.
at::Tensor mp_conv_winograd_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gain, double eps) {
  check_winograd_dtype(x, "mp_conv_winograd", "x");
  check_float(w, "mp_conv_winograd", "w");
  check_float(gain, "mp_conv_winograd", "gain");
  TORCH_CHECK(gain.numel() == 1, "fastdiff.mp_conv_winograd: expected a scalar gain, got shape ", gain.sizes());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && x.dim() == 4 && x.size(1) == w.size(1),
              "fastdiff.mp_conv_winograd: expected x [N, C, H, W] and a 3x3 weight [out, C, 3, 3], got ", x.sizes(),
              " and ", w.sizes());
  static auto norm_scale = find_op<at::Tensor(const at::Tensor&, double)>("fastdiff::weight_norm_scale");
  at::Tensor s = norm_scale.call(w, eps);
  s = s * (gain.to(s.device(), s.scalar_type()).reshape({}) / std::sqrt(double(w.numel() / w.size(0))));
  return winograd_conv_cpu(x, winograd_weight_cpu(w.to(x.scalar_type())), s, false, std::nullopt, std::nullopt, 0.5,
                           0.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("winograd_weight", &winograd_weight_cpu);
  m.impl("winograd_weight_tile", &winograd_weight_tile_cpu);
  m.impl("winograd_conv", &winograd_conv_cpu);
  m.impl("mp_conv_winograd", &mp_conv_winograd_cpu);
  m.impl("winograd_weight_grad", &winograd_weight_grad_cpu);
}

}  // namespace fastdiff
