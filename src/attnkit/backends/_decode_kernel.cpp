// attnkit decode kernel: short query blocks over long key/value caches, at memory bandwidth.
//
// Two passes, each reading its cache tensor once:
//   decode_scores(q, k, scale)          s = scale * q k^T for every kv head's M = G*T rows
//   decode_softmax_pv(s, v, sinks)      softmax over s (in place) and out = p v
// Between them the caller applies the mask and score functions to s (M x S per kv head is
// small when T is small). Shape letters: B batch, Hkv kv heads, M = G*T query rows per kv
// head (G query heads per kv head, T queries), S keys, D head dim.
//
// Portable C++: the inner loops are fixed-width (W accumulators) and written for the
// compiler's auto-vectoriser (#pragma omp simd, compiled with -fopenmp-simd); no intrinsics,
// so it builds and runs on AVX2-only or scalar CPUs too. Threads: at::parallel_for over
// (b, kv head, key split); the softmax's global row max and sum are known before the value
// pass, so the splits' partial outputs share one reference and merge by a plain sum (the
// log-sum-exp merge with equal reference points).
//
// Numerics: fp32 accumulation for float/bfloat16/half caches (read as such), fp64 for double.
// NaN rule: a NaN score (NaN query, or a NaN key the caller left visible) makes its row NaN,
// also when every score of the row is NaN; a row whose scores are all -inf (sees no key) is
// zeros with lse -inf (or the sink's logit when there are sinks).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t W = 16;      // accumulator width along D (one 512-bit or two 256-bit regs)
constexpr int MT = 4;          // query rows per register tile
constexpr int64_t KB = 8;      // keys per value block (copied/converted to acc_t in a buffer)

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t D) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    // a vector copy (not memcpy: its narrow stores would stall the wide loads that follow)
    typedef acc_t vc __attribute__((vector_size(64), aligned(4), may_alias));
    int64_t d = 0;
    for (; d + int64_t(64 / sizeof(acc_t)) <= D; d += 64 / sizeof(acc_t))
      *reinterpret_cast<vc*>(dst + d) = *reinterpret_cast<const vc*>(src + d);
    for (; d < D; ++d) dst[d] = src[d];
  } else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    // bfloat16 is the top half of a float: a shift the vectoriser turns into wide ops
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = std::bit_cast<float>(uint32_t(bits[d]) << 16);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
  }
}

// exp(x) for x <= 0 (a score minus its row max), vectorisable: Cephes' expf polynomial on
// x = n ln2 + r, |r| <= ln2 / 2, times 2^n built in the exponent bits; 0 below -87 (and for
// -inf); NaN stays NaN. Max error ~2 ulp. Doubles use std::exp.
inline float exp_nonpositive(float x) {
  const float t = std::floor(x * 1.44269504088896341f + 0.5f);
  const float fx = std::max(t, -127.0f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx) + 127;
  const float scale = std::bit_cast<float>(static_cast<uint32_t>(n < 1 ? 1 : n) << 23);
  const float e = y * scale;
  return x < -87.0f ? 0.0f : e;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// Sum of the W lanes of a (a fixed tree, so the compiler keeps it in registers).
template <typename acc_t>
inline acc_t lane_sum(const acc_t* a) {
  acc_t h[W / 2];
#pragma omp simd
  for (int64_t w = 0; w < W / 2; ++w) h[w] = a[w] + a[w + W / 2];
  acc_t g[W / 4];
#pragma omp simd
  for (int64_t w = 0; w < W / 4; ++w) g[w] = h[w] + h[w + W / 4];
  acc_t total = 0;
  for (int64_t w = 0; w < W / 4; ++w) total += g[w];
  return total;
}

// s[m, j..j+NK) = scale * <q[m], k[j..j+NK)> for rows m0..m0+R of one (b, kv head):
// R x NK independent accumulator chains over the head dim.
template <int R, int NK, typename acc_t>
inline void scores_tile(const acc_t* q, int64_t D, const acc_t* const* kr, acc_t* s, int64_t S,
                        int64_t KSt, int64_t j, acc_t scale) {
  const int64_t Dw = D - D % W;
  acc_t acc[R][NK][W] = {};
  for (int64_t d0 = 0; d0 < Dw; d0 += W) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const acc_t* qr = q + i * D + d0;
#pragma GCC unroll 2
      for (int n = 0; n < NK; ++n) {
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) acc[i][n][w] += qr[w] * kr[n][d0 + w];
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    const acc_t* qr = q + i * D;
#pragma GCC unroll 2
    for (int n = 0; n < NK; ++n) {
      acc_t total = lane_sum(acc[i][n]);
      for (int64_t d = Dw; d < D; ++d) total += qr[d] * kr[n][d];
      s[i * S + (j + n) * KSt] = total * scale;
    }
  }
}

template <int NK, typename acc_t>
inline void scores_keys(const acc_t* q, int64_t M, int64_t D, const acc_t* const* kr, acc_t* s,
                        int64_t S, int64_t KSt, int64_t j, acc_t scale) {
  int64_t m0 = 0;
  for (; m0 + MT <= M; m0 += MT) scores_tile<MT, NK>(q + m0 * D, D, kr, s + m0 * S, S, KSt, j, scale);
  switch (M - m0) {
    case 3: scores_tile<3, NK>(q + m0 * D, D, kr, s + m0 * S, S, KSt, j, scale); break;
    case 2: scores_tile<2, NK>(q + m0 * D, D, kr, s + m0 * S, S, KSt, j, scale); break;
    case 1: scores_tile<1, NK>(q + m0 * D, D, kr, s + m0 * S, S, KSt, j, scale); break;
    default: break;
  }
}

template <typename scalar_t, typename acc_t>
void scores_block(const acc_t* q, int64_t M, int64_t D, const scalar_t* k, int64_t ks,
                  int64_t j0, int64_t j1, acc_t* s, int64_t S, int64_t KSt, acc_t scale,
                  acc_t* kbuf) {
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const acc_t* kr[2];
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      kr[0] = k + j * ks;
      kr[1] = k + (j + 1) * ks;
    } else {
      load_row(k + j * ks, kbuf, D);
      load_row(k + (j + 1) * ks, kbuf + D, D);
      kr[0] = kbuf;
      kr[1] = kbuf + D;
    }
    scores_keys<2>(q, M, D, kr, s, S, KSt, j, scale);
  }
  if (j < j1) {
    const acc_t* kr[1];
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      kr[0] = k + j * ks;
    } else {
      load_row(k + j * ks, kbuf, D);
      kr[0] = kbuf;
    }
    scores_keys<1>(q, M, D, kr, s, S, KSt, j, scale);
  }
}

// out[m, d0:d0+2W] += sum_j p[m, j] v[j, d0:d0+2W] for rows m0..m0+R, nb keys.
template <int R, typename acc_t>
inline void pv_tile(const acc_t* p, int64_t S, int64_t KSt, const acc_t* vb, int64_t vstride, int64_t nb,
                    acc_t* out, int64_t D, int64_t d0) {
  constexpr int64_t C = 2 * W;
  acc_t acc[R][C];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[i][c] = out[i * D + d0 + c];
  for (int64_t j = 0; j < nb; ++j) {
    const acc_t* vr = vb + j * vstride + d0;
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const acc_t pj = p[i * S + j * KSt];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[i][c] += pj * vr[c];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[i * D + d0 + c] = acc[i][c];
}

template <int R, typename acc_t>
inline void pv_rows(const acc_t* p, int64_t S, int64_t KSt, const acc_t* vb, int64_t vstride, int64_t nb,
                    acc_t* out, int64_t D) {
  const int64_t Dc = D - D % (2 * W);
  for (int64_t d0 = 0; d0 < Dc; d0 += 2 * W) pv_tile<R>(p, S, KSt, vb, vstride, nb, out, D, d0);
  if (Dc < D) {
    for (int i = 0; i < R; ++i) {
      acc_t* o = out + i * D;
      for (int64_t j = 0; j < nb; ++j) {
        const acc_t pj = p[i * S + j * KSt];
        const acc_t* vr = vb + j * vstride;
        for (int64_t d = Dc; d < D; ++d) o[d] += pj * vr[d];
      }
    }
  }
}

// out[m, :] += sum_j p[m, j] v[j, :] for keys j0..j1 (p already exponentiated).
template <typename scalar_t, typename acc_t>
void pv_block(const acc_t* p, int64_t M, int64_t S, int64_t KSt, const scalar_t* v, int64_t vs, int64_t D,
              int64_t j0, int64_t j1, acc_t* out, acc_t* vbuf) {
  for (int64_t b0 = j0; b0 < j1; b0 += KB) {
    const int64_t nb = std::min(KB, j1 - b0);
    const acc_t* vb;
    int64_t vstride;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      vb = v + b0 * vs;
      vstride = vs;
    } else {
      for (int64_t j = 0; j < nb; ++j) load_row(v + (b0 + j) * vs, vbuf + j * D, D);
      vb = vbuf;
      vstride = D;
    }
    int64_t m0 = 0;
    for (; m0 + MT <= M; m0 += MT) pv_rows<MT>(p + m0 * S + b0 * KSt, S, KSt, vb, vstride, nb, out + m0 * D, D);
    switch (M - m0) {
      case 3: pv_rows<3>(p + m0 * S + b0 * KSt, S, KSt, vb, vstride, nb, out + m0 * D, D); break;
      case 2: pv_rows<2>(p + m0 * S + b0 * KSt, S, KSt, vb, vstride, nb, out + m0 * D, D); break;
      case 1: pv_rows<1>(p + m0 * S + b0 * KSt, S, KSt, vb, vstride, nb, out + m0 * D, D); break;
      default: break;
    }
  }
}

// --- float fast path: GCC/Clang vector extensions (16 floats: one AVX-512 register, two AVX2
// registers, or scalar code elsewhere), for head dims that are a multiple of 16 ---------------

typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 ld(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void st(float* p, v16 x) { *reinterpret_cast<v16*>(p) = x; }

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ATTNKIT_SHUF __builtin_shufflevector
// Lane sums of 8 vectors at once (a tree of shuffles): out[i] = sum(a[i]) for i < 8.
inline void sum8(const v16* a, float* out) {
  v16 x[4], y[2];
  for (int i = 0; i < 4; ++i)
    x[i] = ATTNKIT_SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                        22, 23) +
           ATTNKIT_SHUF(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                        29, 30, 31);
  for (int i = 0; i < 2; ++i)
    y[i] = ATTNKIT_SHUF(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                        26, 27) +
           ATTNKIT_SHUF(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                        29, 30, 31);
  const v16 z = ATTNKIT_SHUF(y[0], y[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                ATTNKIT_SHUF(y[0], y[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  const v16 w = ATTNKIT_SHUF(z, z, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                ATTNKIT_SHUF(z, z, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int i = 0; i < 8; ++i) out[i] = w[i];
}
#else
inline void sum8(const v16* a, float* out) {
  for (int i = 0; i < 8; ++i) {
    float t = 0;
    for (int w = 0; w < 16; ++w) t += a[i][w];
    out[i] = t;
  }
}
#endif

// Scores of 4 query rows against 2 keys (8 accumulator chains), D % 16 == 0. Rows >= mt are
// computed on a stand-in row and not stored.
inline void scores_f32_tile(const float* const* qr, int mt, const float* k0, const float* k1,
                            int64_t D, float* s, int64_t S, int64_t KSt, int64_t j, int nk,
                            float scale) {
  v16 a[8] = {};
  for (int64_t d = 0; d < D; d += 16) {
    const v16 x0 = ld(k0 + d), x1 = ld(k1 + d);
    for (int i = 0; i < 4; ++i) {
      const v16 qv = ld(qr[i] + d);
      a[2 * i] += qv * x0;
      a[2 * i + 1] += qv * x1;
    }
  }
  float out[8];
  sum8(a, out);
  for (int i = 0; i < mt; ++i)
    for (int n = 0; n < nk; ++n) s[i * S + (j + n) * KSt] = out[2 * i + n] * scale;
}

// Keys two at a time, each pair copied (converted for half types) into a small float buffer
// first, then scored from L1: short copy/compute steps keep the out-of-order core's loads for
// the next pair in flight during the arithmetic (longer blocks measured 2-4x slower).
template <typename scalar_t>
void scores_block_f32(const float* q, int64_t M, int64_t D, const scalar_t* k, int64_t ks,
                      int64_t j0, int64_t j1, float* s, int64_t S, int64_t KSt, float scale,
                      float* kbuf) {
  for (int64_t j = j0; j < j1; j += 2) {
    const int nk = j + 1 < j1 ? 2 : 1;
    load_row(k + j * ks, kbuf, D);
    if (nk == 2) load_row(k + (j + 1) * ks, kbuf + D, D);
    const float* k0 = kbuf;
    const float* k1 = nk == 2 ? kbuf + D : kbuf;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int mt = static_cast<int>(std::min<int64_t>(4, M - m0));
      const float* qr[4];
      for (int i = 0; i < 4; ++i) qr[i] = q + (m0 + (i < mt ? i : 0)) * D;
      scores_f32_tile(qr, mt, k0, k1, D, s + m0 * S, S, KSt, j, nk, scale);
    }
  }
}

// out[R rows, NV*16 columns] += p[R rows, nb keys] v[nb keys, NV*16]: R*NV accumulators.
template <int R, int NV>
inline void pv_f32_tile(const float* const* pr, int64_t KSt, int mt, const float* vb, int64_t vstride,
                        int64_t nb, float* out, int64_t D, int64_t d0) {
  v16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = i < mt ? ld(out + i * D + d0 + 16 * c) : v16{};
  for (int64_t j = 0; j < nb; ++j) {
    const float* vr = vb + j * vstride + d0;
    v16 x[NV];
    for (int c = 0; c < NV; ++c) x[c] = ld(vr + 16 * c);
    for (int i = 0; i < R; ++i) {
      const float pj = pr[i][j * KSt];
      for (int c = 0; c < NV; ++c) acc[i][c] += pj * x[c];
    }
  }
  for (int i = 0; i < mt; ++i)
    for (int c = 0; c < NV; ++c) st(out + i * D + d0 + 16 * c, acc[i][c]);
}

template <int R, int NV>
void pv_f32_rows(const float* p, int64_t M, int64_t S, int64_t KSt, const float* vb, int64_t vstride,
                 int64_t nb, float* out, int64_t D) {
  for (int64_t m0 = 0; m0 < M; m0 += R) {
    const int mt = static_cast<int>(std::min<int64_t>(R, M - m0));
    const float* pr[R];
    for (int i = 0; i < R; ++i) pr[i] = p + (m0 + (i < mt ? i : 0)) * S;
    for (int64_t d0 = 0; d0 < D; d0 += 16 * NV)
      pv_f32_tile<R, NV>(pr, KSt, mt, vb, vstride, nb, out + m0 * D, D, d0);
  }
}

// The value pass for float accumulation and D % 16 == 0: blocks of KB keys, each read from
// memory once (converted to float in a buffer for half types), rows in register tiles.
template <typename scalar_t>
void pv_block_f32(const float* p, int64_t M, int64_t S, int64_t KSt, const scalar_t* v, int64_t vs, int64_t D,
                  int64_t j0, int64_t j1, float* out, float* vbuf) {
  for (int64_t b0 = j0; b0 < j1; b0 += KB) {
    const int64_t nb = std::min(KB, j1 - b0);
    const float* vb;
    int64_t vstride;
    for (int64_t j = 0; j < nb; ++j) load_row(v + (b0 + j) * vs, vbuf + j * D, D);
    vb = vbuf;
    vstride = D;
    const float* pb = p + b0 * KSt;
    if (D % 128 == 0) pv_f32_rows<2, 8>(pb, M, S, KSt, vb, vstride, nb, out, D);
    else if (D % 64 == 0) pv_f32_rows<4, 4>(pb, M, S, KSt, vb, vstride, nb, out, D);
    else if (D % 32 == 0) pv_f32_rows<4, 2>(pb, M, S, KSt, vb, vstride, nb, out, D);
    else pv_f32_rows<4, 1>(pb, M, S, KSt, vb, vstride, nb, out, D);
  }
}

// How many key splits per (b, kv head): enough work items for every thread, >= 256 keys each.
int64_t num_splits(int64_t BH, int64_t S) {
  const int64_t threads = at::get_num_threads();
  int64_t want = (4 * threads + BH - 1) / BH;
  if (BH >= 2 * threads) want = 1;
  const int64_t most = std::max<int64_t>(1, S / 256);
  return std::max<int64_t>(1, std::min(want, most));
}

void check_cache(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, Hkv, S, D), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name,
              " must have a contiguous last (head) dim, got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

template <typename scalar_t>
void scores_impl(const at::Tensor& q, const at::Tensor& k, double scale, at::Tensor& s) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), M = q.size(2);
  TORCH_CHECK(q.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
              "q must be in the accumulation dtype");
  const int64_t BH = B * Hkv, splits = num_splits(BH, S), per = (S + splits - 1) / splits;
  const acc_t* qp = q.data_ptr<acc_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  acc_t* sp = s.data_ptr<acc_t>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  at::parallel_for(0, BH * splits, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> kbuf(2 * D);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / splits, part = item % splits, b = bh / Hkv, h = bh % Hkv;
      const int64_t j0 = part * per, j1 = std::min(S, j0 + per);
      if (j0 >= j1) continue;
      // s is (S, M) per kv head: row m of key j at j * M + m (the M rows of one key together)
      acc_t* sh = sp + bh * S * M;
      if constexpr (std::is_same<acc_t, float>::value) {
        if (D % 16 == 0) {
          scores_block_f32<scalar_t>(qp + bh * M * D, M, D, kp + b * kb + h * kh, ks, j0, j1,
                                     sh, 1, M, static_cast<float>(scale), kbuf.data());
          continue;
        }
      }
      scores_block<scalar_t, acc_t>(qp + bh * M * D, M, D, kp + b * kb + h * kh, ks, j0, j1,
                                    sh, 1, M, static_cast<acc_t>(scale), kbuf.data());
    }
  });
}

template <typename scalar_t>
void softmax_pv_impl(at::Tensor& s, const at::Tensor& v, const at::Tensor& sinks, bool has_sinks,
                     at::Tensor& out, at::Tensor& lse) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t B = v.size(0), Hkv = v.size(1), S = v.size(2), D = v.size(3), M = s.size(3);
  TORCH_CHECK(s.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
              "s must be in the accumulation dtype");
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t BH = B * Hkv, R = BH * M;
  acc_t* sp = s.data_ptr<acc_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const acc_t* sinkp = has_sinks ? sinks.data_ptr<acc_t>() : nullptr;
  // 1. Per row: max ignoring NaN, whether it holds a NaN, and its reference point.
  std::vector<acc_t> rmax(R);
  std::vector<char> rnan(R), rempty(R);
  at::parallel_for(0, BH, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> mx(M);
    std::vector<int32_t> nans(M);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const acc_t* sh = sp + bh * S * M;  // (S, M)
      std::fill(mx.begin(), mx.end(), -inf);
      std::fill(nans.begin(), nans.end(), 0);
      for (int64_t j = 0; j < S; ++j) {
        const acc_t* row = sh + j * M;
#pragma omp simd
        for (int64_t m = 0; m < M; ++m) {
          const acc_t x = row[m];
          nans[m] += x != x;
          mx[m] = x > mx[m] ? x : mx[m];
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const int64_t r = bh * M + m;
        acc_t x = mx[m];
        rempty[r] = nans[m] == 0 && x == -inf;  // every score -inf: the row sees no key
        rnan[r] = nans[m] > 0;
        if (has_sinks) x = std::max(x, sinkp[r % (Hkv * M)]);
        rmax[r] = x == -inf ? acc_t(0) : x;
      }
    }
  });
  // 2. Weights in place, partial sums and partial outputs per key split (split-KV).
  const int64_t splits = num_splits(BH, S), per = S > 0 ? (S + splits - 1) / splits : 0;
  std::vector<acc_t> part_out(splits > 1 ? BH * splits * M * D : 0);
  std::vector<acc_t> part_sum(BH * splits * M, acc_t(0));
  acc_t* outp = out.data_ptr<acc_t>();
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  if (S > 0) {
    at::parallel_for(0, BH * splits, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> vbuf(KB * D), total(M);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t bh = item / splits, part = item % splits, b = bh / Hkv, h = bh % Hkv;
        const int64_t j0 = part * per, j1 = std::min(S, j0 + per);
        if (j0 >= j1) continue;
        acc_t* p = sp + bh * S * M;
        const acc_t* ref = rmax.data() + bh * M;
        std::fill(total.begin(), total.end(), acc_t(0));
        for (int64_t j = j0; j < j1; ++j) {
          acc_t* row = p + j * M;
#pragma omp simd
          for (int64_t m = 0; m < M; ++m) {
            const acc_t e = exp_nonpositive(row[m] - ref[m]);
            row[m] = e;
            total[m] += e;
          }
        }
        for (int64_t m = 0; m < M; ++m) part_sum[item * M + m] = total[m];
        acc_t* o = splits > 1 ? part_out.data() + item * M * D : outp + bh * M * D;
        if constexpr (std::is_same<acc_t, float>::value) {
          if (D % 16 == 0) {
            pv_block_f32<scalar_t>(p, M, 1, M, vp + b * vb + h * vh, vs, D, j0, j1, o,
                                   vbuf.data());
            continue;
          }
        }
        pv_block<scalar_t, acc_t>(p, M, 1, M, vp + b * vb + h * vh, vs, D, j0, j1, o,
                                  vbuf.data());
      }
    });
  }
  // 3. Merge the splits (they share each row's reference point: the log-sum-exp merge is a
  //    plain sum), normalise, apply the NaN / empty-row rules, lse.
  acc_t* lsep = lse.data_ptr<acc_t>();
  at::parallel_for(0, R, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = r / M, m = r % M;
      acc_t* o = outp + r * D;
      acc_t tot = 0;
      for (int64_t part = 0; part < splits; ++part) {
        tot += part_sum[(bh * splits + part) * M + m];
        if (splits > 1) {
          const acc_t* po = part_out.data() + ((bh * splits + part) * M + m) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += po[d];
        }
      }
      if (has_sinks) tot += std::exp(sinkp[r % (Hkv * M)] - rmax[r]);
      if (rnan[r]) {
        for (int64_t d = 0; d < D; ++d) o[d] = nan;
        lsep[r] = nan;
      } else if (rempty[r]) {
        for (int64_t d = 0; d < D; ++d) o[d] = 0;
        lsep[r] = has_sinks ? sinkp[r % (Hkv * M)] : -inf;
      } else {
        const acc_t inv = acc_t(1) / tot;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        lsep[r] = rmax[r] + std::log(tot);
      }
    }
  });
}

}  // namespace

// q (B, Hkv, M, D) contiguous acc dtype; k (B, Hkv, S, D) any strides with stride(3) == 1.
// Returns s (B, Hkv, S, M) in the acc dtype: key-major, the M query rows of a key together.
at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_cache(k, "k");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be contiguous (B, Hkv, M, D)");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), M = q.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == Hkv && q.size(3) == D, "q and k do not match");
  auto s = at::empty({B, Hkv, S, M}, q.options());
  if (S == 0 || M == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "decode_scores",
                                  [&] { scores_impl<scalar_t>(q, k, scale, s); });
  return s;
}

// s (B, Hkv, S, M) contiguous acc dtype, masked entries -inf (overwritten with the weights);
// v (B, Hkv, S, D) any strides with stride(3) == 1; sinks: empty or (Hkv, M) acc dtype.
// Returns (out (B, Hkv, M, D), lse (B, Hkv, M)) in the acc dtype.
std::vector<at::Tensor> decode_softmax_pv(at::Tensor s, const at::Tensor& v,
                                          const at::Tensor& sinks) {
  check_cache(v, "v");
  TORCH_CHECK(s.dim() == 4 && s.is_contiguous(), "s must be contiguous (B, Hkv, S, M)");
  const int64_t B = v.size(0), Hkv = v.size(1), S = v.size(2), D = v.size(3), M = s.size(3);
  TORCH_CHECK(s.size(0) == B && s.size(1) == Hkv && s.size(2) == S, "s and v do not match");
  const bool has_sinks = sinks.defined() && sinks.numel() > 0;
  if (has_sinks)
    TORCH_CHECK(sinks.is_contiguous() && sinks.numel() == Hkv * M &&
                sinks.scalar_type() == s.scalar_type(), "sinks must be (Hkv, M) in s's dtype");
  auto out = at::zeros({B, Hkv, M, D}, s.options());
  auto lse = at::empty({B, Hkv, M}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "decode_pv",
                                  [&] { softmax_pv_impl<scalar_t>(s, v, sinks, has_sinks, out, lse); });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_scores", &decode_scores, "scale * q k^T per kv head (B, Hkv, M, S)");
  m.def("decode_softmax_pv", &decode_softmax_pv,
        "softmax over the scores (in place) and weights @ v; returns (out, lse)");
}
