// The hot loops of the fused cosine attention (see attention_kernels.h). Every exported function is
// compiled twice, for AVX2+FMA and for the baseline x86-64 (SSE2), and picked at run time from the CPU's
// feature bits. (GCC's target_clones("arch=haswell") dispatches on the CPU *model* and so runs the
// baseline clone on e.g. AMD Zen; __builtin_cpu_supports checks the features themselves.) The small GEMM
// micro-kernel and the exp below are force-inlined into each variant. Only light headers here.
#include "attention_kernels.h"
#include "isa.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

// Vector-typed helpers are always inlined, so the ABI note about passing AVX vectors does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

// Helpers are force-inlined (FD_INLINE) so that they are compiled for each variant's instruction set.

namespace fastdiff {
namespace cpu {
namespace {

constexpr int64_t D = kAttnDim;
constexpr int64_t BQ = kAttnBQ;
constexpr int64_t BK = kAttnBK;
constexpr double kEps = 1e-4;     // pixel-norm epsilon (SPEC: N(x) = x / (eps + ||x|| / sqrt(n)))
constexpr double kShift = 8.0;    // fixed softmax shift: every score lies in (-8, 8)
constexpr double kRsqrtD = 0.125; // 1 / sqrt(64)

// 32-byte vectors of A (GCC vector extensions; split into two halves on targets without AVX).
template <typename A> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int W = 4;
};

template <typename V> FD_INLINE V loadu(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V> FD_INLINE void storeu(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }


// Softmax rows: for jj < n (n <= np, np a multiple of 16) row[jj] = exp(row[jj] - shift), zero on
// [n, np); returns the row's sum. The float version runs vexp on 8 lanes at once.
FD_INLINE double exp_row(double* row, int64_t n, int64_t np, double shift) {
  double sum = 0;
  for (int64_t jj = 0; jj < n; jj++) {
    row[jj] = std::exp(row[jj] - shift);
    sum += row[jj];
  }
  for (int64_t jj = n; jj < np; jj++) row[jj] = 0;
  return sum;
}

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

// exp on 8 floats: x = k ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r (Cephes
// coefficients), 2^k assembled in the exponent bits. Relative error ~2e-7; x clamped so 2^k stays normal.

FD_INLINE v8f vexp(v8f x) {
  const v8f lo = v8f{} - 87.0f, hi = v8f{} + 88.0f, half = v8f{} + 0.5f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8f t = x * 1.4426950408889634f;
  const v8i k = __builtin_convertvector(t + (t >= v8f{} ? half : -half), v8i);
  const v8f kf = __builtin_convertvector(k, v8f);
  const v8f r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (v8f)((k + 127) << 23);
}

FD_INLINE v8f lane_mask(int64_t jj, int64_t n) {  // 1.0 on lanes jj + l < n, else 0
  const v8i idx = v8i{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<int>(jj);
  return (idx < static_cast<int>(n)) ? v8f{} + 1.0f : v8f{};
}

FD_INLINE float exp_row(float* row, int64_t n, int64_t np, float shift) {
  v8f acc = v8f{};
  for (int64_t jj = 0; jj < np; jj += 8) {
    v8f v = loadu<v8f>(row + jj);
    v = vexp(v - shift);
    if (jj + 8 > n) v *= lane_mask(jj, n);
    storeu(row + jj, v);
    acc += v;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Backward rows: p = exp(s - l) (zero for jj >= n), ds = p (dp - d), on [0, np).
FD_INLINE void dsoftmax_row(double* p, double* ds, int64_t n, int64_t np, double l, double d) {
  for (int64_t jj = 0; jj < n; jj++) {
    p[jj] = std::exp(p[jj] - l);
    ds[jj] = p[jj] * (ds[jj] - d);
  }
  for (int64_t jj = n; jj < np; jj++) p[jj] = ds[jj] = 0;
}

FD_INLINE void dsoftmax_row(float* p, float* ds, int64_t n, int64_t np, float l, float d) {
  for (int64_t jj = 0; jj < np; jj += 8) {
    v8f v = vexp(loadu<v8f>(p + jj) - l);
    if (jj + 8 > n) v *= lane_mask(jj, n);
    storeu(p + jj, v);
    storeu(ds + jj, v * (loadu<v8f>(ds + jj) - d));
  }
}

template <typename T> FD_INLINE attn_acc_t<T> ld(T v) { return static_cast<attn_acc_t<T>>(v); }

// --- small GEMM ----------------------------------------------------------------------------------
// C[m][n] (+)= sum_k A(m, k) B[k][n] for m < M, n < N (N a multiple of 2 W), k < K, with
// A(m, k) = a[m * sam + k * sak], B row stride ldb, C row stride ldc. Register-blocked MR x 2 vectors.

template <typename A, int MR>
FD_INLINE void gemm_micro(int64_t K, const A* a, int64_t sam, int64_t sak, const A* b, int64_t ldb, A* c,
                       int64_t ldc, bool acc) {
  using V = typename Vec<A>::type;
  constexpr int W = Vec<A>::W;
  V r0[MR], r1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
    if (acc) {
      r0[m] = loadu<V>(c + m * ldc);
      r1[m] = loadu<V>(c + m * ldc + W);
    } else {
      r0[m] = V{} ;
      r1[m] = V{};
    }
  }
  for (int64_t k = 0; k < K; k++) {
    const V b0 = loadu<V>(b + k * ldb);
    const V b1 = loadu<V>(b + k * ldb + W);
    const A* ak = a + k * sak;
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
      const A s = ak[m * sam];
      r0[m] += s * b0;
      r1[m] += s * b1;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; m++) {
    storeu(c + m * ldc, r0[m]);
    storeu(c + m * ldc + W, r1[m]);
  }
}

template <typename A>
FD_INLINE void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t sam, int64_t sak, const A* b,
                 int64_t ldb, A* c, int64_t ldc, bool acc) {
  constexpr int NR = 2 * Vec<A>::W;
  constexpr int MR = 6;
  for (int64_t n = 0; n < N; n += NR) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR)
      gemm_micro<A, MR>(K, a + m * sam, sam, sak, b + n, ldb, c + m * ldc + n, ldc, acc);
    const A* am = a + m * sam;
    A* cm = c + m * ldc + n;
    switch (M - m) {
      case 5: gemm_micro<A, 5>(K, am, sam, sak, b + n, ldb, cm, ldc, acc); break;
      case 4: gemm_micro<A, 4>(K, am, sam, sak, b + n, ldb, cm, ldc, acc); break;
      case 3: gemm_micro<A, 3>(K, am, sam, sak, b + n, ldb, cm, ldc, acc); break;
      case 2: gemm_micro<A, 2>(K, am, sam, sak, b + n, ldb, cm, ldc, acc); break;
      case 1: gemm_micro<A, 1>(K, am, sam, sak, b + n, ldb, cm, ldc, acc); break;
      default: break;
    }
  }
}

// Per-pixel factor 1 / (eps + ||x|| / 8) of component j over pixels [p0, p0 + np) into s (and the
// norm into nrm when given); ss is np elements of scratch.
template <typename T>
FD_INLINE void pixel_scale(const T* xh, int64_t HW, int j, int64_t p0, int64_t np, attn_acc_t<T>* s,
                        attn_acc_t<T>* nrm) {
  using A = attn_acc_t<T>;
  for (int64_t i = 0; i < np; i++) s[i] = A(0);
  for (int64_t c = 0; c < D; c++) {
    const T* row = xh + (3 * c + j) * HW + p0;
    for (int64_t i = 0; i < np; i++) s[i] += ld(row[i]) * ld(row[i]);
  }
  for (int64_t i = 0; i < np; i++) {
    const A n = std::sqrt(s[i]);
    if (nrm) nrm[i] = n;
    s[i] = A(1) / (A(kEps) + n * A(kRsqrtD));
  }
}

// Backward of the pixel norm of component j for pixels [p0, p0 + np): g (pixel-major, row stride D)
// times f is the gradient w.r.t. the normalized vectors; writes
// dx = s g - (<g, x> s^2 / (8 ||x||)) x into the rows of gxh. s, nrm, dot: np elements of scratch each.
template <typename T>
FD_INLINE void norm_backward(const T* xh, int64_t HW, int j, int64_t p0, int64_t np, const attn_acc_t<T>* g,
                          attn_acc_t<T> f, T* gxh, attn_acc_t<T>* s, attn_acc_t<T>* nrm,
                          attn_acc_t<T>* dot) {
  using A = attn_acc_t<T>;
  pixel_scale(xh, HW, j, p0, np, s, nrm);
  for (int64_t i = 0; i < np; i++) dot[i] = A(0);
  for (int64_t c = 0; c < D; c++) {
    const T* row = xh + (3 * c + j) * HW + p0;
    for (int64_t i = 0; i < np; i++) dot[i] += g[i * D + c] * ld(row[i]);
  }
  for (int64_t i = 0; i < np; i++) {
    // coefficient of x; the (g, f) scaling applies to both terms.
    dot[i] = nrm[i] > A(0) ? f * dot[i] * s[i] * s[i] * A(kRsqrtD) / nrm[i] : A(0);
    s[i] *= f;
  }
  for (int64_t c = 0; c < D; c++) {
    const T* row = xh + (3 * c + j) * HW + p0;
    T* out = gxh + (3 * c + j) * HW + p0;
    for (int64_t i = 0; i < np; i++) out[i] = static_cast<T>(s[i] * g[i * D + c] - dot[i] * ld(row[i]));
  }
}

// S = qs kt[:, k0:] and dP = dy vt[:, k0:] for one (query tile, key tile); then P = exp(S - lse) and
// dS = P (dP - D) in place (P into p, dS into ds), zero on the padding columns.
template <typename A>
FD_INLINE void bwd_block(int64_t q0, int64_t nq, int64_t k0, int64_t nk, const A* qs, const A* kt,
                      const A* vt, int64_t ldk, const A* dy, const A* Dv, const A* lse, A* p, A* ds) {
  const int64_t nkp = attn_pad(nk);
  gemm<A>(nq, nkp, D, qs + q0 * D, D, 1, kt + k0, ldk, p, BK, false);
  gemm<A>(nq, nkp, D, dy + q0 * D, D, 1, vt + k0, ldk, ds, BK, false);
  for (int64_t i = 0; i < nq; i++) dsoftmax_row(p + i * BK, ds + i * BK, nk, nkp, lse[q0 + i], Dv[q0 + i]);
}

template <typename T>
FD_INLINE void impl_fwd_prep(const T* xh, int64_t HW, int64_t p0, int64_t p1, attn_acc_t<T>* kt,
                                  int64_t ldk, attn_acc_t<T>* v) {
  using A = attn_acc_t<T>;
  constexpr int64_t CH = 256;
  A sk[CH], sv[CH];
  for (int64_t b = p0; b < p1; b += CH) {
    const int64_t np = p1 - b < CH ? p1 - b : CH;
    pixel_scale(xh, HW, 1, b, np, sk, static_cast<A*>(nullptr));
    pixel_scale(xh, HW, 2, b, np, sv, static_cast<A*>(nullptr));
    for (int64_t c = 0; c < D; c++) {
      const T* kr = xh + (3 * c + 1) * HW + b;
      const T* vr = xh + (3 * c + 2) * HW + b;
      A* ko = kt + c * ldk + b;
      for (int64_t i = 0; i < np; i++) ko[i] = ld(kr[i]) * sk[i];
      for (int64_t i = 0; i < np; i++) v[(b + i) * D + c] = ld(vr[i]) * sv[i];
    }
  }
  if (p1 == HW)
    for (int64_t c = 0; c < D; c++)
      for (int64_t i = HW; i < ldk; i++) kt[c * ldk + i] = A(0);
}

template <typename T>
FD_INLINE void impl_fwd_tile(const T* xh, int64_t HW, int64_t q0, int64_t nq,
                                  const attn_acc_t<T>* kt, int64_t ldk, const attn_acc_t<T>* v, T* yh,
                                  attn_acc_t<T>* lse, attn_acc_t<T>* work) {
  using A = attn_acc_t<T>;
  A* qs = work;            // [BQ][D] normalized queries / 8
  A* o = qs + BQ * D;      // [BQ][D] unnormalized output
  A* s = o + BQ * D;       // [BQ][BK] scores, then probabilities
  A* l = s + BQ * BK;      // [BQ] row sums
  A* sc = l + BQ;          // [BQ] query scales
  pixel_scale(xh, HW, 0, q0, nq, sc, static_cast<A*>(nullptr));
  for (int64_t i = 0; i < nq; i++) sc[i] *= A(kRsqrtD);
  for (int64_t c = 0; c < D; c++) {
    const T* qr = xh + 3 * c * HW + q0;
    for (int64_t i = 0; i < nq; i++) qs[i * D + c] = ld(qr[i]) * sc[i];
  }
  for (int64_t i = 0; i < nq * D; i++) o[i] = A(0);
  for (int64_t i = 0; i < nq; i++) l[i] = A(0);

  for (int64_t k0 = 0; k0 < HW; k0 += BK) {
    const int64_t nk = HW - k0 < BK ? HW - k0 : BK;
    gemm<A>(nq, attn_pad(nk), D, qs, D, 1, kt + k0, ldk, s, BK, false);
    for (int64_t i = 0; i < nq; i++) l[i] += exp_row(s + i * BK, nk, attn_pad(nk), A(kShift));
    gemm<A>(nq, D, nk, s, BK, 1, v + k0 * D, D, o, D, true);
  }

  for (int64_t i = 0; i < nq; i++) {
    lse[q0 + i] = A(kShift) + std::log(l[i]);
    l[i] = A(1) / l[i];
  }
  for (int64_t c = 0; c < D; c++) {
    T* yr = yh + c * HW + q0;
    for (int64_t i = 0; i < nq; i++) yr[i] = static_cast<T>(o[i * D + c] * l[i]);
  }
}

template <typename T>
FD_INLINE void impl_bwd_prep(const T* xh, const T* gh, const T* yh, int64_t HW, int64_t p0,
                                  int64_t p1, attn_acc_t<T>* qs, attn_acc_t<T>* kn, attn_acc_t<T>* kt,
                                  attn_acc_t<T>* vt, int64_t ldk, attn_acc_t<T>* dy, attn_acc_t<T>* Dv) {
  using A = attn_acc_t<T>;
  constexpr int64_t CH = 256;
  A sq[CH], sk[CH], sv[CH];
  for (int64_t b = p0; b < p1; b += CH) {
    const int64_t np = p1 - b < CH ? p1 - b : CH;
    pixel_scale(xh, HW, 0, b, np, sq, static_cast<A*>(nullptr));
    pixel_scale(xh, HW, 1, b, np, sk, static_cast<A*>(nullptr));
    pixel_scale(xh, HW, 2, b, np, sv, static_cast<A*>(nullptr));
    for (int64_t i = 0; i < np; i++) {
      sq[i] *= A(kRsqrtD);
      Dv[b + i] = A(0);
    }
    for (int64_t c = 0; c < D; c++) {
      const T* qr = xh + 3 * c * HW + b;
      const T* kr = xh + (3 * c + 1) * HW + b;
      const T* vr = xh + (3 * c + 2) * HW + b;
      const T* gr = gh + c * HW + b;
      const T* yr = yh + c * HW + b;
      A* kto = kt + c * ldk + b;
      A* vto = vt + c * ldk + b;
      for (int64_t i = 0; i < np; i++) {
        const A kv = ld(kr[i]) * sk[i];
        kto[i] = kv;
        kn[(b + i) * D + c] = kv;
        qs[(b + i) * D + c] = ld(qr[i]) * sq[i];
        vto[i] = ld(vr[i]) * sv[i];
        const A gv = ld(gr[i]);
        dy[(b + i) * D + c] = gv;
        Dv[b + i] += gv * ld(yr[i]);
      }
    }
  }
  if (p1 == HW)
    for (int64_t c = 0; c < D; c++)
      for (int64_t i = HW; i < ldk; i++) kt[c * ldk + i] = vt[c * ldk + i] = A(0);
}

template <typename T>
FD_INLINE void impl_bwd_kv_tile(const T* xh, int64_t HW, int64_t k0, int64_t nk,
                                     const attn_acc_t<T>* qs, const attn_acc_t<T>* kt,
                                     const attn_acc_t<T>* vt, int64_t ldk, const attn_acc_t<T>* dy,
                                     const attn_acc_t<T>* Dv, const attn_acc_t<T>* lse, T* gxh,
                                     attn_acc_t<T>* work) {
  using A = attn_acc_t<T>;
  A* p = work;              // [BQ][BK]
  A* ds = p + BQ * BK;      // [BQ][BK]
  A* dk = ds + BQ * BK;     // [BK][D]
  A* dv = dk + BK * D;      // [BK][D]
  A* t0 = dv + BK * D;      // 3 x [BK] scratch
  A* t1 = t0 + BK;
  A* t2 = t1 + BK;
  for (int64_t i = 0; i < nk * D; i++) dk[i] = dv[i] = A(0);
  for (int64_t q0 = 0; q0 < HW; q0 += BQ) {
    const int64_t nq = HW - q0 < BQ ? HW - q0 : BQ;
    bwd_block<A>(q0, nq, k0, nk, qs, kt, vt, ldk, dy, Dv, lse, p, ds);
    // dV_j += sum_i P_ij dY_i ;  dKn_j += sum_i dS_ij qn_i / 8 (qs already carries the 1/8)
    gemm<A>(nk, D, nq, p, 1, BK, dy + q0 * D, D, dv, D, true);
    gemm<A>(nk, D, nq, ds, 1, BK, qs + q0 * D, D, dk, D, true);
  }
  norm_backward(xh, HW, 1, k0, nk, dk, A(1), gxh, t0, t1, t2);
  norm_backward(xh, HW, 2, k0, nk, dv, A(1), gxh, t0, t1, t2);
}

template <typename T>
FD_INLINE void impl_bwd_q_tile(const T* xh, int64_t HW, int64_t q0, int64_t nq,
                                    const attn_acc_t<T>* qs, const attn_acc_t<T>* kn,
                                    const attn_acc_t<T>* kt, const attn_acc_t<T>* vt, int64_t ldk,
                                    const attn_acc_t<T>* dy, const attn_acc_t<T>* Dv,
                                    const attn_acc_t<T>* lse, T* gxh, attn_acc_t<T>* work) {
  using A = attn_acc_t<T>;
  A* p = work;              // [BQ][BK]
  A* ds = p + BQ * BK;      // [BQ][BK]
  A* dq = ds + BQ * BK;     // [BQ][D]
  A* t0 = dq + BK * D;      // 3 x [BK] scratch (after the room of two [BK][D] blocks)
  t0 += BK * D;
  A* t1 = t0 + BK;
  A* t2 = t1 + BK;
  for (int64_t i = 0; i < nq * D; i++) dq[i] = A(0);
  for (int64_t k0 = 0; k0 < HW; k0 += BK) {
    const int64_t nk = HW - k0 < BK ? HW - k0 : BK;
    bwd_block<A>(q0, nq, k0, nk, qs, kt, vt, ldk, dy, Dv, lse, p, ds);
    // dQn_i += sum_j dS_ij kn_j (times 1/8, applied below)
    gemm<A>(nq, D, nk, ds, BK, 1, kn + k0 * D, D, dq, D, true);
  }
  norm_backward(xh, HW, 0, q0, nq, dq, A(kRsqrtD), gxh, t0, t1, t2);
}

// Backward of one whole head in one task: the key-tile pass with the dQ accumulation folded in
// (dq: [HW][D] scratch). The per-tile arithmetic and the order of every accumulation are those of the
// two split passes above, so the result is bitwise the same.
template <typename T>
FD_INLINE void impl_bwd_head(const T* xh, int64_t HW, const attn_acc_t<T>* qs, const attn_acc_t<T>* kn,
                             const attn_acc_t<T>* kt, const attn_acc_t<T>* vt, int64_t ldk,
                             const attn_acc_t<T>* dy, const attn_acc_t<T>* Dv, const attn_acc_t<T>* lse,
                             T* gxh, attn_acc_t<T>* dq, attn_acc_t<T>* work) {
  using A = attn_acc_t<T>;
  A* p = work;
  A* ds = p + BQ * BK;
  A* dk = ds + BQ * BK;
  A* dv = dk + BK * D;
  A* t0 = dv + BK * D;
  A* t1 = t0 + BK;
  A* t2 = t1 + BK;
  for (int64_t i = 0; i < HW * D; i++) dq[i] = A(0);
  for (int64_t k0 = 0; k0 < HW; k0 += BK) {
    const int64_t nk = HW - k0 < BK ? HW - k0 : BK;
    for (int64_t i = 0; i < nk * D; i++) dk[i] = dv[i] = A(0);
    for (int64_t q0 = 0; q0 < HW; q0 += BQ) {
      const int64_t nq = HW - q0 < BQ ? HW - q0 : BQ;
      bwd_block<A>(q0, nq, k0, nk, qs, kt, vt, ldk, dy, Dv, lse, p, ds);
      gemm<A>(nk, D, nq, p, 1, BK, dy + q0 * D, D, dv, D, true);
      gemm<A>(nk, D, nq, ds, 1, BK, qs + q0 * D, D, dk, D, true);
      gemm<A>(nq, D, nk, ds, BK, 1, kn + k0 * D, D, dq + q0 * D, D, true);
    }
    norm_backward(xh, HW, 1, k0, nk, dk, A(1), gxh, t0, t1, t2);
    norm_backward(xh, HW, 2, k0, nk, dv, A(1), gxh, t0, t1, t2);
  }
  for (int64_t q0 = 0; q0 < HW; q0 += BQ) {
    const int64_t nq = HW - q0 < BQ ? HW - q0 : BQ;
    norm_backward(xh, HW, 0, q0, nq, dq + q0 * D, A(kRsqrtD), gxh, t0, t1, t2);
  }
}

}  // namespace

// Each exported function: one body (impl_*), built for AVX2+FMA and for the baseline (isa.h).
#define A_ attn_acc_t<T>
FD_MULTIVERSION(void, attn_fwd_prep, impl_fwd_prep,
                 (const T* xh, int64_t HW, int64_t p0, int64_t p1, A_* kt, int64_t ldk, A_* v),
                 (xh, HW, p0, p1, kt, ldk, v))
FD_MULTIVERSION(void, attn_fwd_tile, impl_fwd_tile,
                 (const T* xh, int64_t HW, int64_t q0, int64_t nq, const A_* kt, int64_t ldk, const A_* v,
                  T* yh, A_* lse, A_* work),
                 (xh, HW, q0, nq, kt, ldk, v, yh, lse, work))
FD_MULTIVERSION(void, attn_bwd_prep, impl_bwd_prep,
                 (const T* xh, const T* gh, const T* yh, int64_t HW, int64_t p0, int64_t p1, A_* qs, A_* kn,
                  A_* kt, A_* vt, int64_t ldk, A_* dy, A_* Dv),
                 (xh, gh, yh, HW, p0, p1, qs, kn, kt, vt, ldk, dy, Dv))
FD_MULTIVERSION(void, attn_bwd_kv_tile, impl_bwd_kv_tile,
                 (const T* xh, int64_t HW, int64_t k0, int64_t nk, const A_* qs, const A_* kt, const A_* vt,
                  int64_t ldk, const A_* dy, const A_* Dv, const A_* lse, T* gxh, A_* work),
                 (xh, HW, k0, nk, qs, kt, vt, ldk, dy, Dv, lse, gxh, work))
FD_MULTIVERSION(void, attn_bwd_q_tile, impl_bwd_q_tile,
                 (const T* xh, int64_t HW, int64_t q0, int64_t nq, const A_* qs, const A_* kn, const A_* kt,
                  const A_* vt, int64_t ldk, const A_* dy, const A_* Dv, const A_* lse, T* gxh, A_* work),
                 (xh, HW, q0, nq, qs, kn, kt, vt, ldk, dy, Dv, lse, gxh, work))
FD_MULTIVERSION(void, attn_bwd_head, impl_bwd_head,
                 (const T* xh, int64_t HW, const A_* qs, const A_* kn, const A_* kt, const A_* vt, int64_t ldk,
                  const A_* dy, const A_* Dv, const A_* lse, T* gxh, A_* dq, A_* work),
                 (xh, HW, qs, kn, kt, vt, ldk, dy, Dv, lse, gxh, dq, work))
#undef A_

#define FD_ATTN_INSTANTIATE(T)                                                                          \
  template void attn_fwd_prep<T>(const T*, int64_t, int64_t, int64_t, attn_acc_t<T>*, int64_t,         \
                                 attn_acc_t<T>*);                                                       \
  template void attn_fwd_tile<T>(const T*, int64_t, int64_t, int64_t, const attn_acc_t<T>*, int64_t,    \
                                 const attn_acc_t<T>*, T*, attn_acc_t<T>*, attn_acc_t<T>*);             \
  template void attn_bwd_prep<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t,              \
                                 attn_acc_t<T>*, attn_acc_t<T>*, attn_acc_t<T>*, attn_acc_t<T>*,        \
                                 int64_t, attn_acc_t<T>*, attn_acc_t<T>*);                              \
  template void attn_bwd_kv_tile<T>(const T*, int64_t, int64_t, int64_t, const attn_acc_t<T>*,         \
                                    const attn_acc_t<T>*, const attn_acc_t<T>*, int64_t,                \
                                    const attn_acc_t<T>*, const attn_acc_t<T>*, const attn_acc_t<T>*,   \
                                    T*, attn_acc_t<T>*);                                                \
  template void attn_bwd_q_tile<T>(const T*, int64_t, int64_t, int64_t, const attn_acc_t<T>*,          \
                                   const attn_acc_t<T>*, const attn_acc_t<T>*, const attn_acc_t<T>*,    \
                                   int64_t, const attn_acc_t<T>*, const attn_acc_t<T>*,                 \
                                   const attn_acc_t<T>*, T*, attn_acc_t<T>*);                           \
  template void attn_bwd_head<T>(const T*, int64_t, const attn_acc_t<T>*, const attn_acc_t<T>*,        \
                                 const attn_acc_t<T>*, const attn_acc_t<T>*, int64_t,                   \
                                 const attn_acc_t<T>*, const attn_acc_t<T>*, const attn_acc_t<T>*, T*,  \
                                 attn_acc_t<T>*, attn_acc_t<T>*);

FD_ATTN_INSTANTIATE(double)
FD_ATTN_INSTANTIATE(float)
FD_ATTN_INSTANTIATE(c10::Half)
FD_ATTN_INSTANTIATE(c10::BFloat16)

}  // namespace cpu
}  // namespace fastdiff
