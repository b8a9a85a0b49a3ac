// attnkit attention kernel: the forward pass (out, lse) over the plan, one call per attention.
//
// Work item = (batch b, kv head, a chunk of its G query heads, query tile i). For every key
// tile j the item can see, the K and V tile is read (converted to fp32 once when the input is
// bfloat16/half) and shared by the chunk's query heads while it is in cache. Scores are built
// transposed, St = K_j . (scale Q_i)^T (keys x query rows), because then
//   * Q is transposed once per item, never K per tile (the GEMM's B operand must have its
//     columns contiguous), and K's rows are read in place;
//   * the online softmax runs down the columns: the max, exp and sums of 64 query rows are
//     plain vector operations, with no horizontal reduction;
//   * P . V reads P through strides (its transpose is free in the micro-kernel).
// The running max m, sum l and output accumulator O (fp32) live in per-thread scratch; O is
// rescaled inside the P . V GEMM's load of the accumulator (init = 2).

#include "_attn_plan.h"

namespace attnkit_kernel {

// Scores (in St, keys x BQ) -> probabilities relative to the new running max; updates m, l
// and writes each row's rescale factor to alpha. Masked entries become -inf, then 0.
template <typename T>
static void softmax_columns(T* St, int64_t nk, const Tile& tile, const HeadScores<T>& hs,
                            const Rows<T>& rw, int ni, const uint64_t* word, int64_t q0,
                            int64_t k0, const Args& a, T* m, T* l, T* alpha) {
  constexpr int W = VT<T>::W;
  constexpr int NV = BQ / W;
  // No NaN bookkeeping: a NaN score stays in St, so exp(NaN - m) makes the row's sum, lse
  // and output NaN in the second pass, whatever the max made of it.
  vec<T> mx[NV];
  for (int c = 0; c < NV; ++c) mx[c] = neg_inf<T>();
  const bool plain = hs.nops == 0 && tile.kind == FULL;
  for (int64_t kk = 0; kk < nk; ++kk) {
    T* row = St + kk * BQ;
    for (int c = 0; c < NV; ++c) {
      vec<T> s = vload(row + c * W);
      if (!plain) {
        s = apply_scores<T, true>(s, hs, rw, c * W, kk, q0, k0, a.T, a.S, nullptr);
        if (tile.kind == PARTIAL)
          s = visible<T, true>(rw, ni, c * W, kk, k0, word) ? s : neg_inf<T>();
        vstore(row + c * W, s);
      }
      mx[c] = vmax(mx[c], s);
    }
  }
  vec<T> ms[NV], sum[NV];
  const vec<T> ninf = neg_inf<T>();
  for (int c = 0; c < NV; ++c) {
    const vec<T> mo = vload(m + c * W);
    const vec<T> mn = vmax(mx[c], mo);
    ms[c] = mn == ninf ? vec<T>{} : mn;  // nothing visible yet: shift by 0, exp(-inf) = 0
    const vec<T> al = vexp(mo - ms[c]);
    vstore(alpha + c * W, mo == ninf ? vec<T>{} : al);
    vstore(m + c * W, mn);
    sum[c] = vec<T>{};
  }
  for (int64_t kk = 0; kk < nk; ++kk) {
    T* row = St + kk * BQ;
    for (int c = 0; c < NV; ++c) {
      const vec<T> p = vexp(vload(row + c * W) - ms[c]);
      vstore(row + c * W, p);
      sum[c] += p;
    }
  }
  for (int c = 0; c < NV; ++c) vstore(l + c * W, vload(l + c * W) * vload(alpha + c * W) + sum[c]);
}

template <typename S>
void forward_impl(const Args& a) {
  using T = acc_of<S>;
  const int64_t D = a.D, Dv = a.Dv, Dp = padded(D), Dvp = padded(Dv);
  constexpr bool same = std::is_same<S, T>::value;
  // A row block is (one query head of the group, one query tile). An item holds up to nb of
  // them, ~256 KB of Q^T and O: a chunk of the group's heads times up to 4 consecutive query
  // tiles, all reading each K/V tile once (at long T that is most of the memory traffic).
  // The grouping never changes a result: every row is computed the same way in any item.
  const int64_t nb = std::clamp<int64_t>((256 << 10) / (BQ * (D + Dvp) * int64_t(sizeof(T))), 1, 64);
  const int64_t gc = std::min(a.G, nb);
  int64_t R = std::max<int64_t>(1, std::min<int64_t>(4, nb / gc));
  const int64_t chunks = (a.G + gc - 1) / gc;
  while (R > 1 && a.B * a.Hkv * chunks * ((a.nQ + R - 1) / R) < 4 * at::get_num_threads()) R /= 2;
  const S* q = static_cast<const S*>(a.q);
  const S* k = static_cast<const S*>(a.k);
  const S* v = static_cast<const S*>(a.v);
  S* out = static_cast<S*>(a.out);
  T* lse = static_cast<T*>(a.lse);
  const T* sinks = static_cast<const T*>(a.sinks);

  std::vector<Item> items;
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t hkv = 0; hkv < a.Hkv; ++hkv)
      for (int64_t i0 = (a.nQ - 1) / R * R; i0 >= 0; i0 -= R) {  // causal: largest first
        int64_t n = 0;
        for (int64_t i = i0; i < std::min(a.nQ, i0 + R); ++i) {
          int64_t j0, j1;
          key_range(a, b, hkv, i, j0, j1);
          for (int64_t j = j0; j < j1; ++j) n += classify(a, b, hkv, i, j).kind != SKIP;
        }
        for (int64_t g0 = 0; g0 < a.G; g0 += gc) {
          const int64_t g1 = std::min(a.G, g0 + gc);
          // Items with nothing visible still write their zero rows.
          items.push_back({b, hkv, g0, g1, i0, 0, 1 + n * (g1 - g0)});
        }
      }

  const int64_t blocks = gc * R;
  const size_t need = size_t(blocks * (D * BQ + BQ * Dvp + 2 * BQ) + BQ + BK * BQ + BK * Dp +
                             BK * Dvp + std::max(Dp, Dvp) + Dvp + 64 * 16);
  struct Scratch {
    Arena<T> ar;
    std::vector<Rows<T>> rows;
    std::vector<HeadScores<T>> hs;
  };
  auto make_scratch = [&]() {
    return Scratch{Arena<T>(need), std::vector<Rows<T>>(blocks), std::vector<HeadScores<T>>(gc)};
  };
  auto work = [&](const Item& it, Scratch& sc) {
    Arena<T>& ar = sc.ar;
    ar.used = 0;
    const int64_t b = it.b, hkv = it.hkv, ng = it.g1 - it.g0, i0 = it.tile;
    const int64_t nr = std::min(R, a.nQ - i0);
    T* Qt = ar.take(blocks * D * BQ);
    T* O = ar.take(blocks * BQ * Dvp);
    T* m = ar.take(blocks * BQ);
    T* l = ar.take(blocks * BQ);
    T* alpha = ar.take(BQ);
    T* St = ar.take(BK * BQ);
    T* Kb = ar.take(BK * Dp);
    T* Vb = ar.take(BK * Dvp);
    T* row_buf = ar.take(std::max(Dp, Dvp));
    T* orow = ar.take(Dvp);
    uint64_t word[64];
    bool first[64];
    Tile tiles[8];
    int64_t jlo = a.nK, jhi = 0;
    for (int64_t r = 0; r < nr; ++r) {
      int64_t j0, j1;
      key_range(a, b, hkv, i0 + r, j0, j1);
      if (j0 < j1) {
        jlo = std::min(jlo, j0);
        jhi = std::max(jhi, j1);
      }
    }
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t h = hkv * a.G + it.g0 + g;
      sc.hs[g] = head_scores<T>(a, b, h);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t x = g * nr + r, q0 = (i0 + r) * BQ, nq = std::min(BQ, a.T - q0);
        pack_b_cols(q + b * a.qs[0] + h * a.qs[1] + q0 * a.qs[2], a.qs[2], nq, D,
                    Qt + x * D * BQ, BQ, row_buf, T(a.scale));
        std::fill(m + x * BQ, m + (x + 1) * BQ, -std::numeric_limits<T>::infinity());
        std::fill(l + x * BQ, l + (x + 1) * BQ, T(0));
        fill_rows(a, sc.rows[x], b, h, q0, nq);
        first[x] = true;
      }
    }
    for (int64_t j = jlo; j < jhi; ++j) {
      bool any = false;
      for (int64_t r = 0; r < nr; ++r) {
        tiles[r] = classify(a, b, hkv, i0 + r, j);
        any = any || tiles[r].kind != SKIP;
      }
      if (!any) continue;
      const int64_t k0 = j * BK, nk = std::min(BK, a.S - k0);
      const S* kp = k + b * a.ks[0] + hkv * a.ks[1] + k0 * a.ks[2];
      const S* vp = v + b * a.vs[0] + hkv * a.vs[1] + k0 * a.vs[2];
      const T* Ka;
      int64_t ldk;
      if constexpr (same) {
        Ka = kp;
        ldk = a.ks[2];
      } else {
        pack_rows(kp, a.ks[2], nk, D, Kb, D, 0);
        Ka = Kb;
        ldk = D;
      }
      pack_b_rows(vp, a.vs[2], nk, Dv, Vb, row_buf);
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t h = hkv * a.G + it.g0 + g;
        for (int64_t r = 0; r < nr; ++r) {
          const Tile tile = tiles[r];
          if (tile.kind == SKIP) continue;
          const int64_t x = g * nr + r, q0 = (i0 + r) * BQ, nq = std::min(BQ, a.T - q0);
          const uint64_t* wp = nullptr;
          if (tile.slot >= 0) {
            transpose_bits(tile_bits(a, tile.slot, a.bitss[1] ? b : 0, a.bitss[2] ? h : 0), word);
            wp = word;
          }
          gemm<T>(nk, BQ, D, Ka, ldk, 1, Qt + x * D * BQ, St, BQ, 0);
          softmax_columns<T>(St, nk, tile, sc.hs[g], sc.rows[x], a.ni, wp, q0, k0, a,
                             m + x * BQ, l + x * BQ, alpha);
          gemm<T>(nq, Dvp, nk, St, 1, BQ, Vb, O + x * BQ * Dvp, Dvp, first[x] ? 0 : 2, alpha);
          first[x] = false;
        }
      }
    }
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t h = hkv * a.G + it.g0 + g;
      for (int64_t rb = 0; rb < nr; ++rb) {
        const int64_t x = g * nr + rb, q0 = (i0 + rb) * BQ, nq = std::min(BQ, a.T - q0);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t row = (b * a.H + h) * a.T + q0 + r;
          S* o = out + row * Dv;
          const T lr = l[x * BQ + r], mr = m[x * BQ + r];
          if (lr == T(0)) {  // sees no key: zeros, lse -inf (or the sink's logit)
            std::fill(o, o + Dv, S(0));
            lse[row] = sinks ? sinks[h] : ninf;
            if (a.single) a.single[row] = 0;
            continue;
          }
          T total = mr + std::log(lr), factor = T(1) / lr;
          if (sinks) {  // the sink is one more logit in the denominator
            const T sk = sinks[h], hi = std::max(total, sk);
            const T all = hi + std::log1p(std::exp(-std::fabs(total - sk)));
            factor = std::exp(total - all) / lr;
            total = (total != total || sk != sk) ? total + sk : all;
          }
          const T* acc = O + (x * BQ + r) * Dvp;
          for (int64_t d = 0; d < Dv; ++d) orow[d] = acc[d] * factor;
          from_acc(orow, o, Dv);
          lse[row] = total;
          if (a.single) a.single[row] = (!sinks && lr == T(1)) ? 1 : 0;
        }
      }
    }
  };
  run_items(items, make_scratch, work);
}

template void forward_impl<float>(const Args&);
template void forward_impl<double>(const Args&);
template void forward_impl<c10::BFloat16>(const Args&);
template void forward_impl<c10::Half>(const Args&);

}  // namespace attnkit_kernel
