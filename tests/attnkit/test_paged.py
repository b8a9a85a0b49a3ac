"""The paged KV cache: pages in place against attention over the whole sequence (scattered
pages, prefill chunks, decode steps, windows, sinks, softcap), pool bookkeeping, the memory
report, and every error message."""

import pytest
import torch

import attnkit
from attnkit.paged import PagedKVCache, page_runs, paged_attention


def _full(q, k, v, **kw):
    """Reference: the sequence's keys contiguous, bottom-right causal."""
    return attnkit.attention(q, k[None], v[None], causal=True, causal_align="bottom_right",
                             backend="math", **kw)


def _fill(cache, seq, k, v, chunks, layer=0):
    """Write ``k, v (Hkv, L, D)`` in chunks through reserve/write."""
    pos = 0
    for n in chunks:
        start = cache.reserve(seq, n)
        assert start == pos
        cache.write(layer, seq, start, k[:, pos:pos + n], v[:, pos:pos + n])
        pos += n


@pytest.mark.parametrize("window", [None, 5])
def test_interleaved_sequences_match_contiguous_attention(window):
    g = torch.Generator().manual_seed(0)
    H, Hkv, D = 4, 2, 8
    cache = PagedKVCache(32, 4, Hkv, D, dtype=torch.float64)
    lens = {"a": 23, "b": 9, "c": 14}
    kv = {s: (torch.randn(Hkv, n, D, generator=g, dtype=torch.float64),
              torch.randn(Hkv, n, D, generator=g, dtype=torch.float64)) for s, n in lens.items()}
    for s in lens:
        cache.allocate(s)
    for step in range(23):  # grow one token at a time, interleaved: pages scatter
        for s, n in lens.items():
            if step < n:
                start = cache.reserve(s, 1)
                cache.write(0, s, start, kv[s][0][:, step:step + 1], kv[s][1][:, step:step + 1])
    assert len(page_runs(cache.block_tables["a"], 23, 4)) > 1  # really scattered
    for s, n in lens.items():
        q = torch.randn(1, H, 3, D, generator=g, dtype=torch.float64)
        out = cache.attend(0, s, q, window=window)
        ref = _full(q, *kv[s], window=window)
        torch.testing.assert_close(out, ref)


def test_prefill_chunks_sinks_softcap_and_gqa():
    g = torch.Generator().manual_seed(1)
    cache = PagedKVCache(16, 8, 1, 16, num_layers=2, dtype=torch.float64)
    k, v = (torch.randn(1, 30, 16, generator=g, dtype=torch.float64) for _ in range(2))
    cache.allocate("s", capacity=8)
    cache.allocate("blocker", capacity=8)  # forces "s" to jump to a later page
    _fill(cache, "s", k, v, [5, 12, 13], layer=1)
    sinks = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
    q = torch.randn(1, 4, 13, 16, generator=g, dtype=torch.float64)
    out = cache.attend(1, "s", q, sinks=sinks, softcap=3.0, scale=0.2)
    torch.testing.assert_close(out, _full(q, k, v, sinks=sinks, softcap=3.0, scale=0.2))


def test_pool_bookkeeping_contiguous_allocation_and_reuse():
    cache = PagedKVCache(8, 4, 1, 2)
    cache.allocate("a", capacity=10)  # 3 contiguous pages
    assert cache.block_tables["a"] == [0, 1, 2]
    cache.allocate("b", capacity=4)
    cache.free("a")
    cache.allocate("c", capacity=16)  # pages 3 and 0..2 are free; first contiguous run of 4
    assert cache.block_tables["c"] == [4, 5, 6, 7]
    cache.reserve("b", 4)
    cache.reserve("b", 1)  # page 4 is taken: the next page comes from the lowest free
    assert cache.block_tables["b"] == [3, 0]
    rep = cache.memory_report()
    assert (rep.pages_in_use, rep.sequences, rep.tokens, rep.runs) == (6, 2, 5, 3)
    assert rep.bytes_per_token == 2 * 1 * 2 * 4
    assert rep.fragmentation == pytest.approx(1 - 5 / 24)
    assert "6/8 pages in use by 2 sequences" in str(rep)


def test_full_pool_is_an_error_and_takes_nothing():
    cache = PagedKVCache(4, 4, 1, 2)
    cache.allocate("a", capacity=12)
    with pytest.raises(RuntimeError, match=r"page pool is full: sequence 'a' needs 2 more "
                                           r"page\(s\) of 4 tokens, 1 of 4 are free"):
        cache.reserve("a", 20)
    assert cache.lengths["a"] == 0 and cache.memory_report().pages_in_use == 3
    with pytest.raises(RuntimeError, match="page pool is full: sequence 'b'"):
        cache.allocate("b", capacity=8)
    assert "b" not in cache.block_tables


def test_errors_name_the_argument():
    cache = PagedKVCache(4, 4, 1, 2)
    cache.allocate("a")
    cache.reserve("a", 3)
    with pytest.raises(ValueError, match=r"writing positions 2..4 of sequence 'a', longer than"
                                         r" its 3 reserved positions \(1 pages\)"):
        cache.write(0, "a", 2, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"k and v must be \(Hkv, n, D\) = \(1, n, 2\)"):
        cache.write(0, "a", 0, torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))
    with pytest.raises(KeyError, match="sequence 'zz' is not in the cache"):
        cache.reserve("zz", 1)
    with pytest.raises(ValueError, match="sequence 'a' is already in the cache"):
        cache.allocate("a")
    with pytest.raises(ValueError, match="capacity must be an int >= 0, got -1"):
        cache.allocate("b", capacity=-1)
    with pytest.raises(ValueError, match="num_pages must be a positive int, got 0"):
        PagedKVCache(0, 4, 1, 2)
    q = torch.zeros(1, 1, 1, 2)
    pool = torch.zeros(1, 16, 2)
    with pytest.raises(ValueError, match=r"block_table\[1\] = 9 points past the pool of 4 pages"):
        paged_attention(q, pool, pool, [0, 9], 5, page_size=4)
    with pytest.raises(ValueError, match="seq_len = 9 is longer than its 2 pages of 4 tokens"):
        paged_attention(q, pool, pool, [0, 1], 9, page_size=4)
    with pytest.raises(ValueError, match="q has 1 queries but seq_len is 0"):
        paged_attention(q, pool, pool, [0], 0, page_size=4)
    with pytest.raises(ValueError, match=r"k_pool must be \(Hkv, num_pages \* page_size, D\)"):
        paged_attention(q, pool[:, :15], pool, [0], 1, page_size=4)


# --- #23: allocate() with the default capacity=0 read past the free-page list ---------------

def _state(cache):
    return (list(cache._used), {s: list(t) for s, t in cache.block_tables.items()},
            dict(cache.lengths))


@pytest.mark.parametrize("case", ["full pool", "scattered free pages", "fresh one-page pool"])
def test_allocate_empty_sequence_needs_no_page(case):
    if case == "full pool":
        cache = PagedKVCache(2, 4, 1, 2)
        cache.allocate("x", capacity=8)
    elif case == "scattered free pages":
        cache = PagedKVCache(5, 4, 1, 2)
        for s in "abcde":
            cache.allocate(s, capacity=4)
        cache.free("b")
        cache.free("d")  # free pages 1 and 3: no two adjacent
    else:
        cache = PagedKVCache(1, 4, 1, 2)
    before = _state(cache)
    cache.allocate("new")  # was IndexError: list index out of range
    assert cache.block_tables["new"] == [] and cache.lengths["new"] == 0
    used, tables, lengths = before
    assert cache._used == used  # nothing taken
    assert {s: t for s, t in cache.block_tables.items() if s != "new"} == tables
    if case == "full pool":  # growing it is the error, with the pool intact
        with pytest.raises(RuntimeError, match=r"page pool is full: sequence 'new' needs 1 "
                                               r"more page\(s\) of 4 tokens, 0 of 2 are free"):
            cache.reserve("new", 1)
        assert _state(cache)[0] == used and cache.lengths["new"] == 0
    else:  # it grows into the free pages and attends like a contiguous sequence
        g = torch.Generator().manual_seed(0)
        k, v = (torch.randn(1, 4, 2, generator=g, dtype=torch.float64) for _ in range(2))
        cache.k, cache.v = cache.k.double(), cache.v.double()
        _fill(cache, "new", k, v, [3, 1])
        q = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
        torch.testing.assert_close(cache.attend(0, "new", q), _full(q, k, v))


def test_reserve_and_window_checks():
    cache = PagedKVCache(4, 4, 1, 2)
    cache.allocate("a")
    before = _state(cache)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"n must be an int >= 0 \(new positions\), got "
                                             rf"{bad!r}"):
            cache.reserve("a", bad)
    assert _state(cache) == before
    with pytest.raises(ValueError, match="capacity must be an int >= 0, got True"):
        cache.allocate("b", capacity=True)
    q, pool = torch.zeros(1, 1, 1, 2), torch.zeros(1, 16, 2)
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        paged_attention(q, pool, pool, [0], 2, page_size=4, window=0)


@pytest.mark.parametrize("window", [None, 3])
def test_value_head_dim_differs(window):
    g = torch.Generator().manual_seed(2)
    cache_k = torch.randn(2, 24, 8, generator=g, dtype=torch.float64)  # (Hkv, 3 pages * 8, D)
    cache_v = torch.randn(2, 24, 5, generator=g, dtype=torch.float64)  # Dv = 5
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    table, L = [2, 0], 13
    k = torch.cat([cache_k[:, 16:24], cache_k[:, 0:5]], 1)  # (Hkv, 13, D) in position order
    v = torch.cat([cache_v[:, 16:24], cache_v[:, 0:5]], 1)
    out = paged_attention(q, cache_k, cache_v, table, L, page_size=8, window=window)
    assert out.shape == (1, 4, 3, 5)
    torch.testing.assert_close(out, _full(q, k, v, window=window))
