// attnkit attention kernel: the backward pass, FlashAttention-2 style. Probabilities are
// recomputed from the saved log-sum-exp, P = exp(S - lse), and dS = P * (dP - delta) with
// delta = rowsum(dO * O) (minus the lse's own gradient), computed by the caller.
//
// Work item = (batch b, kv head, a chunk of consecutive key tiles). For each key tile j it
// transposes K_j and V_j once, then for every query tile i and query head that sees j:
//   S = (scale Q_i) K_j^T, dP = dO_i V_j^T       (query rows x keys)
//   dV_j += P^T dO_i, dK_j += dS^T (scale Q_i)   (P, dS read through strides: no transpose)
//   dQ_i += dS K_j                               (scale applied when added to dq)
// five GEMMs per tile, the minimum. dK_j and dV_j belong to the item alone; dQ rows are
// shared by the key chunks of a head, so when a head is cut into C > 1 chunks (for enough
// items to keep the threads busy) chunks c >= 1 write partial dQ buffers that are added to
// dq afterwards in chunk order. Chunk boundaries follow from the shapes and the mask, never
// from the thread count: the result is the same bits on any number of threads, without
// atomics. Accumulators are fp32 (fp64 for double) and added into the caller's dq/dk/dv, so
// ring attention can accumulate blocks into one buffer.

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

// P and dS of one tile (nq query rows x BK keys), in place: scaled scores -> P, dP -> dS at
// the raw scores; with a bias that needs a gradient, dS at the bias is added into a.dbias.
template <typename T>
static void grad_tile(T* s_buf, T* dp_buf, int64_t nq, int64_t nk, const Tile& tile,
                      const HeadScores<T>& hs, const Rows<T>& rw, int ni, const uint64_t* word,
                      int64_t b, int64_t h, int64_t q0, int64_t k0, const Args& a) {
  constexpr int W = VT<T>::W;
  const bool has_cap = a.cap > 0;
  T* db = nullptr;
  if (a.dbias)
    db = static_cast<T*>(a.dbias) + (a.Bb == 1 ? 0 : b) * a.dbs[0] +
         (a.Hb == 1 ? 0 : h) * a.dbs[1];
  for (int64_t r = 0; r < nq; ++r) {
    const vec<T> lse = splat(rw.lse[r]), delta = splat(rw.delta[r]), keep = splat(rw.keep[r]);
    for (int64_t c = 0; c < BK; c += W) {
      vec<T> s = vload(s_buf + r * BK + c), capped{};
      if (hs.nops) s = apply_scores<T, false>(s, hs, rw, r, c, q0, k0, a.T, a.S, &capped);
      if (tile.kind == PARTIAL) s = visible<T, false>(rw, ni, r, c, k0, word) ? s : neg_inf<T>();
      const vec<T> p = vexp(s - lse);
      const vec<T> ds = p * (vload(dp_buf + r * BK + c) * keep - delta);
      vec<T> ds_raw = ds;
      if (has_cap) {
        const vec<T> t = capped * hs.inv_cap;
        ds_raw = ds * (T(1) - t * t);
      }
      vstore(s_buf + r * BK + c, p);
      vstore(dp_buf + r * BK + c, ds_raw);
      if (db) {
        const vec<T> at_bias = a.cap_after_bias ? ds_raw : ds;
        for (int l = 0; l < W && c + l < nk; ++l)
          db[(q0 + r) * a.dbs[2] + (k0 + c + l) * a.dbs[3]] += at_bias[l];
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

  // Visible (query tile, key tile) pairs per key tile of every (b, kv head).
  std::vector<int64_t> per_key(a.B * a.Hkv * a.nK, 0);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t hkv = 0; hkv < a.Hkv; ++hkv)
      for (int64_t i = 0; i < a.nQ; ++i) {
        int64_t j0, j1;
        key_range(a, b, hkv, i, j0, j1);
        for (int64_t j = j0; j < j1; ++j)
          per_key[(b * a.Hkv + hkv) * a.nK + j] += classify(a, b, hkv, i, j).kind != SKIP;
      }
  // A bias gradient shared by several (b, h) is summed inside one item (its chunk covers
  // every batch and head, in order); one shared by every key allows one chunk only.
  const bool serial = a.dbias && ((a.Bb == 1 && a.B > 1) || (a.Hb == 1 && a.H > 1));
  const int64_t heads = serial ? 1 : a.B * a.Hkv;
  const int64_t row_bytes = a.B * a.H * a.T * D * int64_t(sizeof(T));
  int64_t C = std::min<int64_t>(a.nK, (16 + heads - 1) / heads);
  C = std::max<int64_t>(1, std::min<int64_t>(C, 1 + (int64_t(512) << 20) / std::max<int64_t>(1, row_bytes)));
  if (a.dbias && a.dbs[3] == 0) C = 1;
  // Chunk boundaries: equal shares of a head's visible pairs (the first head's, when serial).
  std::vector<int64_t> bounds(a.B * a.Hkv * (C + 1));
  for (int64_t bh = 0; bh < a.B * a.Hkv; ++bh) {
    const int64_t* cnt = per_key.data() + (serial ? 0 : bh) * a.nK;
    int64_t total = 0;
    for (int64_t j = 0; j < a.nK; ++j) total += cnt[j];
    int64_t* bd = bounds.data() + bh * (C + 1);
    bd[0] = 0;
    int64_t run = 0, c = 1;
    for (int64_t j = 0; j < a.nK && c < C; ++j) {
      run += cnt[j];
      while (c < C && run * C >= total * c) bd[c++] = j + 1;
    }
    while (c <= C) bd[c++] = a.nK;
  }
  std::vector<T> partial(C > 1 ? size_t((C - 1) * a.B * a.H * a.T * D) : 0, T(0));
  std::vector<Item> items;
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t* bd = bounds.data() + bh * (C + 1);
      int64_t n = 0;
      for (int64_t j = bd[c]; j < bd[c + 1]; ++j) n += per_key[bh * a.nK + j];
      items.push_back({serial ? -1 : bh / a.Hkv, serial ? -1 : bh % a.Hkv, 0, a.G, c, 1,
                       serial ? 1 : 5 * n * a.G});
    }

  const size_t need = size_t(D * BK + Dv * BK + 2 * BK * Dp + BK * Dvp + 2 * BQ * BK +
                             3 * BQ * Dp + 2 * BQ * Dvp + std::max(Dp, Dvp) + 64 * 16);
  struct Scratch {
    Arena<T> ar;
    Rows<T> rows;
  };
  auto make_scratch = [&]() { return Scratch{Arena<T>(need), Rows<T>()}; };

  // Key tiles [j0, j1) of (b, hkv); dQ into dq (chunk 0) or partial buffer c - 1.
  auto key_chunk = [&](int64_t b, int64_t hkv, int64_t c, int64_t j0, int64_t j1, Scratch& sc) {
    Arena<T>& ar = sc.ar;
    ar.used = 0;
    T* Kt = ar.take(D * BK);
    T* Vt = ar.take(Dv * BK);
    T* Kp = ar.take(BK * Dp);
    T* dKj = ar.take(BK * Dp);
    T* dVj = ar.take(BK * Dvp);
    T* Sb = ar.take(BQ * BK);
    T* dPb = ar.take(BQ * BK);
    T* Qb = ar.take(BQ * Dp);
    T* Qp = ar.take(BQ * Dp);
    T* dQt = ar.take(BQ * Dp);
    T* dOb = ar.take(BQ * Dvp);
    T* dOp = ar.take(BQ * Dvp);
    T* row_buf = ar.take(std::max(Dp, Dvp));
    Rows<T>& rw = sc.rows;
    const T scale = T(a.scale);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k0 = j * BK, nk = std::min(BK, a.S - k0);
      const S* kp = k + b * a.ks[0] + hkv * a.ks[1] + k0 * a.ks[2];
      pack_b_cols(kp, a.ks[2], nk, D, Kt, BK, row_buf);  // B of S = Q K^T
      pack_b_cols(v + b * a.vs[0] + hkv * a.vs[1] + k0 * a.vs[2], a.vs[2], nk, Dv, Vt, BK,
                  row_buf);  // B of dP = dO V^T
      pack_b_rows(kp, a.ks[2], nk, D, Kp, row_buf);  // B of dQ = dS K
      std::fill(dKj, dKj + BK * Dp, T(0));
      std::fill(dVj, dVj + BK * Dvp, T(0));
      for (int64_t i = 0; i < a.nQ; ++i) {
        const Tile tile = classify(a, b, hkv, i, j);
        if (tile.kind == SKIP) continue;
        const int64_t q0 = i * BQ, nq = std::min(BQ, a.T - q0);
        for (int64_t g = 0; g < a.G; ++g) {
          const int64_t h = hkv * a.G + g;
          const S* qp = q + b * a.qs[0] + h * a.qs[1] + q0 * a.qs[2];
          pack_rows(qp, a.qs[2], nq, D, Qb, Dp, 0, scale);  // A of S = (scale Q) K^T
          pack_b_rows(qp, a.qs[2], nq, D, Qp, row_buf, scale);  // B of dK += dS^T Q
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
          grad_tile<T>(Sb, dPb, nq, nk, tile, hs, rw, a.ni, wp, b, h, q0, k0, a);
          gemm<T>(nk, Dvp, nq, Sb, 1, BK, dOp, dVj, Dvp, 1);
          gemm<T>(nk, Dp, nq, dPb, 1, BK, Qp, dKj, Dp, 1);
          gemm<T>(nq, Dp, nk, dPb, BK, 1, Kp, dQt, Dp, 0);
          for (int64_t r = 0; r < nq; ++r) {
            T* dst = c == 0 ? dq + b * a.dqs[0] + h * a.dqs[1] + (q0 + r) * a.dqs[2]
                            : partial.data() + ((((c - 1) * a.B + b) * a.H + h) * a.T + q0 + r) * D;
            const T* src = dQt + r * Dp;
            for (int64_t d = 0; d < D; ++d) dst[d] += scale * src[d];
          }
        }
      }
      for (int64_t kk = 0; kk < nk; ++kk) {
        T* dkr = dk + b * a.dks[0] + hkv * a.dks[1] + (k0 + kk) * a.dks[2];
        T* dvr = dv + b * a.dvs[0] + hkv * a.dvs[1] + (k0 + kk) * a.dvs[2];
        for (int64_t d = 0; d < D; ++d) dkr[d] += dKj[kk * Dp + d];
        for (int64_t d = 0; d < Dv; ++d) dvr[d] += dVj[kk * Dvp + d];
      }
    }
  };

  auto work = [&](const Item& it, Scratch& sc) {
    const int64_t c = it.tile;
    if (it.b >= 0) {
      const int64_t* bd = bounds.data() + (it.b * a.Hkv + it.hkv) * (C + 1);
      key_chunk(it.b, it.hkv, c, bd[c], bd[c + 1], sc);
      return;
    }
    for (int64_t b = 0; b < a.B; ++b)  // every batch and head, in order (a shared bias)
      for (int64_t hkv = 0; hkv < a.Hkv; ++hkv) key_chunk(b, hkv, c, bounds[c], bounds[c + 1], sc);
  };
  run_items(items, make_scratch, work);

  if (C > 1) {  // the other chunks' dQ, in chunk order, one (b, h) per item
    std::vector<Item> adds;
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) adds.push_back({bh / a.H, bh % a.H, 0, 0, 0, 2, 1});
    run_items(adds, []() { return 0; }, [&](const Item& it, int&) {
      for (int64_t t = 0; t < a.T; ++t) {
        T* dst = dq + it.b * a.dqs[0] + it.hkv * a.dqs[1] + t * a.dqs[2];
        for (int64_t c = 1; c < C; ++c) {
          const T* src = partial.data() + ((((c - 1) * a.B + it.b) * a.H + it.hkv) * a.T + t) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        }
      }
    });
  }
}

template void backward_impl<float>(const Args&);
template void backward_impl<double>(const Args&);
template void backward_impl<c10::BFloat16>(const Args&);
template void backward_impl<c10::Half>(const Args&);

}  // namespace attnkit_kernel
