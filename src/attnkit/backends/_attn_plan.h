// attnkit attention kernel: the call's description (Args), which tiles each work item visits
// (the plan: per-row key intervals, a batch-wide tile kind, mask bits on opaque partial tiles),
// the score functions applied to a vector of scores, and the dynamic work queue.
//
// Masks reach the kernel in up to three forms, each optional:
//   iv    int32 (B|1, H|1, T, 2*ni), ni in {1, 2}: per query row, key intervals [lo, hi) whose
//         union is what the row sees (causal, windows, documents, padding, varlen, ...);
//   kind  int8 (nQ, nK): EMPTY 0 / PARTIAL 1 / FULL 2 per tile, for every batch and head
//         (the BlockSummary); FULL tiles need no mask at all, EMPTY ones are skipped;
//   bits  int64 (P, B|1, H|1, BQ) with slot int32 (nQ, nK): for partial tiles of an opaque
//         mask function, bit c of word r says whether row r sees key c of the tile.
// A key is visible iff every form given allows it. From the intervals the kernel derives
// per batch and head group which tiles are empty, full or partial (a hull per query tile).

#pragma once

#include "_attn_kernel.h"

#include <atomic>
#include <functional>
#include <memory>
#include <thread>

namespace attnkit_kernel {

enum Op { OP_SOFTCAP = 1, OP_ALIBI = 2, OP_BIAS = 3 };

struct Args {
  int64_t B = 0, H = 0, Hkv = 0, G = 0, T = 0, S = 0, D = 0, Dv = 0, nQ = 0, nK = 0;
  double scale = 1.0;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t qs[3] = {}, ks[3] = {}, vs[3] = {};  // strides of dims 0..2 (the last is 1)
  // mask
  const int32_t* iv = nullptr;
  int64_t ivs[3] = {}, Bi = 1, Hi = 1;
  int ni = 0;
  const int8_t* kind = nullptr;
  const int64_t* bits = nullptr;
  int64_t bitss[3] = {};  // strides of bits' dims 0..2 (0 where broadcast)
  const int32_t* slot = nullptr;
  // scores, applied in the order of ops; tensors in the acc dtype
  int nops = 0;
  int ops[3] = {0, 0, 0};
  double cap = 0.0;
  const void *slopes = nullptr, *pos = nullptr, *bias = nullptr, *sinks = nullptr;
  int64_t bs[4] = {};
  bool cap_after_bias = false;
  // forward outputs (contiguous; lse and single are (B, H, T))
  void* out = nullptr;
  void* lse = nullptr;
  uint8_t* single = nullptr;
  // backward inputs (lse, delta, single_in contiguous (B, H, T)) and outputs (added into)
  const void *dout = nullptr, *lse_in = nullptr, *delta = nullptr;
  const uint8_t* single_in = nullptr;
  int64_t dos[3] = {};
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *dbias = nullptr;
  int64_t dqs[3] = {}, dks[3] = {}, dvs[3] = {}, dbs[4] = {}, Bb = 1, Hb = 1;
  // derived by prepare(): the interval hull of every (batch, head group, query tile)
  std::vector<int32_t> hull;  // [Bi][Hg][nQ][ni][4]: min lo, max lo, min hi, max hi
  int64_t Hg = 1;
};

// Rows of interval ni of (b, h, row): iv[b, h, row, 2s:2s+2].
inline const int32_t* iv_row(const Args& a, int64_t b, int64_t h, int64_t row) {
  return a.iv + (a.Bi == 1 ? 0 : b) * a.ivs[0] + (a.Hi == 1 ? 0 : h) * a.ivs[1] + row * a.ivs[2];
}

inline void prepare(Args& a) {
  if (!a.iv) return;
  a.Hg = a.Hi == 1 ? 1 : a.Hkv;
  a.hull.assign(a.Bi * a.Hg * a.nQ * a.ni * 4, 0);
  for (int64_t b = 0; b < a.Bi; ++b)
    for (int64_t g = 0; g < a.Hg; ++g)
      for (int64_t i = 0; i < a.nQ; ++i) {
        int32_t* h = a.hull.data() + ((b * a.Hg + g) * a.nQ + i) * a.ni * 4;
        for (int s = 0; s < a.ni; ++s) {
          h[4 * s + 0] = INT32_MAX;
          h[4 * s + 1] = INT32_MIN;
          h[4 * s + 2] = INT32_MAX;
          h[4 * s + 3] = INT32_MIN;
        }
        const int64_t heads = a.Hg == 1 ? 1 : a.G;
        for (int64_t hh = 0; hh < heads; ++hh)
          for (int64_t r = i * BQ; r < std::min(a.T, (i + 1) * BQ); ++r) {
            const int32_t* row = iv_row(a, b, g * a.G + hh, r);
            for (int s = 0; s < a.ni; ++s) {
              const int32_t lo = row[2 * s], hi = row[2 * s + 1];
              h[4 * s + 1] = std::max(h[4 * s + 1], lo);
              h[4 * s + 2] = std::min(h[4 * s + 2], hi);
              if (lo < hi) {  // empty intervals see nothing: left out of the hull
                h[4 * s + 0] = std::min(h[4 * s + 0], lo);
                h[4 * s + 3] = std::max(h[4 * s + 3], hi);
              }
            }
          }
      }
}

enum TileKind : int8_t { SKIP = 0, PARTIAL = 1, FULL = 2 };
struct Tile {
  int8_t kind;
  int32_t slot;  // mask bits of this tile, or -1
};

// What (batch b, kv head hkv, query tile i, key tile j) needs: skip, a mask, or nothing.
inline Tile classify(const Args& a, int64_t b, int64_t hkv, int64_t i, int64_t j) {
  const int8_t kd = a.kind ? a.kind[i * a.nK + j] : (a.iv ? PARTIAL : FULL);
  if (kd == SKIP) return {SKIP, -1};
  if (kd == FULL) return {FULL, -1};
  const int32_t slot = a.slot ? a.slot[i * a.nK + j] : -1;
  bool every = !a.iv;
  if (a.iv) {
    const int32_t* h = a.hull.data() +
        (((a.Bi == 1 ? 0 : b) * a.Hg + (a.Hg == 1 ? 0 : hkv)) * a.nQ + i) * a.ni * 4;
    const int64_t k0 = j * BK, k1 = std::min(a.S, k0 + BK);
    bool some = false;
    for (int s = 0; s < a.ni; ++s) {
      some = some || (h[4 * s] < k1 && h[4 * s + 3] > k0);
      every = every || (h[4 * s + 1] <= k0 && h[4 * s + 2] >= k1);
    }
    if (!some) return {SKIP, -1};
  }
  return {(every && slot < 0) ? FULL : PARTIAL, slot};
}

// The key tiles a query tile can touch: [j0, j1) (from the hull when intervals are given).
inline void key_range(const Args& a, int64_t b, int64_t hkv, int64_t i, int64_t& j0, int64_t& j1) {
  j0 = 0;
  j1 = a.nK;
  if (!a.iv) return;
  const int32_t* h = a.hull.data() +
      (((a.Bi == 1 ? 0 : b) * a.Hg + (a.Hg == 1 ? 0 : hkv)) * a.nQ + i) * a.ni * 4;
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  for (int s = 0; s < a.ni; ++s) {
    if (h[4 * s] >= h[4 * s + 3]) continue;
    lo = std::min<int64_t>(lo, h[4 * s]);
    hi = std::max<int64_t>(hi, h[4 * s + 3]);
  }
  if (lo >= hi) {
    j0 = j1 = 0;
    return;
  }
  j0 = std::max<int64_t>(0, lo / BK);
  j1 = std::min<int64_t>(a.nK, (hi + BK - 1) / BK);
}

// ---- per-row and per-head state of one (b, h, query tile) ---------------------------------

template <typename T> struct Rows {
  alignas(64) T lo[2][BQ];
  alignas(64) T hi[2][BQ];
  alignas(64) T pos[BQ];
  alignas(64) T lse[BQ];    // backward: the rows' log-sum-exp (0 where -inf)
  alignas(64) T delta[BQ];  // backward: rowsum(dO * O) minus the lse's own gradient
  alignas(64) T keep[BQ];   // backward: 0 for rows that saw one key (their dP term is 0)
};

template <typename T> struct HeadScores {
  int nops = 0;
  int ops[3] = {0, 0, 0};
  T cap = 0, inv_cap = 0, slope = 0;
  const T* bias = nullptr;  // at (b, h, 0, 0)
  int64_t bq = 0, bk = 0;
};

template <typename T>
inline HeadScores<T> head_scores(const Args& a, int64_t b, int64_t h) {
  HeadScores<T> hs;
  hs.nops = a.nops;
  for (int o = 0; o < a.nops; ++o) hs.ops[o] = a.ops[o];
  if (a.cap > 0) {
    hs.cap = T(a.cap);
    hs.inv_cap = T(1.0 / a.cap);
  }
  if (a.slopes) hs.slope = static_cast<const T*>(a.slopes)[h];
  if (a.bias) {
    hs.bias = static_cast<const T*>(a.bias) + b * a.bs[0] + h * a.bs[1];
    hs.bq = a.bs[2];
    hs.bk = a.bs[3];
  }
  return hs;
}

// Fill the rows' intervals and ALiBi positions for query rows q0 .. q0 + nq of (b, h);
// padding rows see nothing.
template <typename T>
inline void fill_rows(const Args& a, Rows<T>& rw, int64_t b, int64_t h, int64_t q0, int64_t nq) {
  const T* pos = static_cast<const T*>(a.pos);
  for (int64_t r = 0; r < BQ; ++r) {
    const bool real = r < nq;
    if (a.iv) {
      const int32_t* row = real ? iv_row(a, b, h, q0 + r) : nullptr;
      for (int s = 0; s < a.ni; ++s) {
        rw.lo[s][r] = real ? T(row[2 * s]) : T(0);
        rw.hi[s][r] = real ? T(row[2 * s + 1]) : T(0);
      }
    }
    rw.pos[r] = (pos && real) ? pos[q0 + r] : T(0);
  }
}

// Bias values of one vector: along queries (COLS) or along keys (ROWS), clamped to the
// tensor's last real row/column so padding lanes never read past it.
template <typename T, bool COLS>
inline vec<T> bias_vec(const HeadScores<T>& hs, int64_t qi, int64_t kj, int64_t qmax,
                       int64_t kmax) {
  vec<T> out;
  if (!COLS && hs.bk == 1 && kj + VT<T>::W - 1 <= kmax) return vload(hs.bias + qi * hs.bq + kj);
  for (int l = 0; l < VT<T>::W; ++l) {
    const int64_t q = COLS ? std::min(qi + l, qmax) : qi;
    const int64_t k = COLS ? kj : std::min(kj + l, kmax);
    out[l] = hs.bias[q * hs.bq + k * hs.bk];
  }
  return out;
}

// The score functions on one vector of scaled scores. COLS: lanes are query rows r .. r+W-1
// of the tile at key kk; ROWS: lanes are keys kk .. kk+W-1 at row r. `capped` receives the
// softcap's output (its derivative is 1 - (capped / cap)^2); `at_bias` the score entering
// the bias (for the bias gradient's chain rule through a later softcap).
template <typename T, bool COLS>
inline vec<T> apply_scores(vec<T> s, const HeadScores<T>& hs, const Rows<T>& rw, int64_t r,
                           int64_t kk, int64_t q0, int64_t k0, int64_t T_, int64_t S_,
                           vec<T>* capped) {
  for (int o = 0; o < hs.nops; ++o) {
    if (hs.ops[o] == OP_SOFTCAP) {
      s = vtanh(s * hs.inv_cap) * hs.cap;
      if (capped) *capped = s;
    } else if (hs.ops[o] == OP_ALIBI) {
      const vec<T> p = COLS ? vload(rw.pos + r) : splat(rw.pos[r]);
      const vec<T> j = COLS ? splat(T(k0 + kk)) : iota<T>() + T(k0 + kk);
      vec<T> d = p - j;
      d = d < T(0) ? -d : d;
      s -= hs.slope * d;
    } else if (hs.ops[o] == OP_BIAS) {
      s += bias_vec<T, COLS>(hs, q0 + r, k0 + kk, T_ - 1, S_ - 1);
    }
  }
  return s;
}

// Which lanes are visible in a partial tile: the rows' intervals and the tile's mask word
// (COLS: the key's word over rows, ROWS: the row's word over keys).
template <typename T, bool COLS>
inline vmask<T> visible(const Rows<T>& rw, int ni, int64_t r, int64_t kk, int64_t k0,
                        const uint64_t* word) {
  vmask<T> vis = vmask<T>{} == 0;  // all lanes
  if (ni > 0) {
    const vec<T> j = COLS ? splat(T(k0 + kk)) : iota<T>() + T(k0 + kk);
    vmask<T> in = vmask<T>{} != 0;
    for (int s = 0; s < ni; ++s) {
      const vec<T> lo = COLS ? vload(rw.lo[s] + r) : splat(rw.lo[s][r]);
      const vec<T> hi = COLS ? vload(rw.hi[s] + r) : splat(rw.hi[s][r]);
      in = in | ((j >= lo) & (j < hi));
    }
    vis = in;
  }
  if (word) vis = vis & bit_lanes<T>(COLS ? (word[kk] >> r) : (word[r] >> kk));
  return vis;
}

// 64 x 64 bit transpose: row words (bit c of rows[r]) to key words (bit r of cols[c]).
inline void transpose_bits(const int64_t* rows, uint64_t* cols) {
  for (int c = 0; c < 64; ++c) cols[c] = 0;
  for (int r = 0; r < 64; ++r) {
    uint64_t w = uint64_t(rows[r]);
    while (w) {
      const int c = __builtin_ctzll(w);
      cols[c] |= uint64_t(1) << r;
      w &= w - 1;
    }
  }
}

inline const int64_t* tile_bits(const Args& a, int32_t slot, int64_t b, int64_t h) {
  return a.bits + slot * a.bitss[0] + b * a.bitss[1] + h * a.bitss[2];
}

// ---- the work queue -----------------------------------------------------------------------
//
// Items are taken in the caller's order (it keeps the items that read the same K/V tiles next
// to each other, largest first within a head) by whichever thread is free. The calling thread
// works through the queue itself; helpers (torch's inter-op pool, at most num_threads - 1) join
// when they get a core. The caller never waits for a helper that has not started: once the
// queue is empty it closes it and waits only for helpers in the middle of an item. On a shared
// machine, a helper that is descheduled simply does nothing, so more threads are never slower
// than one (an OpenMP region would wait at its barrier for every thread of the team).

struct Item {
  int64_t b, hkv, g0, g1, tile;
  int pass;
  int64_t cost;
};

struct Queue {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::atomic<bool> closed{false};
};

template <typename Worker, typename MakeScratch>
inline void run_items(std::vector<Item>& items, MakeScratch make_scratch, Worker work) {
  items.erase(std::remove_if(items.begin(), items.end(), [](const Item& x) { return x.cost == 0; }),
              items.end());
  const int64_t n = int64_t(items.size());
  if (n == 0) return;
  auto queue = std::make_shared<Queue>();
  auto drain = [&]() {
    auto scratch = make_scratch();
    for (int64_t w = queue->next.fetch_add(1); w < n; w = queue->next.fetch_add(1))
      work(items[w], scratch);
  };
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers && !at::in_parallel_region(); ++t) {
    std::function<void()> help = drain;  // captures the caller's frame: run only while open
    at::launch([queue, help]() {
      queue->active.fetch_add(1);
      if (!queue->closed.load()) help();
      queue->active.fetch_sub(1);
    });
  }
  drain();
  queue->closed.store(true);
  while (queue->active.load() != 0) std::this_thread::yield();
}

// Per-thread scratch: one allocation, carved into 64-byte aligned pieces.
template <typename T> struct Arena {
  std::vector<T> buf;
  size_t used = 0;
  explicit Arena(size_t elems) : buf(elems + 64) {}
  T* take(size_t n) {
    const size_t align = 64 / sizeof(T);
    uintptr_t base = reinterpret_cast<uintptr_t>(buf.data() + used);
    size_t skip = ((64 - base % 64) % 64) / sizeof(T);
    T* p = buf.data() + used + skip;
    used += skip + (n + align - 1) / align * align;
    TORCH_CHECK(used <= buf.size(), "attnkit kernel: scratch overflow");
    return p;
  }
};

}  // namespace attnkit_kernel
