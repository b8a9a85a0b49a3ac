// attnkit decode kernel: short query blocks (decode steps, verify blocks) over long KV caches.
//
// Shape letters: B batch, Hkv kv heads, G = H / Hkv query heads per kv head, T queries,
// M = G*T query rows per kv head (row m = g*T + t, query head h = hkv*G + m / T), S keys,
// D head dim of q and k, Dv head dim of v.
//
// Built once per CPU target by backends/_decode_ext.py (AVX-512, AVX2+FMA+F16C, and a default
// build with no ISA flags), each with CPU_CAPABILITY set so that at::vec::Vectorized<float> is
// that target's SIMD register; the loader picks the build the CPU runs. All arithmetic is in
// Vectorized<acc_t> (float for float/bfloat16/half caches, double for double): bfloat16 rows
// are widened by a shift and half rows by F16C as they are loaded, never computed in 16 bits.
//
// The work: every kv head's M query rows read each K and V row once, in tiles of NB keys:
//   1. scores s[m, j] = scale * <q_m, k_j> for the tile: register tiles of 6 or 4 rows x 2
//      keys (12 or 8 accumulator chains; 2 x 4 or 1 x 8 for fewer rows), reduced across
//      lanes four at a time by a tree of horizontal adds;
//   2. score functions the kernel knows (softcap, ALiBi), then each row's key interval
//      [lo_t, hi_t) (causal at any offset, sliding windows) as -inf outside it;
//   3. online softmax: each row's running max and sum, weights p = exp(s - max);
//   4. o[m, :] = o[m, :] * exp(old max - new max) + sum_j p[m, j] v_j: register tiles of
//      6 or 4 rows x 2 vectors (12 or 8 accumulators), the rescale folded into their load.
// Rows of a tile 16 keys ahead are prefetched as the tile is read.
// Threads take (b, kv head, key split) work items from a shared counter (a descheduled
// thread delays one item, not a fixed share), and key splits merge by log-sum-exp.
//
// Entry points (see the bottom of the file):
//   decode_fused       every step above in one pass over K and V;
//   decode_scores      step 1 only, s (B, Hkv, M, S) for masks and score functions that the
//                      Python side applies between the two passes;
//   decode_softmax_pv  steps 3-4 over such an s (decode_softmax_pv(s, v, T, sinks)).
//
// NaN and empty rows (the rule of backends/_edges.py): a NaN score (NaN query, or a NaN key a
// row sees) makes that row NaN, also when all of its scores are NaN (a NaN-propagating max
// marks the row before any exponential); a NaN value reaches the rows whose weight on it is computed:
// in decode_fused only rows whose interval covers it (a partially visible tile is multiplied
// row by row over each row's own span); a row that sees no key is zeros with lse -inf (or the
// sink's logit).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {  // internal linkage: builds for different targets never mix (see _decode_ext.py)

using at::vec::Vectorized;

constexpr int64_t NB = 32;  // keys per tile: the K and V rows of a tile stay in L1
constexpr int64_t PF = 16;  // prefetch distance, in keys
constexpr int PF_LOCALITY = 2;  // prefetch into L2 (prefetcht1): more lines in flight than L1

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename acc_t>
constexpr int64_t lanes() { return Vectorized<acc_t>::size(); }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// --- loads that widen ---------------------------------------------------------------------

// lanes<acc_t>() elements of a row starting at p, as acc_t.
template <typename acc_t, typename E>
inline Vectorized<acc_t> load(const E* p) {
  if constexpr (std::is_same_v<acc_t, E>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "half caches accumulate in float");
    Vectorized<float> out;
    at::vec::load_to_float<E>(p, out);  // bfloat16: shift; half: F16C (vcvtph2ps)
    return out;
  }
}

// A row of D elements into dst as acc_t, zero-padded to Dp (a multiple of the lanes).
template <typename acc_t, typename scalar_t>
inline void widen_row(const scalar_t* src, int64_t D, acc_t* dst, int64_t Dp) {
  constexpr int64_t L = lanes<acc_t>();
  int64_t d = 0;
  for (; d + L <= D; d += L) load<acc_t>(src + d).store(dst + d);
  for (; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
  for (; d < Dp; ++d) dst[d] = acc_t(0);
}

template <typename E>
inline void prefetch_row(const E* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(E)); off += 64)
    __builtin_prefetch(p + off, 0, PF_LOCALITY);
}

// --- lane reductions ----------------------------------------------------------------------

// out[i] = sum of the lanes of a[i], i < N (a multiple of 4).
template <int N, typename acc_t>
inline void sum_lanes(const Vectorized<acc_t>* a, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    // hadd pairs neighbours: after two rounds each 128-bit half holds, in lane i, a partial
    // sum of a[i] (one half of its lanes each); adding the halves finishes four at once.
    for (int g = 0; g < N; g += 4) {
      const __m256 t0 = _mm256_hadd_ps(a[g], a[g + 1]), t1 = _mm256_hadd_ps(a[g + 2], a[g + 3]);
      const __m256 u = _mm256_hadd_ps(t0, t1);
      _mm_storeu_ps(out + g, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    }
    return;
  }
#endif
  for (int i = 0; i < N; ++i)
    out[i] = at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, a[i]);
}

// NaN-propagating max (a NaN score must reach its row).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) { return (a != a || a > b) ? a : b; }

// exp of x <= 0 (or -inf): torch's exp_u20 polynomial for float (the one its flash kernel
// uses; it maps NaN to a finite value, so callers handle NaN before), Sleef for double.
inline Vectorized<float> fast_exp(Vectorized<float> x) { return x.exp_u20(); }
inline Vectorized<double> fast_exp(Vectorized<double> x) { return x.exp(); }

// --- step 1: scores -----------------------------------------------------------------------

// Elements of E in one 64-byte cache line.
template <typename E>
constexpr int64_t line() { return 64 / static_cast<int64_t>(sizeof(E)); }

// R * NK dot products (8 or 12 independent accumulator chains: enough to keep both FMA
// pipes busy through their latency): R query rows x NK key rows over Dp (a multiple of the
// lanes). pf != 0: while reading a line of each key row, ask for the line pf elements further
// (the same line of a row some keys ahead): reads of interleaved rows are not a pattern the
// hardware prefetchers follow well.
template <int R, int NK, typename acc_t, typename E>
inline void dot_tile(const acc_t* const* qr, const E* const* kr, int64_t Dp, acc_t* out,
                     int64_t pf) {
  constexpr int64_t L = lanes<acc_t>();
  constexpr int N = R * NK;
  Vectorized<acc_t> acc[N];
  for (int i = 0; i < N; ++i) acc[i] = Vectorized<acc_t>(acc_t(0));
  for (int64_t d = 0; d < Dp; d += L) {
    if (pf && d % line<E>() == 0)
      for (int n = 0; n < NK; ++n) __builtin_prefetch(kr[n] + pf + d, 0, PF_LOCALITY);
    Vectorized<acc_t> kv[NK];
    for (int n = 0; n < NK; ++n) kv[n] = load<acc_t>(kr[n] + d);
    for (int i = 0; i < R; ++i) {
      const Vectorized<acc_t> qv = Vectorized<acc_t>::loadu(qr[i] + d);
      for (int n = 0; n < NK; ++n) acc[i * NK + n] = at::vec::fmadd(qv, kv[n], acc[i * NK + n]);
    }
  }
  sum_lanes<N>(acc, out);
}

// Scores of R rows (mt of them real, the rest stand-ins not stored) against all nb keys of a
// tile, NK keys at a time.
template <int R, int NK, typename acc_t, typename E>
inline void score_rows(const acc_t* q, int64_t Dp, int64_t m0, int64_t mt, const E* const* kr,
                       int64_t nb, acc_t scale, acc_t* s, int64_t pf) {
  acc_t out[R * NK];
  const acc_t* qr[R];
  for (int i = 0; i < R; ++i) qr[i] = q + (m0 + std::min<int64_t>(i, mt - 1)) * Dp;
  for (int64_t j0 = 0; j0 < nb; j0 += NK) {
    const E* kk[NK];
    for (int n = 0; n < NK; ++n) kk[n] = kr[std::min<int64_t>(j0 + n, nb - 1)];
    dot_tile<R, NK>(qr, kk, Dp, out, pf);
    for (int64_t i = 0; i < mt; ++i)
      for (int n = 0; n < NK && j0 + n < nb; ++n)
        s[(m0 + i) * NB + j0 + n] = out[i * NK + n] * scale;
  }
}

// s[m * NB + j] = scale * <q_m, k_j> for the M rows and the nb keys of a tile. kr[j] points at
// key j's row (the cache itself, or a widened copy). Rows in register tiles of 6 (12
// accumulators) or 4 (8); one row takes 8 keys at a time, two rows 4.
template <typename acc_t, typename E>
void score_tile(const acc_t* q, int64_t M, int64_t Dp, const E* const* kr, int64_t nb,
                acc_t scale, acc_t* s, int64_t pf = 0) {
  if (M == 1) return score_rows<1, 8>(q, Dp, 0, 1, kr, nb, scale, s, pf);
  if (M == 2) return score_rows<2, 4>(q, Dp, 0, 2, kr, nb, scale, s, pf);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t rem = M - m0, pf_rows = m0 == 0 ? pf : 0;  // later groups hit the cache
    if (rem >= 6 && rem != 8) {
      score_rows<6, 2>(q, Dp, m0, 6, kr, nb, scale, s, pf_rows);
      m0 += 6;
    } else {
      score_rows<4, 2>(q, Dp, m0, std::min<int64_t>(4, rem), kr, nb, scale, s, pf_rows);
      m0 += 4;
    }
  }
}

// --- step 4: weights times values ---------------------------------------------------------

// o[i, d0 : d0 + C*L] = o[i, ...] * alpha[i] + sum_{j < nb} p_i[j] v_j[d0 : ...], i < R.
template <int R, int C, typename acc_t, typename E>
inline void pv_block(const acc_t* const* p, const acc_t* alpha, const E* const* vr, int64_t nb,
                     acc_t* const* o, int64_t d0, int64_t pf) {
  constexpr int64_t L = lanes<acc_t>();
  Vectorized<acc_t> acc[R][C];
  for (int i = 0; i < R; ++i) {
    const Vectorized<acc_t> a(alpha[i]);
    for (int c = 0; c < C; ++c) acc[i][c] = Vectorized<acc_t>::loadu(o[i] + d0 + c * L) * a;
  }
  for (int64_t j = 0; j < nb; ++j) {
    if (pf)  // as in dot_tile: the same columns of a row some keys ahead
      for (int64_t c = 0; c < C * L; c += line<E>()) __builtin_prefetch(vr[j] + pf + d0 + c, 0, PF_LOCALITY);
    Vectorized<acc_t> x[C];
    for (int c = 0; c < C; ++c) x[c] = load<acc_t>(vr[j] + d0 + c * L);
    for (int i = 0; i < R; ++i) {
      const Vectorized<acc_t> pj(p[i][j]);
      for (int c = 0; c < C; ++c) acc[i][c] = at::vec::fmadd(pj, x[c], acc[i][c]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c].store(o[i] + d0 + c * L);
}

constexpr int64_t KB = 8;  // value rows per register pass: few rows, read front to back

// R rows over the whole (padded) value width Dvp: C = 8 / R vectors at a time (8 independent
// accumulator chains), the rest one vector at a time. Value rows in blocks of KB, each block
// swept across the width before the next (short interleaved streams the prefetchers follow);
// the rescale by alpha happens on the first block only.
template <int R, typename acc_t, typename E>
inline void pv_rows(const acc_t* const* p, const acc_t* alpha, const E* const* vr, int64_t nb,
                    acc_t* const* o, int64_t Dvp, int64_t pf = 0) {
  constexpr int C = R >= 3 ? 2 : 8 / R;
  constexpr int64_t L = lanes<acc_t>();
  acc_t ones[R];
  for (int i = 0; i < R; ++i) ones[i] = acc_t(1);
  const acc_t* pb[R];
  for (int64_t j0 = 0; j0 < nb; j0 += KB) {
    const int64_t n = std::min(KB, nb - j0);
    const acc_t* a = j0 == 0 ? alpha : ones;
    for (int i = 0; i < R; ++i) pb[i] = p[i] + j0;
    int64_t d0 = 0;
    for (; d0 + C * L <= Dvp; d0 += C * L) pv_block<R, C>(pb, a, vr + j0, n, o, d0, pf);
    for (; d0 < Dvp; d0 += L) pv_block<R, 1>(pb, a, vr + j0, n, o, d0, pf);
  }
}

// --- one work item: (b, kv head, key range) ------------------------------------------------

// What the fused pass knows beyond the tensors: per query row t its key interval, and the
// score functions it applies itself.
template <typename acc_t>
struct Rules {
  const int64_t* lo = nullptr;     // (T,) first visible key of query t
  const int64_t* hi = nullptr;     // (T,) one past the last
  acc_t softcap = 0;               // > 0: s = softcap * tanh(s / softcap)
  const acc_t* slopes = nullptr;   // (H,) ALiBi: s -= slope[h] * |t + alibi_offset - j|
  acc_t alibi_offset = 0;
};

template <typename scalar_t>
struct Problem {
  using acc_t = typename Acc<scalar_t>::type;
  int64_t B, Hkv, S, M, T, G, D, Dv, Dp, Dvp;
  const acc_t* q;                  // (B, Hkv, M, D) contiguous
  const scalar_t* k;               // rows of D, strides kb, kh, ks (elements)
  int64_t kb, kh, ks;
  const scalar_t* v;               // rows of Dv, strides vb, vh, vs
  int64_t vb, vh, vs;
  const acc_t* s_in = nullptr;     // decode_softmax_pv: the scores (B, Hkv, M, S)
  acc_t scale = 1;
  Rules<acc_t> rules;
  bool fused = false;
};

// Per-thread scratch, allocated once per call and thread.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, k, v, s, o, m, l, alpha;
  std::vector<int64_t> a, b;
  Scratch(int64_t M, int64_t Dp, int64_t Dvp)
      : q(M * Dp), k(NB * Dp), v(NB * Dvp), s(M * NB), o(M * Dvp), m(M), l(M), alpha(M),
        a(M), b(M) {}
};

// The running (max, sum, unnormalised output) of every row of one (b, kv head) over keys
// [j0, j1), left in sc.m, sc.l, sc.o.
template <typename scalar_t>
void run_item(const Problem<scalar_t>& P, int64_t bh, int64_t j0, int64_t j1,
              Scratch<typename Acc<scalar_t>::type>& sc) {
  using acc_t = typename Acc<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = lanes<acc_t>();
  const acc_t inf = std::numeric_limits<acc_t>::infinity(), ninf = -inf;
  const int64_t M = P.M, Dp = P.Dp, Dvp = P.Dvp, b = bh / P.Hkv, h = bh % P.Hkv;
  std::fill(sc.o.begin(), sc.o.end(), acc_t(0));
  std::fill(sc.m.begin(), sc.m.end(), ninf);
  std::fill(sc.l.begin(), sc.l.end(), acc_t(0));
  if (j0 >= j1) return;

  const scalar_t* kbase = P.k + b * P.kb + h * P.kh;
  const scalar_t* vbase = P.v + b * P.vb + h * P.vh;
  // K rows are read in place when no widening is needed, or when one register tile of rows
  // uses each row once (M <= 4: the widening happens in registers); otherwise a tile is
  // widened into L1 once for all row groups. The same for V.
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const bool k_direct = P.fused && P.D == Dp && (same || M <= 4);
  const bool v_direct = P.Dv == Dvp && (same || M <= 4);
  const acc_t* q = P.fused ? P.q + bh * M * P.D : nullptr;
  if (P.fused && P.D != Dp) {
    for (int64_t m = 0; m < M; ++m) widen_row(q + m * P.D, P.D, sc.q.data() + m * Dp, Dp);
    q = sc.q.data();
  }
  const acc_t* s_in = P.s_in ? P.s_in + bh * M * P.S : nullptr;
  const Rules<acc_t>& R = P.rules;

  for (int64_t t0 = j0; t0 < j1; t0 += NB) {
    const int64_t nb = std::min(NB, j1 - t0);
    acc_t* s = sc.s.data();
    // Each row's visible span [a, b) inside the tile (the whole tile without intervals).
    bool full = true;
    for (int64_t m = 0; m < M; ++m) {
      int64_t a = 0, e = nb;
      if (R.lo) {
        const int64_t t = m % P.T;
        a = std::clamp<int64_t>(R.lo[t] - t0, 0, nb);
        e = std::clamp<int64_t>(R.hi[t] - t0, a, nb);
      }
      sc.a[m] = a;
      sc.b[m] = e;
      full = full && a == 0 && e == nb;
    }

    // 1. Scores.
    if (P.fused) {
      if (k_direct) {
        const scalar_t* kr[NB];
        for (int64_t j = 0; j < nb; ++j) kr[j] = kbase + (t0 + j) * P.ks;
        score_tile<acc_t, scalar_t>(q, M, Dp, kr, nb, P.scale, s, PF * P.ks);
      } else {
        const acc_t* kr[NB];
        for (int64_t j = 0; j < nb; ++j) {
          prefetch_row(kbase + (t0 + j + PF) * P.ks, P.D);
          widen_row(kbase + (t0 + j) * P.ks, P.D, sc.k.data() + j * Dp, Dp);
          kr[j] = sc.k.data() + j * Dp;
        }
        score_tile<acc_t, acc_t>(q, M, Dp, kr, nb, P.scale, s);
      }
    } else {
      for (int64_t m = 0; m < M; ++m)
        std::copy(s_in + m * P.S + t0, s_in + m * P.S + t0 + nb, s + m * NB);
    }

    // 2-3. Score functions, spans, online softmax: p in s, alpha per row.
    for (int64_t m = 0; m < M; ++m) {
      acc_t* sr = s + m * NB;
      const int64_t t = m % P.T;
      if (R.softcap > 0) {
        const Vec cap(R.softcap);
        for (int64_t j = 0; j < NB; j += L) ((Vec::loadu(sr + j) / cap).tanh() * cap).store(sr + j);
      }
      if (R.slopes) {
        const Vec slope(R.slopes[h * P.G + m / P.T]);
        const Vec pos(acc_t(t) + R.alibi_offset);
        for (int64_t j = 0; j < NB; j += L) {
          const Vec key = Vec::arange(acc_t(t0 + j), acc_t(1));
          (Vec::loadu(sr + j) - slope * (pos - key).abs()).store(sr + j);
        }
      }
      for (int64_t j = 0; j < sc.a[m]; ++j) sr[j] = ninf;
      for (int64_t j = sc.b[m]; j < NB; ++j) sr[j] = ninf;
      Vec mx(ninf);
      for (int64_t j = 0; j < NB; j += L) mx = at::vec::maximum(mx, Vec::loadu(sr + j));
      const acc_t m_new = nan_max(sc.m[m], at::vec::vec_reduce_all<acc_t>(
          [](auto x, auto y) { return at::vec::maximum(x, y); }, mx));  // NaN-propagating
      if (!(m_new > ninf && m_new < inf)) {
        // -inf: nothing visible yet (no weights, nothing to rescale); NaN (a NaN score, now
        // or before) or +inf: the row is NaN, whatever the other keys add
        if (m_new != ninf) {
          sc.m[m] = std::numeric_limits<acc_t>::quiet_NaN();
          sc.l[m] = sc.m[m];
        }
        sc.alpha[m] = acc_t(1);
        sc.b[m] = sc.a[m];  // an empty span: no value rows for this row
        full = false;
        continue;
      }
      sc.alpha[m] = std::exp(sc.m[m] - m_new);  // exp(-inf) = 0 on the first tile
      sc.m[m] = m_new;
      const Vec ref(m_new);
      Vec total(acc_t(0));
      for (int64_t j = 0; j < NB; j += L) {
        const Vec p = fast_exp(Vec::loadu(sr + j) - ref);  // arguments <= 0 or -inf
        p.store(sr + j);
        total = total + p;
      }
      sc.l[m] = sc.l[m] * sc.alpha[m] +
                at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, total);
    }

    // 4. Values: in register tiles of rows when every row sees the whole tile, else row by
    //    row over each one's own span (a hidden NaN value never meets a zero weight).
    const acc_t* vrow[NB];
    const scalar_t* vraw[NB];
    for (int64_t j = 0; j < nb; ++j) vraw[j] = vbase + (t0 + j) * P.vs;
    if (!v_direct) {
      for (int64_t j = 0; j < nb; ++j) {
        prefetch_row(vraw[j] + PF * P.vs, P.Dv);
        widen_row(vraw[j], P.Dv, sc.v.data() + j * Dvp, Dvp);
        vrow[j] = sc.v.data() + j * Dvp;
      }
    }
    auto rows = [&](auto r_tag, int64_t m0, int64_t j_lo, int64_t j_hi) {
      constexpr int Rn = decltype(r_tag)::value;
      const acc_t* p[Rn];
      acc_t* o[Rn];
      for (int i = 0; i < Rn; ++i) {
        p[i] = s + (m0 + i) * NB + j_lo;
        o[i] = sc.o.data() + (m0 + i) * Dvp;
      }
      const int64_t n = j_hi - j_lo;
      if (v_direct) {
        pv_rows<Rn, acc_t, scalar_t>(p, sc.alpha.data() + m0, vraw + j_lo, n, o, Dvp,
                                     m0 == 0 && Rn > 1 ? PF * P.vs : 0);
      } else {
        pv_rows<Rn, acc_t, acc_t>(p, sc.alpha.data() + m0, vrow + j_lo, n, o, Dvp);
      }
    };
    if (full) {  // register tiles of 6 rows (12 accumulators) or 4, as for the scores
      int64_t m0 = 0;
      while (M - m0 >= 4) {
        if (M - m0 >= 6 && M - m0 != 8) {
          rows(std::integral_constant<int, 6>{}, m0, 0, nb);
          m0 += 6;
        } else {
          rows(std::integral_constant<int, 4>{}, m0, 0, nb);
          m0 += 4;
        }
      }
      switch (M - m0) {
        case 3: rows(std::integral_constant<int, 3>{}, m0, 0, nb); break;
        case 2: rows(std::integral_constant<int, 2>{}, m0, 0, nb); break;
        case 1: rows(std::integral_constant<int, 1>{}, m0, 0, nb); break;
        default: break;
      }
    } else {
      for (int64_t m = 0; m < M; ++m) {
        if (sc.b[m] > sc.a[m]) {
          rows(std::integral_constant<int, 1>{}, m, sc.a[m], sc.b[m]);
        } else if (sc.alpha[m] != acc_t(1)) {  // nothing to add, but the max moved
          const Vec a(sc.alpha[m]);
          acc_t* o = sc.o.data() + m * Dvp;
          for (int64_t d = 0; d < Dvp; d += L) (Vec::loadu(o + d) * a).store(o + d);
        }
      }
    }
  }
}

// --- the driver: split-KV over threads, merge, normalise -----------------------------------

// Key splits per (b, kv head): ~16 work items per thread (dynamic balance: a thread that
// another process deschedules holds back one small item), at least 256 keys each.
int64_t num_splits(int64_t BH, int64_t span) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return 1;
  const int64_t want = (16 * threads + BH - 1) / BH;
  return std::max<int64_t>(1, std::min(want, span / 256));
}

// sinks: (H,) logits or null. Writes out (B, Hkv, M, Dv) and lse (B, Hkv, M).
template <typename scalar_t>
void run(const Problem<scalar_t>& P, int64_t k_lo, int64_t k_hi,
         const typename Acc<scalar_t>::type* sinks, typename Acc<scalar_t>::type* out,
         typename Acc<scalar_t>::type* lse) {
  using acc_t = typename Acc<scalar_t>::type;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t BH = P.B * P.Hkv, M = P.M, Dv = P.Dv, Dvp = P.Dvp;
  const int64_t span = std::max<int64_t>(0, k_hi - k_lo);
  const int64_t splits = num_splits(BH, span), per = (span + splits - 1) / splits;
  const int64_t items = BH * splits;
  // Per item: running max and sum per row, and the unnormalised output rows.
  std::vector<acc_t> pm(items * M), pl(items * M), po(items * M * Dvp);
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    Scratch<acc_t> sc(M, P.Dp, Dvp);
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      const int64_t bh = item / splits, part = item % splits;
      const int64_t j0 = k_lo + part * per, j1 = std::min(k_hi, j0 + per);
      run_item(P, bh, j0, std::max(j0, j1), sc);
      std::copy(sc.m.begin(), sc.m.end(), pm.begin() + item * M);
      std::copy(sc.l.begin(), sc.l.end(), pl.begin() + item * M);
      std::copy(sc.o.begin(), sc.o.end(), po.begin() + item * M * Dvp);
    }
  });
  // Merge the splits by log-sum-exp against the rows' overall max, add the sink, normalise.
  at::parallel_for(0, BH * M, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bh = r / M, m = r % M, h = (bh % P.Hkv) * P.G + m / P.T;
      acc_t mx = ninf;
      for (int64_t part = 0; part < splits; ++part) mx = nan_max(mx, pm[(bh * splits + part) * M + m]);
      const acc_t sink = sinks ? sinks[h] : ninf;
      const acc_t ref = nan_max(mx, sink);
      acc_t* o = out + r * Dv;
      if (ref == ninf) {  // no visible key and no sink
        std::fill(o, o + Dv, acc_t(0));
        lse[r] = ninf;
        continue;
      }
      std::fill(o, o + Dv, acc_t(0));
      acc_t total = sinks ? std::exp(sink - ref) : acc_t(0);
      for (int64_t part = 0; part < splits; ++part) {
        const int64_t it = (bh * splits + part) * M + m;
        if (pm[it] == ninf) continue;  // this split saw no key of the row
        const acc_t w = std::exp(pm[it] - ref);
        total += pl[it] * w;
        const acc_t* po_r = po.data() + it * Dvp;
        for (int64_t d = 0; d < Dv; ++d) o[d] += po_r[d] * w;
      }
      const acc_t inv = acc_t(1) / total;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
      lse[r] = ref + std::log(total);
    }
  });
}

void check_cache(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (B, Hkv, S, D), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name,
              " must have a contiguous last (head) dim, got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

template <typename scalar_t>
Problem<scalar_t> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          int64_t T) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int64_t L = lanes<acc_t>();
  Problem<scalar_t> P;
  P.B = k.size(0); P.Hkv = k.size(1); P.S = k.size(2); P.D = k.size(3); P.Dv = v.size(3);
  P.M = q.size(2); P.T = T; P.G = P.M / T;
  P.Dp = round_up(std::max<int64_t>(P.D, 1), L);
  P.Dvp = round_up(std::max<int64_t>(P.Dv, 1), L);
  P.q = q.data_ptr<acc_t>();
  P.k = k.data_ptr<scalar_t>(); P.kb = k.stride(0); P.kh = k.stride(1); P.ks = k.stride(2);
  P.v = v.data_ptr<scalar_t>(); P.vb = v.stride(0); P.vh = v.stride(1); P.vs = v.stride(2);
  return P;
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// q (B, Hkv, M, D) contiguous in the accumulation dtype (float, or double for double caches);
// k (B, Hkv, S, D), v (B, Hkv, S, Dv) in the cache dtype, any strides with a contiguous last
// dim; lo, hi: T ints, the key interval [lo_t, hi_t) of query t (M = G*T); softcap > 0 to
// apply it; slopes: empty or (H,) ALiBi slopes (acc dtype) with query t at position
// t + alibi_offset; sinks: empty or (H,) logits (acc dtype).
// Returns (out (B, Hkv, M, Dv), lse (B, Hkv, M)) in the accumulation dtype.
std::vector<at::Tensor> decode_fused(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, std::vector<int64_t> lo,
                                     std::vector<int64_t> hi, double scale, double softcap,
                                     const at::Tensor& slopes, double alibi_offset,
                                     const at::Tensor& sinks) {
  check_cache(k, "k");
  check_cache(v, "v");
  const int64_t T = static_cast<int64_t>(lo.size());
  TORCH_CHECK(T > 0 && static_cast<int64_t>(hi.size()) == T, "lo and hi must hold T > 0 ints");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.size(2) % T == 0,
              "q must be contiguous (B, Hkv, G*T, D)");
  TORCH_CHECK(q.scalar_type() == acc_type(k.scalar_type()), "q must be in the accumulation dtype");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must share a dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) &&
              v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "q, k and v do not match");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), M = q.size(2);
  const int64_t H = Hkv * (M / T);
  auto out = at::empty({B, Hkv, M, v.size(3)}, q.options());
  auto lse = at::empty({B, Hkv, M}, q.options());
  for (int64_t t = 0; t < T; ++t) {
    lo[t] = std::clamp<int64_t>(lo[t], 0, S);
    hi[t] = std::clamp<int64_t>(hi[t], lo[t], S);
  }
  int64_t k_lo = S, k_hi = 0;  // the union of the rows' intervals: nothing outside is read
  for (int64_t t = 0; t < T; ++t)
    if (hi[t] > lo[t]) { k_lo = std::min(k_lo, lo[t]); k_hi = std::max(k_hi, hi[t]); }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "decode_fused", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    auto P = problem<scalar_t>(q, k, v, T);
    P.fused = true;
    P.scale = static_cast<acc_t>(scale);
    P.rules.lo = lo.data();
    P.rules.hi = hi.data();
    P.rules.softcap = static_cast<acc_t>(softcap);
    if (slopes.defined() && slopes.numel()) {
      TORCH_CHECK(slopes.numel() == H && slopes.is_contiguous() &&
                  slopes.scalar_type() == q.scalar_type(), "slopes must be (H,) in q's dtype");
      P.rules.slopes = slopes.data_ptr<acc_t>();
      P.rules.alibi_offset = static_cast<acc_t>(alibi_offset);
    }
    const acc_t* sk = nullptr;
    if (sinks.defined() && sinks.numel()) {
      TORCH_CHECK(sinks.numel() == H && sinks.is_contiguous() &&
                  sinks.scalar_type() == q.scalar_type(), "sinks must be (H,) in q's dtype");
      sk = sinks.data_ptr<acc_t>();
    }
    run(P, k_lo, std::max(k_lo, k_hi), sk, out.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

// q (B, Hkv, M, D) contiguous acc dtype; k (B, Hkv, S, D) any strides, contiguous last dim.
// Returns s = scale * q k^T, (B, Hkv, M, S) in the acc dtype.
at::Tensor decode_scores(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_cache(k, "k");
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "q must be contiguous (B, Hkv, M, D)");
  TORCH_CHECK(q.scalar_type() == acc_type(k.scalar_type()), "q must be in the accumulation dtype");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), M = q.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == Hkv && q.size(3) == D, "q and k do not match");
  auto s = at::empty({B, Hkv, M, S}, q.options());
  if (S == 0 || M == 0) return s;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "decode_scores", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    constexpr int64_t L = lanes<acc_t>();
    const int64_t Dp = round_up(std::max<int64_t>(D, 1), L), BH = B * Hkv;
    const int64_t splits = num_splits(BH, S), per = (S + splits - 1) / splits;
    const acc_t* qp = q.data_ptr<acc_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    acc_t* sp = s.data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    std::atomic<int64_t> next{0};
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), BH * splits);
    at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
      std::vector<acc_t> qbuf(M * Dp), kbuf(NB * Dp), tile(M * NB);
      for (int64_t item; (item = next.fetch_add(1)) < BH * splits;) {
        const int64_t bh = item / splits, b = bh / Hkv, h = bh % Hkv;
        const int64_t j0 = (item % splits) * per, j1 = std::min(S, j0 + per);
        for (int64_t m = 0; m < M; ++m)
          widen_row(qp + (bh * M + m) * D, D, qbuf.data() + m * Dp, Dp);
        const scalar_t* kbase = kp + b * k.stride(0) + h * k.stride(1);
        for (int64_t t0 = j0; t0 < j1; t0 += NB) {
          const int64_t nb = std::min(NB, j1 - t0);
          const acc_t* kr[NB];
          for (int64_t j = 0; j < nb; ++j) {
            widen_row(kbase + (t0 + j) * k.stride(2), D, kbuf.data() + j * Dp, Dp);
            kr[j] = kbuf.data() + j * Dp;
          }
          score_tile<acc_t, acc_t>(qbuf.data(), M, Dp, kr, nb, sc, tile.data());
          for (int64_t m = 0; m < M; ++m)
            std::copy(tile.data() + m * NB, tile.data() + m * NB + nb, sp + (bh * M + m) * S + t0);
        }
      }
    });
  });
  return s;
}

// s (B, Hkv, M, S) contiguous acc dtype, hidden entries -inf; v (B, Hkv, S, Dv) any strides
// with a contiguous last dim; T: queries per row group (m % T is the query, m / T the head
// within the group); sinks: empty or (H,) acc dtype.
// Returns (out (B, Hkv, M, Dv), lse (B, Hkv, M)) in the acc dtype.
std::vector<at::Tensor> decode_softmax_pv(const at::Tensor& s, const at::Tensor& v, int64_t T,
                                          const at::Tensor& sinks) {
  check_cache(v, "v");
  TORCH_CHECK(s.dim() == 4 && s.is_contiguous(), "s must be contiguous (B, Hkv, M, S)");
  TORCH_CHECK(s.scalar_type() == acc_type(v.scalar_type()), "s must be in the accumulation dtype");
  const int64_t B = v.size(0), Hkv = v.size(1), S = v.size(2), M = s.size(2);
  TORCH_CHECK(s.size(0) == B && s.size(1) == Hkv && s.size(3) == S, "s and v do not match");
  TORCH_CHECK(T > 0 && M % T == 0, "T must divide the rows of s");
  auto out = at::empty({B, Hkv, M, v.size(3)}, s.options());
  auto lse = at::empty({B, Hkv, M}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "decode_pv", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    // q/k are not read: a problem whose "k" is v, with D = Dv
    auto P = problem<scalar_t>(s, v, v, T);
    P.s_in = s.data_ptr<acc_t>();
    P.q = nullptr;
    const acc_t* sk = nullptr;
    if (sinks.defined() && sinks.numel()) {
      TORCH_CHECK(sinks.numel() == Hkv * (M / T) && sinks.is_contiguous() &&
                  sinks.scalar_type() == s.scalar_type(), "sinks must be (H,) in s's dtype");
      sk = sinks.data_ptr<acc_t>();
    }
    run(P, 0, S, sk, out.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

// Which target this build is for (the loader checks it against the name it loaded).
std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_fused", &decode_fused, "one pass over K and V with per-row key intervals");
  m.def("decode_scores", &decode_scores, "scale * q k^T per kv head, (B, Hkv, M, S)");
  m.def("decode_softmax_pv", &decode_softmax_pv, "softmax over s and weights @ v: (out, lse)");
  m.def("capability", &capability, "the CPU target this build was compiled for");
  m.def("lanes", [] { return lanes<float>(); }, "float lanes of one vector register");
}
