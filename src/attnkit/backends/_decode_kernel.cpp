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
constexpr int64_t KB = 32;     // keys per block (values converted to acc_t in a buffer)

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
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

// s[m, j] = scale * <q[m], k[j]>, rows m0..m0+R, keys j0..j1 of one (b, kv head).
template <int R, typename acc_t>
inline void scores_tile(const acc_t* q, int64_t D, const acc_t* kr, acc_t* s, int64_t S,
                        int64_t j, acc_t scale) {
  const int64_t Dw = D - D % W;
  acc_t acc[R][W] = {};
  for (int64_t d0 = 0; d0 < Dw; d0 += W) {
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const acc_t* qr = q + i * D + d0;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) acc[i][w] += qr[w] * kr[d0 + w];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) {
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t w = 0; w < W; ++w) total += acc[i][w];
    const acc_t* qr = q + i * D;
    for (int64_t d = Dw; d < D; ++d) total += qr[d] * kr[d];
    s[i * S + j] = total * scale;
  }
}

template <typename scalar_t, typename acc_t>
void scores_block(const acc_t* q, int64_t M, int64_t D, const scalar_t* k, int64_t ks,
                  int64_t j0, int64_t j1, acc_t* s, int64_t S, acc_t scale, acc_t* kbuf) {
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t* kr;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      kr = k + j * ks;
    } else {
      load_row(k + j * ks, kbuf, D);
      kr = kbuf;
    }
    int64_t m0 = 0;
    for (; m0 + MT <= M; m0 += MT) scores_tile<MT>(q + m0 * D, D, kr, s + m0 * S, S, j, scale);
    switch (M - m0) {
      case 3: scores_tile<3>(q + m0 * D, D, kr, s + m0 * S, S, j, scale); break;
      case 2: scores_tile<2>(q + m0 * D, D, kr, s + m0 * S, S, j, scale); break;
      case 1: scores_tile<1>(q + m0 * D, D, kr, s + m0 * S, S, j, scale); break;
      default: break;
    }
  }
}

// out[m, d0:d0+2W] += sum_j p[m, j] v[j, d0:d0+2W] for rows m0..m0+R, nb keys.
template <int R, typename acc_t>
inline void pv_tile(const acc_t* p, int64_t S, const acc_t* vb, int64_t vstride, int64_t nb,
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
      const acc_t pj = p[i * S + j];
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
inline void pv_rows(const acc_t* p, int64_t S, const acc_t* vb, int64_t vstride, int64_t nb,
                    acc_t* out, int64_t D) {
  const int64_t Dc = D - D % (2 * W);
  for (int64_t d0 = 0; d0 < Dc; d0 += 2 * W) pv_tile<R>(p, S, vb, vstride, nb, out, D, d0);
  if (Dc < D) {
    for (int i = 0; i < R; ++i) {
      acc_t* o = out + i * D;
      for (int64_t j = 0; j < nb; ++j) {
        const acc_t pj = p[i * S + j];
        const acc_t* vr = vb + j * vstride;
        for (int64_t d = Dc; d < D; ++d) o[d] += pj * vr[d];
      }
    }
  }
}

// out[m, :] += sum_j p[m, j] v[j, :] for keys j0..j1 (p already exponentiated).
template <typename scalar_t, typename acc_t>
void pv_block(const acc_t* p, int64_t M, int64_t S, const scalar_t* v, int64_t vs, int64_t D,
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
    for (; m0 + MT <= M; m0 += MT) pv_rows<MT>(p + m0 * S + b0, S, vb, vstride, nb, out + m0 * D, D);
    switch (M - m0) {
      case 3: pv_rows<3>(p + m0 * S + b0, S, vb, vstride, nb, out + m0 * D, D); break;
      case 2: pv_rows<2>(p + m0 * S + b0, S, vb, vstride, nb, out + m0 * D, D); break;
      case 1: pv_rows<1>(p + m0 * S + b0, S, vb, vstride, nb, out + m0 * D, D); break;
      default: break;
    }
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
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), M = q.size(2);
    using acc_t = typename Acc<scalar_t>::type;
    TORCH_CHECK(q.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "q must be in the accumulation dtype");
    const int64_t BH = B * Hkv, splits = num_splits(BH, S), per = (S + splits - 1) / splits;
    const acc_t* qp = q.data_ptr<acc_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    acc_t* sp = s.data_ptr<acc_t>();
    const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
    at::parallel_for(0, BH * splits, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> kbuf(D);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t bh = item / splits, part = item % splits, b = bh / Hkv, h = bh % Hkv;
        const int64_t j0 = part * per, j1 = std::min(S, j0 + per);
        if (j0 >= j1) continue;
        scores_block<scalar_t, acc_t>(qp + bh * M * D, M, D, kp + b * kb + h * kh, ks, j0, j1,
                                      sp + bh * M * S, S, static_cast<acc_t>(scale),
                                      kbuf.data());
      }
    });
}

template <typename scalar_t>
void softmax_pv_impl(at::Tensor& s, const at::Tensor& v, const at::Tensor& sinks, bool has_sinks,
                     at::Tensor& out, at::Tensor& lse) {
  const int64_t B = v.size(0), Hkv = v.size(1), S = v.size(2), D = v.size(3), M = s.size(2);
    using acc_t = typename Acc<scalar_t>::type;
    TORCH_CHECK(s.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "s must be in the accumulation dtype");
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    const int64_t BH = B * Hkv, R = BH * M;
    acc_t* sp = s.data_ptr<acc_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const acc_t* sinkp = has_sinks ? sinks.data_ptr<acc_t>() : nullptr;
    // 1. Row max (ignoring NaN), whether the row holds a NaN, and the row's reference point.
    std::vector<acc_t> rmax(R);
    std::vector<char> rnan(R), rempty(R);
    at::parallel_for(0, R, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const acc_t* row = sp + r * S;
        acc_t mx = -inf;
        int64_t nans = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nans)
        for (int64_t j = 0; j < S; ++j) {
          const acc_t x = row[j];
          nans += x != x;
          mx = x > mx ? x : mx;
        }
        const bool any_nan = nans > 0;
        rempty[r] = !any_nan && mx == -inf;  // every score -inf: the row sees no key
        rnan[r] = any_nan;
        if (has_sinks) mx = std::max(mx, sinkp[r % (Hkv * M)]);
        rmax[r] = mx == -inf ? acc_t(0) : mx;
      }
    });
    // 2. Weights in place, partial sums and partial outputs per key split.
    const int64_t splits = num_splits(BH, S), per = S > 0 ? (S + splits - 1) / splits : 0;
    std::vector<acc_t> part_out(splits > 1 ? BH * splits * M * D : 0);
    std::vector<acc_t> part_sum(BH * splits * M, acc_t(0));
    acc_t* outp = out.data_ptr<acc_t>();
    const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
    if (S > 0) {
      at::parallel_for(0, BH * splits, 1, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> vbuf(KB * D);
        for (int64_t item = lo; item < hi; ++item) {
          const int64_t bh = item / splits, part = item % splits, b = bh / Hkv, h = bh % Hkv;
          const int64_t j0 = part * per, j1 = std::min(S, j0 + per);
          if (j0 >= j1) continue;
          acc_t* p = sp + bh * M * S;
          for (int64_t m = 0; m < M; ++m) {
            const acc_t ref = rmax[bh * M + m];
            acc_t* row = p + m * S;
            acc_t total = 0;
#pragma omp simd reduction(+ : total)
            for (int64_t j = j0; j < j1; ++j) {
              const acc_t e = exp_nonpositive(row[j] - ref);
              row[j] = e;
              total += e;
            }
            part_sum[item * M + m] = total;
          }
          acc_t* o = splits > 1 ? part_out.data() + item * M * D : outp + bh * M * D;
          pv_block<scalar_t, acc_t>(p, M, S, vp + b * vb + h * vh, vs, D, j0, j1, o,
                                    vbuf.data());
        }
      });
    }
    // 3. Merge the splits, normalise, apply the NaN / empty-row rules, lse.
    acc_t* lsep = lse.data_ptr<acc_t>();
    at::parallel_for(0, R, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t bh = r / M, m = r % M;
        acc_t* o = outp + r * D;
        acc_t total = 0;
        for (int64_t part = 0; part < splits; ++part) {
          total += part_sum[(bh * splits + part) * M + m];
          if (splits > 1) {
            const acc_t* po = part_out.data() + ((bh * splits + part) * M + m) * D;
            for (int64_t d = 0; d < D; ++d) o[d] += po[d];
          }
        }
        if (has_sinks) total += std::exp(sinkp[r % (Hkv * M)] - rmax[r]);
        if (rnan[r]) {
          for (int64_t d = 0; d < D; ++d) o[d] = nan;
          lsep[r] = nan;
        } else if (rempty[r]) {
          for (int64_t d = 0; d < D; ++d) o[d] = 0;
          lsep[r] = has_sinks ? sinkp[r % (Hkv * M)] : -inf;
        } else {
          const acc_t inv = acc_t(1) / total;
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
          lsep[r] = rmax[r] + std::log(total);
        }
      }
    });
}

}  // namespace

// q (B, Hkv, M, D) contiguous acc dtype; k (B, Hkv, S, D) any strides with stride(3) == 1.
// Returns s (B, Hkv, M, S) in the acc dtype.
at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_cache(k, "k");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be contiguous (B, Hkv, M, D)");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), M = q.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == Hkv && q.size(3) == D, "q and k do not match");
  auto s = at::empty({B, Hkv, M, S}, q.options());
  if (S == 0 || M == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "decode_scores",
                                  [&] { scores_impl<scalar_t>(q, k, scale, s); });
  return s;
}

// s (B, Hkv, M, S) contiguous acc dtype, masked entries -inf (overwritten with the weights);
// v (B, Hkv, S, D) any strides with stride(3) == 1; sinks: empty or (Hkv, M) acc dtype.
// Returns (out (B, Hkv, M, D), lse (B, Hkv, M)) in the acc dtype.
std::vector<at::Tensor> decode_softmax_pv(at::Tensor s, const at::Tensor& v,
                                          const at::Tensor& sinks) {
  check_cache(v, "v");
  TORCH_CHECK(s.dim() == 4 && s.is_contiguous(), "s must be contiguous (B, Hkv, M, S)");
  const int64_t B = v.size(0), Hkv = v.size(1), S = v.size(2), D = v.size(3), M = s.size(2);
  TORCH_CHECK(s.size(0) == B && s.size(1) == Hkv && s.size(3) == S, "s and v do not match");
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
