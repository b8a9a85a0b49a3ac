// attnkit attention kernel: shared pieces (vector types, exp/tanh, the GEMM micro-kernel,
// conversions, the call's description). Included by _attn_kernel{,_fwd,_bwd,_plan}.cpp.
//
// One source, several targets: the builder (backends/_ext.py) compiles these files once per
// instruction set (-mavx512f..., -mavx2 -mfma -mf16c, or nothing = SSE2) into separate
// libraries and loads the best one the CPU runs, so nothing here checks the CPU at run time:
// the vector width comes from the compiler's own macros.
//
// Layout words: B batch, H query heads, Hkv key/value heads, G = H / Hkv, T queries, S keys,
// D head dim of q/k, Dv of v. Tiles are BQ query rows x BK keys. "acc" is the accumulation
// type: float for float/bfloat16/half inputs, double for double.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace attnkit_kernel {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;  // zmm: 16 floats
constexpr int MR = 8;       // 8 x 2 accumulators of 32 registers
#elif defined(__AVX__)
constexpr int VBYTES = 32;  // ymm: 8 floats
constexpr int MR = 6;       // 6 x 2 accumulators + 2 loads + 1 broadcast = 15 of 16 registers
#else
constexpr int VBYTES = 16;  // SSE2 / NEON: 4 floats
constexpr int MR = 6;
#endif

constexpr int64_t BQ = 64;   // query rows per tile (one 64-bit mask word per key)
constexpr int64_t BK = 64;   // keys per tile (one 64-bit mask word per query row)
constexpr int64_t PAD = 32;  // packed rows are padded to a multiple of this many elements

inline int64_t padded(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename S> using acc_of = typename AccOf<S>::type;

// ---- vectors: GCC/Clang vector extensions, one register wide ------------------------------

template <typename T> struct VT {
  static constexpr int W = VBYTES / int(sizeof(T));
  typedef T v __attribute__((vector_size(VBYTES)));
  typedef T u __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I m __attribute__((vector_size(VBYTES)));  // what a comparison returns
  typedef I mu __attribute__((vector_size(VBYTES), aligned(sizeof(T)), may_alias));
};
template <typename T> using vec = typename VT<T>::v;
template <typename T> using vmask = typename VT<T>::m;

template <typename T> inline vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VT<T>::u*>(p);
}
template <typename T> inline void vstore(T* p, vec<T> x) {
  *reinterpret_cast<typename VT<T>::u*>(p) = x;
}
template <typename T> inline vec<T> splat(T x) { return vec<T>{} + x; }
template <typename T> inline vec<T> iota() {
  vec<T> r{};
  for (int i = 0; i < VT<T>::W; ++i) r[i] = T(i);
  return r;
}
template <typename T> inline vec<T> neg_inf() {
  return splat<T>(-std::numeric_limits<T>::infinity());
}
// Lane i set iff bit i of `bits` is (the low W bits of a mask word).
template <typename T> inline vmask<T> bit_lanes(uint64_t bits) {
  using I = typename VT<T>::I;
  vmask<T> one{}, sel{};
  for (int i = 0; i < VT<T>::W; ++i) sel[i] = I(1) << i;
  one = one + I(bits & ((uint64_t(1) << VT<T>::W) - 1));
  return (one & sel) != 0;
}

// max(a, b) lane by lane; where b is NaN, b (the x86 max instruction's rule).
inline vec<float> vmax(vec<float> a, vec<float> b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, b);
#elif defined(__AVX__)
  return _mm256_max_ps(a, b);
#elif defined(__SSE2__)
  return _mm_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}
inline vec<double> vmax(vec<double> a, vec<double> b) { return a > b ? a : b; }

// exp(x), float: Cephes' polynomial on x = n ln2 + r, times 2^n built in the exponent bits.
// ~2 ulp on [-87.3, 88]; 0 below (and for -inf); clamped above 88 (never reached by a
// softmax, whose arguments are <= 0); NaN stays NaN.
inline vec<float> vexp(vec<float> x) {
  using VF = vec<float>;
  using VI = vmask<float>;
  const VF lo = splat(-87.33654f), hi = splat(88.0f);
  VF xc = x < lo ? lo : x;  // comparisons with NaN are false: NaN passes through
  xc = xc > hi ? hi : xc;
  const VF t = xc * 1.44269504088896341f;
  const VF n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  VF r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const VF z = r * r;
  VF y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  VF scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const VF out = y * scale;
  return x < lo ? VF{} : out;
}
inline vec<double> vexp(vec<double> x) {
  for (int i = 0; i < VT<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}

// tanh(x), float: an odd Taylor polynomial near 0 (no cancellation), (e^2x - 1)/(e^2x + 1)
// elsewhere; ~3e-7 relative.
inline vec<float> vtanh(vec<float> x) {
  using VF = vec<float>;
  const VF ax = x < 0.0f ? -x : x;
  const VF x2 = x * x;
  VF p = splat(62.0f / 2835.0f);
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const VF small = x + x * x2 * p;
  const VF e = vexp((ax < 9.0f ? ax : splat(9.0f)) * 2.0f);
  VF big = (e - 1.0f) / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.25f ? small : big;
}
inline vec<double> vtanh(vec<double> x) {
  for (int i = 0; i < VT<double>::W; ++i) x[i] = std::tanh(x[i]);
  return x;
}

// ---- the GEMM: C (+)= A . B, B packed in panels ---------------------------------------------
//
// A is read through strides (a(i, p) = A[i * sam + p * sak]), so the same kernel multiplies
// by a transposed tile without copying it. B (K x N) is packed panel-major: NR = 2W columns at
// a time, each panel K x NR contiguous (pack_b_rows / pack_b_cols), so the micro-kernel
// streams it sequentially (row-major B with a long stride thrashes L1's sets). Register
// block: R (<= MR) rows x NR columns; init 0 = overwrite, 1 = accumulate, 2 = scale each row
// of C by rs[row] first (the online softmax's rescale, fused into the accumulator's load).

template <typename T> constexpr int64_t NR = 2 * VT<T>::W;

template <typename T, int R>
inline void ukernel(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, T* C,
                    int64_t ldc, int init, const T* rs) {
  constexpr int W = VT<T>::W;
  vec<T> c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (init == 0) {
      c0[r] = vec<T>{};
      c1[r] = vec<T>{};
    } else {
      c0[r] = vload(C + r * ldc);
      c1[r] = vload(C + r * ldc + W);
      if (init == 2) {
        c0[r] *= rs[r];
        c1[r] *= rs[r];
      }
    }
  }
  for (int64_t p = 0; p < K; ++p) {
    const vec<T> b0 = vload(B + p * 2 * W), b1 = vload(B + p * 2 * W + W);
    const T* a = A + p * sak;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * sam];
      c0[r] += ar * b0;
      c1[r] += ar * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + W, c1[r]);
  }
}

template <typename T, int R>
inline void ukernel_rows(int rows, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B,
                         T* C, int64_t ldc, int init, const T* rs) {
  if constexpr (R > 1) {
    if (rows < R) {
      ukernel_rows<T, R - 1>(rows, K, A, sam, sak, B, C, ldc, init, rs);
      return;
    }
  }
  ukernel<T, R>(K, A, sam, sak, B, C, ldc, init, rs);
}

// C[M x N] (+)= A[M x K] . B[K x N]; N a multiple of NR; B packed (panel stride K * NR).
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak,
                 const T* B, T* C, int64_t ldc, int init, const T* rs = nullptr) {
  if (K == 0 && init != 0) {  // nothing to add; only the rescale remains
    if (init == 2)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) C[i * ldc + j] *= rs[i];
    return;
  }
  for (int64_t j = 0; j < N; j += NR<T>)  // one B panel (K x NR) stays in L1 across the rows
    for (int64_t i = 0; i < M; i += MR)
      ukernel_rows<T, MR>(int(std::min<int64_t>(MR, M - i)), K, A + i * sam, sam, sak,
                          B + j * K, C + i * ldc + j, ldc, init, rs ? rs + i : nullptr);
}

// ---- conversions: inputs to acc rows once per packed tile; acc to the output dtype ---------

template <typename S, typename T>
inline void to_acc(const S* src, T* dst, int64_t n, T scale) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {  // bfloat16 is the top half of a float: a shift
      uint32_t u = uint32_t(bits[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      dst[i] = f * scale;
    }
  } else if constexpr (std::is_same<S, c10::Half>::value) {
    int64_t i = 0;
#if defined(__F16C__)
    const __m256 sc = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), sc));
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]) * scale;
  }
}

template <typename S, typename T>
inline void from_acc(const T* src, S* dst, int64_t n) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) {  // round to nearest even; NaN stays a (quiet) NaN
      uint32_t u;
      std::memcpy(&u, src + i, 4);
      const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
      bits[i] = nan ? uint16_t((u >> 16) | 0x40u)
                    : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  } else if constexpr (std::is_same<S, c10::Half>::value) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
      __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
  }
}

// rows x cols of src (row stride ld_src) into dst (row stride ld_dst), zeros in the padding
// columns [cols, ld_dst) and rows [rows, pad_rows).
template <typename S, typename T>
inline void pack_rows(const S* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                      int64_t ld_dst, int64_t pad_rows, T scale = T(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    to_acc(src + r * ld_src, dst + r * ld_dst, cols, scale);
    std::fill(dst + r * ld_dst + cols, dst + (r + 1) * ld_dst, T(0));
  }
  if (pad_rows > rows) std::fill(dst + rows * ld_dst, dst + pad_rows * ld_dst, T(0));
}

// B operand from rows: B(p, j) = src[p][j] * scale, p < K, j < N, zero-padded to a multiple
// of NR columns, panel-major.
template <typename S, typename T>
inline void pack_b_rows(const S* src, int64_t ld_src, int64_t K, int64_t N, T* dst,
                        T* row_buf, T scale = T(1)) {
  const int64_t Np = (N + NR<T> - 1) / NR<T> * NR<T>;
  if constexpr (std::is_same<S, T>::value) {
    if (Np == N && scale == T(1)) {  // straight into the panels
      for (int64_t p = 0; p < K; ++p)
        for (int64_t j = 0; j < Np; j += NR<T>)
          std::memcpy(dst + j * K + p * NR<T>, src + p * ld_src + j, NR<T> * sizeof(T));
      return;
    }
  }
  for (int64_t p = 0; p < K; ++p) {
    to_acc(src + p * ld_src, row_buf, N, scale);
    std::fill(row_buf + N, row_buf + Np, T(0));
    for (int64_t j = 0; j < Np; j += NR<T>)
      std::memcpy(dst + j * K + p * NR<T>, row_buf + j, NR<T> * sizeof(T));
  }
}

// B operand from columns: B(p, j) = src[j][p] * scale, p < K, j < N (src rows are the
// columns of B: a transpose), zero columns up to n_pad, panel-major.
template <typename S, typename T>
inline void pack_b_cols(const S* src, int64_t ld_src, int64_t N, int64_t K, T* dst,
                        int64_t n_pad, T* row_buf, T scale = T(1)) {
  constexpr int64_t n = NR<T>;
  for (int64_t j0 = 0; j0 < n_pad; j0 += n) {
    T* panel = dst + j0 * K;
    const int64_t cols = std::max<int64_t>(0, std::min(n, N - j0));
    for (int64_t jj = 0; jj < cols; ++jj) {
      to_acc(src + (j0 + jj) * ld_src, row_buf, K, scale);
      for (int64_t p = 0; p < K; ++p) panel[p * n + jj] = row_buf[p];
    }
    for (int64_t jj = cols; jj < n; ++jj)
      for (int64_t p = 0; p < K; ++p) panel[p * n + jj] = T(0);
  }
}

}  // namespace attnkit_kernel
