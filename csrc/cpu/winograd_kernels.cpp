// The Winograd F(4x4, 3x3) transforms declared in winograd.h, on GCC vector extensions (32 bytes: 8
// floats or 4 doubles over channels), each built for AVX2+FMA and for the baseline (isa.h).
//
// Transform matrices (Lavin & Gray 2016, F(4x4, 3x3), interpolation points 0, +-1, +-2, inf):
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//   G   = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
#include "winograd.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastdiff {
namespace cpu {
namespace winograd {
namespace {

template <typename T> struct VT;
template <> struct VT<float> {
  typedef float v __attribute__((vector_size(32)));
  typedef float u __attribute__((vector_size(32), aligned(4), may_alias));
  typedef int32_t vi __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <> struct VT<double> {
  typedef double v __attribute__((vector_size(32)));
  typedef double u __attribute__((vector_size(32), aligned(8), may_alias));
  typedef int64_t vi __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

template <typename T> using vec = typename VT<T>::v;

template <typename T> FD_INLINE vec<T> load(const T* p) { return *reinterpret_cast<const typename VT<T>::u*>(p); }
template <typename T> FD_INLINE void store(T* p, vec<T> x) { *reinterpret_cast<typename VT<T>::u*>(p) = x; }
template <typename T> FD_INLINE vec<T> splat(T a) { return vec<T>{} + a; }

// In-register transposes: r[i][k] -> r[k][i] (8 x 8 floats, 4 x 4 doubles).
FD_INLINE void transpose(vec<float>* r) {
  typedef vec<float> v;
  v t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int k = 0; k < 2; k++) {
      u[i + 2 * k] = __builtin_shufflevector(t[i + k], t[i + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * k + 1] = __builtin_shufflevector(t[i + k], t[i + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int k = 0; k < 4; k++) {
    r[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
FD_INLINE void transpose(vec<double>* r) {
  typedef vec<double> v;
  const v t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6), t1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);
  const v t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6), t3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
  r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  r[1] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  r[2] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

constexpr double kSiluDiv = 0.596;

// e^x on float lanes: x = k ln2 + r (k by the 1.5 * 2^23 shifter, ln2 split in two), a degree-7
// Taylor polynomial for e^r on |r| <= ln2 / 2 (truncation 5e-9 relative), 2^k in the exponent bits.
FD_INLINE vec<float> exp_lanes(vec<float> x) {
  typedef VT<float>::vi vi;
  const vec<float> lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vec<float> shifter = splat(12582912.0f);
  const vec<float> t = x * 1.44269504088896341f + shifter;
  const vec<float> k = t - shifter;
  const vec<float> r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  vec<float> p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi e = (__builtin_convertvector(k, vi) + 127) << 23;
  return p * (vec<float>)e;
}

FD_INLINE vec<double> exp_lanes(vec<double> x) {
  vec<double> out;
  for (int i = 0; i < 4; i++) out[i] = std::exp(x[i]);
  return out;
}

// mp_silu(z) = z sigmoid(z) / 0.596; NaN stays NaN.
template <typename T> FD_INLINE vec<T> mp_silu_lanes(vec<T> z) {
  return z / ((exp_lanes(-z) + T(1)) * T(kSiluDiv));
}

// B^T applied to six vectors (one column or row of a patch).
template <typename T> FD_INLINE void bt6(const vec<T>* d, int64_t step, vec<T>* o, int64_t ostep) {
  const vec<T> d0 = d[0], d1 = d[step], d2 = d[2 * step], d3 = d[3 * step], d4 = d[4 * step], d5 = d[5 * step];
  const vec<T> a = d4 - T(4) * d2, b = d3 - T(4) * d1, c = d4 - d2, e = T(2) * (d3 - d1);
  o[0] = T(4) * d0 - T(5) * d2 + d4;
  o[ostep] = a + b;
  o[2 * ostep] = a - b;
  o[3 * ostep] = c + e;
  o[4 * ostep] = c - e;
  o[5 * ostep] = T(4) * d1 - T(5) * d3 + d5;
}

// A^T applied to six vectors -> four.
template <typename T> FD_INLINE void at6(const vec<T>* m, int64_t step, vec<T>* o, int64_t ostep) {
  const vec<T> m0 = m[0], m1 = m[step], m2 = m[2 * step], m3 = m[3 * step], m4 = m[4 * step], m5 = m[5 * step];
  const vec<T> s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
  o[0] = m0 + s12 + s34;
  o[ostep] = d12 + T(2) * d34;
  o[2 * ostep] = s12 + T(4) * s34;
  o[3 * ostep] = d12 + T(8) * d34 + m5;
}

// G of the weight transform (6 x 3).
template <typename T>
constexpr T kG[6][3] = {{T(1) / 4, 0, 0},           {T(-1) / 6, T(-1) / 6, T(-1) / 6},
                        {T(-1) / 6, T(1) / 6, T(-1) / 6}, {T(1) / 24, T(1) / 12, T(1) / 6},
                        {T(1) / 24, T(-1) / 12, T(1) / 6}, {0, 0, 1}};

// A applied to four vectors -> six (the transpose of at6: the output gradient's transform A g A^T).
template <typename T> FD_INLINE void a4(const vec<T>* m, int64_t step, vec<T>* o, int64_t ostep) {
  const vec<T> m0 = m[0], m1 = m[step], m2 = m[2 * step], m3 = m[3 * step];
  const vec<T> s02 = m0 + m2, s13 = m1 + m3, e02 = m0 + T(4) * m2, e13 = T(2) * m1 + T(8) * m3;
  o[0] = m0;
  o[ostep] = s02 + s13;
  o[2 * ostep] = s02 - s13;
  o[3 * ostep] = e02 + e13;
  o[4 * ostep] = e02 - e13;
  o[5 * ostep] = m3;
}

template <typename T>
FD_INLINE void pack_input_body(const T* x, bool channels_last, bool silu, const Geometry& g, T* xt, int64_t r0,
                               int64_t r1) {
  constexpr int L = VT<T>::L;
  const int64_t cp = g.cinp, c = g.cin, hw = g.h * g.w;
  for (int64_t row = r0; row < r1; row++) {
    const int64_t n = row / g.hp, hp = row % g.hp, h = hp - 1;
    T* out = xt + row * g.wp * cp;
    if (h < 0 || h >= g.h) {
      std::memset(out, 0, sizeof(T) * g.wp * cp);
      continue;
    }
    std::memset(out, 0, sizeof(T) * cp);
    std::memset(out + (g.w + 1) * cp, 0, sizeof(T) * (g.wp - g.w - 1) * cp);
    for (int64_t cb = 0; cb < cp; cb += L) {
      const int64_t nl = std::min<int64_t>(L, c - cb);
      int64_t w = 0;
      if (!channels_last && nl == L) {  // L channels x L pixels at a time, transposed in registers
        const T* src = x + (n * c + cb) * hw + h * g.w;
        for (; w + L <= g.w; w += L) {
          vec<T> r[L];
          for (int j = 0; j < L; j++) r[j] = load(src + j * hw + w);
          transpose(r);
          for (int i = 0; i < L; i++) store(out + (w + 1 + i) * cp + cb, silu ? mp_silu_lanes<T>(r[i]) : r[i]);
        }
      }
      for (; w < g.w; w++) {
        vec<T> v;
        if (channels_last) {
          const T* src = x + ((n * g.h + h) * g.w + w) * c + cb;
          if (nl == L) {
            v = load(src);
          } else {
            v = vec<T>{};
            for (int j = 0; j < nl; j++) v[j] = src[j];
          }
        } else {
          const T* src = x + (n * c + cb) * hw + h * g.w + w;
          v = vec<T>{};
          for (int j = 0; j < nl; j++) v[j] = src[j * hw];
        }
        if (silu) v = mp_silu_lanes<T>(v);  // mp_silu(0) = 0 keeps the padded lanes zero
        store(out + (w + 1) * cp + cb, v);
      }
    }
  }
}

template <typename T>
FD_INLINE void input_transform_body(const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb,
                                    T* v) {
  constexpr int L = VT<T>::L;
  const int64_t cp = g.cinp;
  for (int64_t t = ta; t < tb; t++) {
    const int64_t tx = t % g.tw, ty = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const T* base = xt + ((n * g.hp + 4 * ty) * g.wp + 4 * tx) * cp;
    T* dst = v + (t - t0) * 36 * cp;  // the tile's 36 points, one after another
    for (int64_t cb = 0; cb < cp; cb += L) {
      vec<T> d[36], s[36];
      for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++) d[i * 6 + j] = load(base + (i * g.wp + j) * cp + cb);
      for (int j = 0; j < 6; j++) bt6<T>(d + j, 6, s + j, 6);      // columns: s = B^T d
      for (int i = 0; i < 6; i++) bt6<T>(s + 6 * i, 1, d + 6 * i, 1);  // rows: d = s B
      for (int k = 0; k < 36; k++) store(dst + k * cp + cb, d[k]);
    }
  }
}

template <typename T>
FD_INLINE void output_transform_body(const T* m, const Geometry& g, int64_t t0, int64_t ta, int64_t tb,
                                     const Epilogue<T>& ep, bool channels_last, T* y) {
  constexpr int L = VT<T>::L;
  const int64_t cp = g.coutp, co = g.cout, hw = g.h * g.w;
  const bool has_res = ep.res != nullptr, has_clip = ep.clip > 0;
  for (int64_t t = ta; t < tb; t++) {
    const int64_t tx = t % g.tw, ty = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const int64_t nr = std::min<int64_t>(4, g.h - 4 * ty), ns = std::min<int64_t>(4, g.w - 4 * tx);
    const T* src = m + (t - t0) * 36 * cp;
    for (int64_t cb = 0; cb < cp; cb += L) {
      const int64_t nl = std::min<int64_t>(L, co - cb);
      if (nl <= 0) break;
      vec<T> a[36], s[24], o[16];
      for (int k = 0; k < 36; k++) a[k] = load(src + k * cp + cb);
      for (int j = 0; j < 6; j++) at6<T>(a + j, 6, s + j, 6);      // s = A^T a  (4 x 6)
      for (int i = 0; i < 4; i++) at6<T>(s + 6 * i, 1, o + 4 * i, 1);  // o = s A  (4 x 4)
      const vec<T> sc = load(ep.scale + cb);
      const vec<T> md = ep.mod ? load(ep.mod + n * cp + cb) : vec<T>{};
      for (int k = 0; k < 16; k++) {
        o[k] *= sc;
        if (ep.mod) o[k] = mp_silu_lanes<T>(o[k] * md);
      }
      if (!channels_last && nl == L && nr == 4 && ns == 4) {
        // Whole tile, whole channel block, channels-first: transpose so each channel's rows of 4 are
        // contiguous (L / 4 output rows per transpose), then apply the residual / clip per vector.
        for (int r0 = 0; r0 < 4; r0 += L / 4) {
          vec<T> v[L];
          for (int i = 0; i < L; i++) v[i] = o[r0 * 4 + i];
          transpose(v);  // v[j] = channel cb + j, rows r0 .. r0 + L/4 - 1, 4 columns each
          typedef T q4 __attribute__((vector_size(4 * sizeof(T))));
          typedef T q4u __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T)), may_alias));
          for (int j = 0; j < L; j++) {
            T* dst = y + (n * co + cb + j) * hw + (4 * ty + r0) * g.w + 4 * tx;
            for (int q = 0; q < L / 4; q++) {  // one output row of 4 at a time
              q4 val;
              std::memcpy(&val, reinterpret_cast<const T*>(&v[j]) + 4 * q, sizeof(q4));
              T* d = dst + q * g.w;
              if (has_res) val = ep.wa * *reinterpret_cast<const q4u*>(ep.res + (d - y)) + ep.wb * val;
              if (has_clip) {
                val = val > ep.clip ? q4{} + ep.clip : val;
                val = val < -ep.clip ? q4{} - ep.clip : val;
              }
              *reinterpret_cast<q4u*>(d) = val;
            }
          }
        }
        continue;
      }
      for (int r = 0; r < nr; r++) {
        const int64_t h = 4 * ty + r;
        for (int q = 0; q < ns; q++) {
          const int64_t w = 4 * tx + q;
          vec<T> val = o[r * 4 + q];
          if (channels_last) {
            const int64_t off = ((n * g.h + h) * g.w + w) * co + cb;
            if (nl == L) {
              if (has_res) val = ep.wa * load(ep.res + off) + ep.wb * val;
              if (has_clip) {
                const vec<T> lim = splat(ep.clip), nlim = splat(-ep.clip);
                val = val > lim ? lim : val;
                val = val < nlim ? nlim : val;
              }
              store(y + off, val);
            } else {
              for (int j = 0; j < nl; j++) {
                T e = val[j];
                if (has_res) e = ep.wa * ep.res[off + j] + ep.wb * e;
                if (has_clip) e = std::min(std::max(e, -ep.clip), ep.clip);
                y[off + j] = e;
              }
            }
          } else {
            const int64_t off = (n * co + cb) * hw + h * g.w + w;
            for (int j = 0; j < nl; j++) {
              T e = val[j];
              if (has_res) e = ep.wa * ep.res[off + j * hw] + ep.wb * e;
              if (has_clip) e = std::min(std::max(e, -ep.clip), ep.clip);
              y[off + j * hw] = e;
            }
          }
        }
      }
    }
  }
}

template <typename T>
FD_INLINE void grad_transform_body(const T* gp, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* gt) {
  constexpr int L = VT<T>::L;
  const int64_t cp = g.coutp;
  for (int64_t t = ta; t < tb; t++) {
    const int64_t tx = t % g.tw, ty = (t / g.tw) % g.th, n = t / (g.tw * g.th);
    const T* base = gp + ((n * g.hp + 4 * ty + 1) * g.wp + 4 * tx + 1) * cp;  // the tile's 4x4 outputs
    T* dst = gt + (t - t0) * 36 * cp;
    for (int64_t cb = 0; cb < cp; cb += L) {
      vec<T> d[16], s[24], o[36];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) d[i * 4 + j] = load(base + (i * g.wp + j) * cp + cb);
      for (int j = 0; j < 4; j++) a4<T>(d + j, 4, s + j, 4);      // columns: s = A d  (6 x 4)
      for (int i = 0; i < 6; i++) a4<T>(s + 4 * i, 1, o + 6 * i, 1);  // rows: o = s A^T  (6 x 6)
      for (int k = 0; k < 36; k++) store(dst + k * cp + cb, o[k]);
    }
  }
}

template <typename T>
FD_INLINE void weight_grad_transform_body(const T* du, const Geometry& g, T* dw, int64_t c0, int64_t c1) {
  constexpr int L = VT<T>::L;
  const auto& G = kG<T>;
  const int64_t pstride = g.cinp * g.coutp;
  for (int64_t ci = c0; ci < c1; ci++) {
    for (int64_t ob = 0; ob < g.cout; ob += L) {  // L output channels per vector
      vec<T> r[6][3];  // r = dU G  (6 x 3)
      for (int i = 0; i < 6; i++) {
        vec<T> e[6];
        for (int j = 0; j < 6; j++) e[j] = load(du + (i * 6 + j) * pstride + ci * g.coutp + ob);
        for (int b = 0; b < 3; b++)
          r[i][b] = e[0] * G[0][b] + e[1] * G[1][b] + e[2] * G[2][b] + e[3] * G[3][b] + e[4] * G[4][b] + e[5] * G[5][b];
      }
      const int nl = int(std::min<int64_t>(L, g.cout - ob));
      for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++) {
          const vec<T> k = r[0][b] * G[0][a] + r[1][b] * G[1][a] + r[2][b] * G[2][a] + r[3][b] * G[3][a] +
                           r[4][b] * G[4][a] + r[5][b] * G[5][a];  // (G^T dU G)[a][b]
          for (int j = 0; j < nl; j++) dw[((ob + j) * g.cin + ci) * 9 + a * 3 + b] = k[j];
        }
    }
  }
}

template <typename T>
FD_INLINE void weight_transform_body(const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1) {
  constexpr int L = VT<T>::L;
  const auto& G = kG<T>;
  const int64_t ns = strips(g.coutp), pstride = ns * g.cinp * kStrip;
  for (int64_t ci = c0; ci < c1; ci++) {
    for (int64_t ob = 0; ob < ns * kStrip; ob += L) {  // L output channels per vector, within one strip
      T* dst = u + (ob / kStrip) * g.cinp * kStrip + ci * kStrip + ob % kStrip;
      vec<T> k[9];
      for (int tap = 0; tap < 9; tap++) {
        k[tap] = vec<T>{};
        if (ci < g.cin)
          for (int j = 0; j < L && ob + j < g.cout; j++) k[tap][j] = w[((ob + j) * g.cin + ci) * 9 + tap];
      }
      vec<T> gk[6][3];  // G g
      for (int i = 0; i < 6; i++)
        for (int b = 0; b < 3; b++) gk[i][b] = G[i][0] * k[b] + G[i][1] * k[3 + b] + G[i][2] * k[6 + b];
      for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++)
          store(dst + (i * 6 + j) * pstride, gk[i][0] * G[j][0] + gk[i][1] * G[j][1] + gk[i][2] * G[j][2]);
    }
  }
}

}  // namespace

FD_MULTIVERSION(void, pack_input, pack_input_body,
                (const T* x, bool channels_last, bool silu, const Geometry& g, T* xt, int64_t r0, int64_t r1),
                (x, channels_last, silu, g, xt, r0, r1))
FD_MULTIVERSION(void, input_transform, input_transform_body,
                (const T* xt, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* v),
                (xt, g, t0, ta, tb, v))
FD_MULTIVERSION(void, output_transform, output_transform_body,
                (const T* m, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, const Epilogue<T>& ep,
                 bool channels_last, T* y),
                (m, g, t0, ta, tb, ep, channels_last, y))
FD_MULTIVERSION(void, grad_transform, grad_transform_body,
                (const T* gp, const Geometry& g, int64_t t0, int64_t ta, int64_t tb, T* gt), (gp, g, t0, ta, tb, gt))
FD_MULTIVERSION(void, weight_grad_transform, weight_grad_transform_body,
                (const T* du, const Geometry& g, T* dw, int64_t c0, int64_t c1), (du, g, dw, c0, c1))
FD_MULTIVERSION(void, weight_transform, weight_transform_body,
                (const T* w, const Geometry& g, T* u, int64_t c0, int64_t c1), (w, g, u, c0, c1))

#define FD_INSTANTIATE(T)                                                                                       \
  template void pack_input<T>(const T*, bool, bool, const Geometry&, T*, int64_t, int64_t);                    \
  template void input_transform<T>(const T*, const Geometry&, int64_t, int64_t, int64_t, T*);                  \
  template void output_transform<T>(const T*, const Geometry&, int64_t, int64_t, int64_t, const Epilogue<T>&,  \
                                    bool, T*);                                                                 \
  template void weight_transform<T>(const T*, const Geometry&, T*, int64_t, int64_t);                         \
  template void grad_transform<T>(const T*, const Geometry&, int64_t, int64_t, int64_t, T*);                   \
  template void weight_grad_transform<T>(const T*, const Geometry&, T*, int64_t, int64_t);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)
#undef FD_INSTANTIATE

#include "winograd_tiles.inc"  // F(2x2, 3x3) and F(6x6, 3x3) (winograd_tiles.h), on the helpers above

}  // namespace winograd
}  // namespace cpu
}  // namespace fastdiff
