"""KVCache on its own (writes, positions, errors) and through MultiHeadAttention: cached
decoding, token by token or chunk by chunk, equals one full forward. ContextKV on its own
(its use by MultiHeadAttention is tested in test_multihead.py)."""

import dataclasses

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from attnkit.multihead import MultiHeadAttention
from attnkit.kv_cache import ContextKV, KVCache


def kv(B=2, Hkv=3, T=4, D=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype))


def test_update_writes_at_position_and_returns_filled_slots():
    cache = KVCache(2, 3, 10, 5)
    k1, v1 = kv(T=4, seed=1)
    k2, v2 = kv(T=1, seed=2)
    cache.update(k1, v1)
    k, v = cache.update(k2, v2)
    assert cache.pos == 5 and k.shape == v.shape == (2, 3, 5, 5)
    torch.testing.assert_close(k, torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(v, torch.cat([v1, v2], dim=2), rtol=0, atol=0)
    assert cache.k.data_ptr() == k.data_ptr()  # a view of the preallocated buffer, no copy


def test_reset_starts_over_in_the_same_buffers():
    cache = KVCache(2, 3, 6, 5)
    cache.update(*kv(T=6, seed=1))
    buffer = cache.k.data_ptr()
    cache.reset()
    k_new, v_new = kv(T=2, seed=3)
    k, _ = cache.update(k_new, v_new)
    assert cache.pos == 2 and cache.k.data_ptr() == buffer
    torch.testing.assert_close(k, k_new, rtol=0, atol=0)


def test_overfill_says_capacity_and_keeps_state():
    cache = KVCache(2, 3, 6, 5)
    cache.update(*kv(T=4))
    with pytest.raises(RuntimeError, match=r"needs 7 slots but its capacity is max_seq_len=6; "
                                           r"make a larger cache with init_cache"):
        cache.update(*kv(T=3))
    assert cache.pos == 4


def test_update_errors():
    cache = KVCache(2, 3, 6, 5)
    with pytest.raises(ValueError, match="the cache holds batch_size=2 sequences but the input "
                                         "has batch size 1"):
        cache.update(*kv(B=1))
    with pytest.raises(ValueError, match=r"k_new must be \(B, Hkv=3, T, D=5\)"):
        cache.update(*kv(Hkv=2))
    with pytest.raises(TypeError, match="dtype torch.float64 but the cache holds torch.float32"):
        cache.update(*kv(dtype=torch.float64))
    k, v = kv()
    with pytest.raises(ValueError, match="k_new and v_new must have the same shape"):
        cache.update(k, v[:, :, :2])
    assert cache.pos == 0


@pytest.mark.parametrize("name", ["batch_size", "num_kv_heads", "max_seq_len", "head_dim"])
def test_constructor_rejects_bad_sizes(name):
    sizes = {"batch_size": 1, "num_kv_heads": 1, "max_seq_len": 4, "head_dim": 2, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
        KVCache(**sizes)


def test_init_cache_matches_the_layer():
    mha = MultiHeadAttention(24, 6, num_kv_heads=2).double()
    cache = mha.init_cache(3, 17)
    sizes = (cache.batch_size, cache.num_kv_heads, cache.max_seq_len, cache.head_dim)
    assert sizes == (3, 2, 17, 4)
    assert cache.k.dtype == torch.float64 and cache.pos == 0
    assert "max_seq_len=17" in repr(cache)


def decode(mha, x, chunks, capacity=None):
    """Run ``x`` through ``mha`` in pieces of the given lengths with one cache."""
    cache = mha.init_cache(x.shape[0], capacity or x.shape[1])
    outs, start = [], 0
    for n in chunks:
        outs.append(mha(x[:, start:start + n], cache=cache))
        start += n
    assert cache.pos == x.shape[1]
    return torch.cat(outs, dim=1)  # (B, T, E)


MODELS = {
    "mha": dict(embed_dim=24, num_heads=4),
    "gqa_rope": dict(embed_dim=24, num_heads=6, num_kv_heads=2, rope=True),
    "mqa_window": dict(embed_dim=20, num_heads=4, num_kv_heads=1, window=5, bias=True),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("chunks", [[5] + [1] * 40, [7, 1, 13, 2, 1, 21]], ids=["steps", "chunks"])
def test_cached_decoding_equals_full_forward_float64_math(model, chunks):
    torch.manual_seed(0)
    mha = MultiHeadAttention(**MODELS[model], causal=True, backend="math").double().eval()
    x = torch.randn(2, sum(chunks), mha.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        # Exact up to float64 rounding: the only difference is how BLAS blocks the matmuls.
        torch.testing.assert_close(decode(mha, x, chunks), mha(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "chunked"])
def test_cached_decoding_equals_full_forward_float32(backend):
    """float32 fast paths; with chunked also a sliding window seen from the cache."""
    torch.manual_seed(0)
    window = 6 if backend == "chunked" else None  # chunked skips blocks outside the window
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, rope=True, causal=True, window=window,
                             backend=backend).eval()
    x = torch.randn(3, 45, 32)
    with torch.inference_mode():
        full = mha(x)
        torch.testing.assert_close(decode(mha, x, [9] + [1] * 20 + [16], capacity=64), full)


def test_padding_mask_covers_cached_positions():
    """Left padding: key_padding_mask spans every cached position (cache.pos + T)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, causal=True, backend="math").double().eval()
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, :3] = False  # sample 1 starts with 3 pad tokens
    cache = mha.init_cache(2, 8)
    with torch.no_grad():
        outs = [mha(x[:, :5], cache=cache, key_padding_mask=real[:, :5])]
        outs += [mha(x[:, t:t + 1], cache=cache, key_padding_mask=real[:, :t + 1])
                 for t in range(5, 8)]
        torch.testing.assert_close(torch.cat(outs, 1), mha(x, key_padding_mask=real))


def test_module_errors_leave_the_cache_untouched():
    mha = MultiHeadAttention(16, 2, causal=True)
    cache = mha.init_cache(2, 6)
    with torch.no_grad():
        mha(torch.randn(2, 4, 16), cache=cache)
        with pytest.raises(RuntimeError, match="capacity is max_seq_len=6"):
            mha(torch.randn(2, 3, 16), cache=cache)
        with pytest.raises(ValueError, match="batch size 3"):
            mha(torch.randn(3, 1, 16), cache=cache)
        one_key = torch.ones(2, 1, dtype=torch.bool)  # but the step attends over 5 positions
        with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\) = "
                                             r"\(2, 5\)"):
            mha(torch.randn(2, 1, 16), cache=cache, key_padding_mask=one_key)
    assert cache.pos == 4


def test_compiled_decoding_recompiles_a_bounded_number_of_times():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, rope=True, causal=True).eval()
    counter = CompileCounter()  # counts graphs dynamo hands to the backend; no inductor
    step = torch.compile(mha, backend=counter)
    x = torch.randn(1, 24, 16)
    cache = mha.init_cache(1, 32)
    with torch.no_grad():
        outs = [mha(x[:, :4], cache=cache)]  # eager prefill
        for t in range(4, 7):
            outs.append(step(x[:, t:t + 1], cache=cache))
        # One graph for the first step, one once the position turned symbolic; no more.
        after_warmup = counter.frame_count
        for t in range(7, 24):
            outs.append(step(x[:, t:t + 1], cache=cache))
        assert after_warmup <= 2 and counter.frame_count == after_warmup
        torch.testing.assert_close(torch.cat(outs, 1), mha(x))


def test_context_kv_sizes_repr_and_frozen():
    k, v = kv(B=2, Hkv=3, T=7, D=5)
    context = ContextKV(k, v)
    sizes = (context.batch_size, context.num_kv_heads, context.length, context.head_dim)
    assert sizes == (2, 3, 7, 5)
    assert "length=7" in repr(context) and "dtype=torch.float32" in repr(context)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.k = v


def test_context_kv_errors():
    k, v = kv()
    with pytest.raises(TypeError, match="ContextKV.v must be a torch.Tensor, got list"):
        ContextKV(k, [1.0])
    with pytest.raises(ValueError, match=r"ContextKV.k must be \(B, Hkv, S, D\), got shape "
                                         r"\(3, 4, 5\)"):
        ContextKV(k[0], v[0])
    with pytest.raises(ValueError, match=r"ContextKV.v must have k's shape \(2, 3, 4, 5\), got "
                                         r"\(2, 3, 2, 5\)"):
        ContextKV(k, v[:, :, :2])
    with pytest.raises(TypeError, match="ContextKV.k has dtype torch.float32 but v has "
                                        "torch.float64"):
        ContextKV(k, v.double())
