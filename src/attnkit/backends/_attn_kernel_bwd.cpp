// attnkit attention kernel: the backward pass, FlashAttention-2 style. Probabilities are
// recomputed from the saved log-sum-exp, P = exp(S - lse), and dS = P * (dP - delta) with
// delta = rowsum(dO * O) (minus the lse's own gradient), computed by the caller.
//
// Deterministic without atomics: two kinds of work item in one queue, each the only writer of
// what it produces.
//   key items (b, kv head, key tile j): dK_j and dV_j over every query tile and query head
//     that sees j. S and dP are built row-major (query rows x keys) from K_j^T and V_j^T,
//     transposed once per item; dV += P^T dO and dK += dS^T (scale Q) read P and dS through
//     strides.
//   query items (b, kv head, head chunk, query tile i): dQ_i over every key tile i sees,
//     built transposed like the forward (St = K_j (scale Q)^T, dPt = V_j dO^T) so K and V
//     rows are read in place; dQ += dS K_j. The bias gradient is written here.
// That is 7 GEMMs per tile instead of the minimal 5, the price of determinism with any
// number of threads; accumulators are fp32 (fp64 for double) and added into the caller's
// dq/dk/dv, so ring attention can accumulate blocks into one buffer.

#include "_attn_plan.h"

namespace attnkit_kernel {

// Backward rows of one (b, h, query tile): the lse (0 where -inf), delta and keep.
template <typename T>
static void fill_grad_rows(const Args& a, Rows<T>& rw, int64_t b, int64_t h, int64_t q0,
                           int64_t nq) {
  const T* lse = static_cast<const T*>(a.lse_in);
  const T* delta = static_cast<const T*>(a.delta);
  for (int64_t r = 0; r < BQ; ++r) {
    const int64_t row = (b * a.H + h) * a.T + q0 + r;
    const T l = r < nq ? lse[row] : T(0);
    rw.lse[r] = (l == -std::numeric_limits<T>::infinity()) ? T(0) : l;
    rw.delta[r] = r < nq ? delta[row] : T(0);
    rw.keep[r] = (r < nq && a.single_in && a.single_in[row]) ? T(0) : T(1);
  }
}

// P and dS of one tile, in place: s (scores, scaled) -> P, dp -> dS at the raw scores.
// COLS: the tile is keys x BQ (lanes along query rows); ROWS: BQ x keys. With a bias that
// needs a gradient, dS at the bias is added into a.dbias (COLS only).
template <typename T, bool COLS>
static void grad_tile(T* s_buf, T* dp_buf, int64_t n_outer, const Tile& tile,
                      const HeadScores<T>& hs, const Rows<T>& rw, int ni, const uint64_t* word,
                      int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0, const Args& a) {
  constexpr int W = VT<T>::W;
  const int64_t ld = COLS ? BQ : BK, inner = COLS ? BQ : BK;
  const bool has_cap = a.cap > 0;
  T* db = nullptr;
  int64_t dbq = 0, dbk = 0;
  if (COLS && a.dbias) {
    db = static_cast<T*>(a.dbias) + (a.Bb == 1 ? 0 : b) * a.dbs[0] +
         (a.Hb == 1 ? 0 : h) * a.dbs[1];
    dbq = a.dbs[2];
    dbk = a.dbs[3];
  }
  for (int64_t o = 0; o < n_outer; ++o) {
    for (int64_t c = 0; c < inner; c += W) {
      const int64_t r = COLS ? c : o, kk = COLS ? o : c;
      vec<T> s = vload(s_buf + o * ld + c), capped{};
      if (hs.nops) s = apply_scores<T, COLS>(s, hs, rw, r, kk, q0, k0, a.T, a.S, &capped);
      if (tile.kind == PARTIAL) s = visible<T, COLS>(rw, ni, r, kk, k0, word) ? s : neg_inf<T>();
      const vec<T> lse = COLS ? vload(rw.lse + r) : splat(rw.lse[r]);
      const vec<T> delta = COLS ? vload(rw.delta + r) : splat(rw.delta[r]);
      const vec<T> keep = COLS ? vload(rw.keep + r) : splat(rw.keep[r]);
      const vec<T> p = vexp(s - lse);
      const vec<T> ds = p * (vload(dp_buf + o * ld + c) * keep - delta);
      vec<T> ds_raw = ds;
      if (has_cap) {
        const vec<T> t = capped * hs.inv_cap;
        ds_raw = ds * (T(1) - t * t);
      }
      vstore(s_buf + o * ld + c, p);
      vstore(dp_buf + o * ld + c, ds_raw);
      if (db) {
        const vec<T> at_bias = a.cap_after_bias ? ds_raw : ds;
        for (int l = 0; l < W && r + l < nq; ++l)
          db[(q0 + r + l) * dbq + (k0 + kk) * dbk] += at_bias[l];
      }
    }
  }
}

template <typename S>
void backward_impl(const Args& a) {
  using T = acc_of<S>;
  const int64_t D = a.D, Dv = a.Dv, Dp = padded(D), Dvp = padded(Dv);
  constexpr bool same = std::is_same<S, T>::value;
  const S* q = static_cast<const S*>(a.q);
  const S* k = static_cast<const S*>(a.k);
  const S* v = static_cast<const S*>(a.v);
  const S* dout = static_cast<const S*>(a.dout);
  T* dq = static_cast<T*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  const int64_t per_head = BQ * (D + Dv + Dp) * int64_t(sizeof(T));
  const int64_t gc = std::max<int64_t>(1, std::min<int64_t>(a.G, (256 << 10) / per_head));
  // A bias gradient shared by several (b, h) is summed inside one item: query items then
  // cover every batch and head of their tile, in a fixed order.
  const bool serial = a.dbias && ((a.Bb == 1 && a.B > 1) || (a.Hb == 1 && a.H > 1));

  std::vector<Item> items;
  std::vector<int64_t> per_key(a.nK);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t hkv = 0; hkv < a.Hkv; ++hkv) {
      std::fill(per_key.begin(), per_key.end(), 0);
      for (int64_t i = a.nQ - 1; i >= 0; --i) {
        int64_t j0, j1, n = 0;
        key_range(a, b, hkv, i, j0, j1);
        for (int64_t j = j0; j < j1; ++j)
          if (classify(a, b, hkv, i, j).kind != SKIP) {
            ++n;
            ++per_key[j];
          }
        if (!serial)
          for (int64_t g0 = 0; g0 < a.G; g0 += gc)
            items.push_back({b, hkv, g0, std::min(a.G, g0 + gc), i, 1,
                             3 * n * (std::min(a.G, g0 + gc) - g0)});
      }
      for (int64_t j = 0; j < a.nK; ++j) items.push_back({b, hkv, 0, a.G, j, 0, 4 * per_key[j] * a.G});
    }
  if (serial)
    for (int64_t i = 0; i < a.nQ; ++i) items.push_back({-1, -1, 0, a.G, i, 1, 1 + a.nK * a.H});

  const size_t need = size_t(std::max(
      D * BK + Dv * BK + BK * Dp + BK * Dvp + 2 * BQ * BK + 2 * BQ * Dp + 2 * BQ * Dvp,
      gc * (D * BQ + Dv * BQ + BQ * Dp) + 2 * BK * BQ + 2 * BK * Dp + BK * Dv) +
      std::max(Dp, Dvp) + 64 * 16);
  struct Scratch {
    Arena<T> ar;
    std::vector<Rows<T>> rows;
  };
  auto make_scratch = [&]() { return Scratch{Arena<T>(need), std::vector<Rows<T>>(gc)}; };

  // dK_j, dV_j of (b, hkv, key tile j).
  auto key_item = [&](int64_t b, int64_t hkv, int64_t j, Scratch& sc) {
    Arena<T>& ar = sc.ar;
    const int64_t k0 = j * BK, nk = std::min(BK, a.S - k0);
    T* Kt = ar.take(D * BK);
    T* Vt = ar.take(Dv * BK);
    T* dKj = ar.take(BK * Dp);
    T* dVj = ar.take(BK * Dvp);
    T* Sb = ar.take(BQ * BK);
    T* dPb = ar.take(BQ * BK);
    T* Qb = ar.take(BQ * Dp);
    T* Qp = ar.take(BQ * Dp);
    T* dOb = ar.take(BQ * Dvp);
    T* dOp = ar.take(BQ * Dvp);
    T* row_buf = ar.take(std::max(Dp, Dvp));
    Rows<T>& rw = sc.rows[0];
    pack_b_cols(k + b * a.ks[0] + hkv * a.ks[1] + k0 * a.ks[2], a.ks[2], nk, D, Kt, BK, row_buf);
    pack_b_cols(v + b * a.vs[0] + hkv * a.vs[1] + k0 * a.vs[2], a.vs[2], nk, Dv, Vt, BK, row_buf);
    std::fill(dKj, dKj + BK * Dp, T(0));
    std::fill(dVj, dVj + BK * Dvp, T(0));
    for (int64_t i = 0; i < a.nQ; ++i) {
      const Tile tile = classify(a, b, hkv, i, j);
      if (tile.kind == SKIP) continue;
      const int64_t q0 = i * BQ, nq = std::min(BQ, a.T - q0);
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t h = hkv * a.G + g;
        const S* qp = q + b * a.qs[0] + h * a.qs[1] + q0 * a.qs[2];
        pack_rows(qp, a.qs[2], nq, D, Qb, Dp, 0, T(a.scale));  // A of S = (scale Q) K^T
        pack_b_rows(qp, a.qs[2], nq, D, Qp, row_buf, T(a.scale));  // B of dK += dS^T Q
        const S* dop = dout + b * a.dos[0] + h * a.dos[1] + q0 * a.dos[2];
        const T* dOa = dOb;
        int64_t ldo = Dvp;
        if (same) {
          dOa = reinterpret_cast<const T*>(dop);
          ldo = a.dos[2];
        } else {
          pack_rows(dop, a.dos[2], nq, Dv, dOb, Dvp, 0);
        }
        pack_b_rows(dop, a.dos[2], nq, Dv, dOp, row_buf);  // B of dV += P^T dO
        const HeadScores<T> hs = head_scores<T>(a, b, h);
        fill_rows(a, rw, b, h, q0, nq);
        fill_grad_rows(a, rw, b, h, q0, nq);
        const uint64_t* wp = tile.slot >= 0 ? reinterpret_cast<const uint64_t*>(
            tile_bits(a, tile.slot, a.bitss[1] ? b : 0, a.bitss[2] ? h : 0)) : nullptr;
        gemm<T>(nq, BK, D, Qb, Dp, 1, Kt, Sb, BK, 0);
        gemm<T>(nq, BK, Dv, dOa, ldo, 1, Vt, dPb, BK, 0);
        grad_tile<T, false>(Sb, dPb, nq, tile, hs, rw, a.ni, wp, b, h, q0, nq, k0, a);
        gemm<T>(nk, Dvp, nq, Sb, 1, BK, dOp, dVj, Dvp, 1);
        gemm<T>(nk, Dp, nq, dPb, 1, BK, Qp, dKj, Dp, 1);
      }
    }
    for (int64_t kk = 0; kk < nk; ++kk) {
      T* dkr = dk + b * a.dks[0] + hkv * a.dks[1] + (k0 + kk) * a.dks[2];
      T* dvr = dv + b * a.dvs[0] + hkv * a.dvs[1] + (k0 + kk) * a.dvs[2];
      for (int64_t d = 0; d < D; ++d) dkr[d] += dKj[kk * Dp + d];
      for (int64_t d = 0; d < Dv; ++d) dvr[d] += dVj[kk * Dvp + d];
    }
  };

  // dQ of (b, hkv, heads g0..g1, query tile i).
  auto query_item = [&](int64_t b, int64_t hkv, int64_t g0, int64_t g1, int64_t i, Scratch& sc) {
    Arena<T>& ar = sc.ar;
    const int64_t ng = g1 - g0, q0 = i * BQ, nq = std::min(BQ, a.T - q0);
    T* Qt = ar.take(gc * D * BQ);
    T* dOt = ar.take(gc * Dv * BQ);
    T* dQ = ar.take(gc * BQ * Dp);
    T* St = ar.take(BK * BQ);
    T* dPt = ar.take(BK * BQ);
    T* Kb = ar.take(BK * Dp);
    T* Kp = ar.take(BK * Dp);
    T* Vb = ar.take(BK * Dv);
    T* row_buf = ar.take(std::max(Dp, Dvp));
    uint64_t word[64];
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t h = hkv * a.G + g0 + g;
      pack_b_cols(q + b * a.qs[0] + h * a.qs[1] + q0 * a.qs[2], a.qs[2], nq, D,
                  Qt + g * D * BQ, BQ, row_buf, T(a.scale));
      pack_b_cols(dout + b * a.dos[0] + h * a.dos[1] + q0 * a.dos[2], a.dos[2], nq, Dv,
                  dOt + g * Dv * BQ, BQ, row_buf);
      std::fill(dQ + g * BQ * Dp, dQ + (g + 1) * BQ * Dp, T(0));
      fill_rows(a, sc.rows[g], b, h, q0, nq);
      fill_grad_rows(a, sc.rows[g], b, h, q0, nq);
    }
    int64_t j0, j1;
    key_range(a, b, hkv, i, j0, j1);
    for (int64_t j = j0; j < j1; ++j) {
      const Tile tile = classify(a, b, hkv, i, j);
      if (tile.kind == SKIP) continue;
      const int64_t k0 = j * BK, nk = std::min(BK, a.S - k0);
      const S* kp = k + b * a.ks[0] + hkv * a.ks[1] + k0 * a.ks[2];
      const S* vp = v + b * a.vs[0] + hkv * a.vs[1] + k0 * a.vs[2];
      const T* Ka = Kb;  // rows of K: the St GEMM's A operand
      int64_t ldk = D;
      if (same) {
        Ka = reinterpret_cast<const T*>(kp);
        ldk = a.ks[2];
      } else {
        pack_rows(kp, a.ks[2], nk, D, Kb, D, 0);
      }
      pack_b_rows(kp, a.ks[2], nk, D, Kp, row_buf);  // B of dQ += dS K
      const T* Va = Vb;
      int64_t ldv = Dv;
      if (same) {
        Va = reinterpret_cast<const T*>(vp);
        ldv = a.vs[2];
      } else {
        pack_rows(vp, a.vs[2], nk, Dv, Vb, Dv, 0);
      }
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t h = hkv * a.G + g0 + g;
        const uint64_t* wp = nullptr;
        if (tile.slot >= 0) {
          transpose_bits(tile_bits(a, tile.slot, a.bitss[1] ? b : 0, a.bitss[2] ? h : 0), word);
          wp = word;
        }
        gemm<T>(nk, BQ, D, Ka, ldk, 1, Qt + g * D * BQ, St, BQ, 0);
        gemm<T>(nk, BQ, Dv, Va, ldv, 1, dOt + g * Dv * BQ, dPt, BQ, 0);
        grad_tile<T, true>(St, dPt, nk, tile, head_scores<T>(a, b, h), sc.rows[g], a.ni, wp, b,
                           h, q0, nq, k0, a);
        gemm<T>(nq, Dp, nk, dPt, 1, BQ, Kp, dQ + g * BQ * Dp, Dp, 1);
      }
    }
    const T scale = T(a.scale);
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t h = hkv * a.G + g0 + g;
      for (int64_t r = 0; r < nq; ++r) {
        T* dqr = dq + b * a.dqs[0] + h * a.dqs[1] + (q0 + r) * a.dqs[2];
        const T* src = dQ + (g * BQ + r) * Dp;
        for (int64_t d = 0; d < D; ++d) dqr[d] += scale * src[d];
      }
    }
  };

  auto work = [&](const Item& it, Scratch& sc) {
    sc.ar.used = 0;
    if (it.pass == 0) {
      key_item(it.b, it.hkv, it.tile, sc);
    } else if (it.b >= 0) {
      query_item(it.b, it.hkv, it.g0, it.g1, it.tile, sc);
    } else {  // every batch and head of the tile, in order (a shared bias gradient)
      for (int64_t b = 0; b < a.B; ++b)
        for (int64_t hkv = 0; hkv < a.Hkv; ++hkv)
          for (int64_t g0 = 0; g0 < a.G; g0 += gc) {
            sc.ar.used = 0;
            query_item(b, hkv, g0, std::min(a.G, g0 + gc), it.tile, sc);
          }
    }
  };
  run_items(items, make_scratch, work);
}

template void backward_impl<float>(const Args&);
template void backward_impl<double>(const Args&);
template void backward_impl<c10::BFloat16>(const Args&);
template void backward_impl<c10::Half>(const Args&);

}  // namespace attnkit_kernel
