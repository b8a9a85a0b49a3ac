"""The transformers mask function against transformers' own ``sdpa_mask``, its fallback,
and every error message of :mod:`attnkit.integrations.transformers`."""

import importlib
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="needs the hf extra: pip install \"attnkit[hf]\"")
hf = pytest.importorskip("attnkit.integrations.transformers")

from transformers import masking_utils as mu  # noqa: E402

PATTERNS = ["causal", "sliding", "chunked", "bidirectional", "sliding_bidirectional",
            "packed", "packed_sliding", "or_causal_sliding"]


def _mask_function(kind, data, B, T):
    sw = data.draw(st.integers(1, 6), label="window")
    if kind == "causal":
        return mu.causal_mask_function
    if kind == "sliding":
        return mu.sliding_window_causal_mask_function(sw)
    if kind == "chunked":
        left = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=B, max_size=B),
                                      label="left_padding"))
        return mu.chunked_causal_mask_function(data.draw(st.integers(1, 5), label="chunk"),
                                               left)
    if kind == "bidirectional":
        return mu.bidirectional_mask_function
    if kind == "sliding_bidirectional":
        return mu.sliding_window_bidirectional_mask_function(sw)
    if kind == "or_causal_sliding":
        return mu.or_masks(mu.sliding_window_overlay(sw), mu.causal_mask_function)
    # packed: as create_causal_mask builds it from position_ids (no cache, T == S)
    lengths = data.draw(st.lists(st.integers(1, T), min_size=1, max_size=4), label="docs")
    pos = torch.cat([torch.arange(n) for n in lengths])[:T]
    pos = torch.cat([pos, torch.arange(T - pos.numel())]).view(1, T).expand(B, T)
    ids = mu.find_packed_sequence_indices(pos)
    ids = torch.zeros(B, T, dtype=torch.long) if ids is None else ids
    inner = mu.causal_mask_function if kind == "packed" else \
        mu.sliding_window_causal_mask_function(sw)
    return mu.and_masks(mu.remap_positions_for_packed_sequence(inner, pos),
                        mu.packed_sequence_mask_function(ids))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), kind=st.sampled_from(PATTERNS),
       cache=st.sampled_from(["none", "dynamic", "static", "sliding"]))
def test_mask_function_equals_sdpa_mask(data, kind, cache):
    B = data.draw(st.integers(1, 3), label="B")
    T = data.draw(st.integers(1, 7), label="T")
    past = 0 if cache == "none" or kind.startswith("packed") else \
        data.draw(st.integers(0, 9), label="past")
    q_offset, kv_offset, S = past, 0, past + T  # DynamicCache
    if cache == "static":  # kv_length = max_cache_len, a tensor q_offset
        S = past + T + data.draw(st.integers(0, 5), label="spare")
        q_offset = torch.tensor(past)
    elif cache == "sliding":  # a window cache keeps the last keys only
        kv_offset = data.draw(st.integers(0, past), label="kv_offset")
        S = past - kv_offset + T
    if kind.startswith("packed"):
        q_offset, kv_offset, S = 0, 0, T
    fn = _mask_function(kind, data, B, T)
    attention_mask = None
    if data.draw(st.booleans(), label="padding"):
        n = data.draw(st.integers(max(1, kv_offset + S - 3), kv_offset + S), label="mask_len")
        attention_mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * n,
                                                         max_size=B * n))).view(B, n)
    kw = dict(batch_size=B, q_length=T, kv_length=S, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=fn, attention_mask=attention_mask)
    before = sum(hf.dense_fallbacks.values())
    ours = hf.mask_interface(**kw)
    assert not ours.dense and sum(hf.dense_fallbacks.values()) == before, ours.reason
    expected = mu.sdpa_mask(**kw, allow_is_causal_skip=False)
    assert torch.equal(ours.to_dense(), expected.expand(B, 1, T, S)), ours.describe()


def test_descriptions_are_readable_and_carry_the_cache_offset():
    mod = hf.describe_mask_function(mu.sliding_window_causal_mask_function(4), batch_size=1,
                                    q_length=1, kv_length=4, q_offset=9, kv_offset=6)
    assert mod.describe() == "window(left=3, right=0, offset=3)"
    pad = torch.tensor([[False, True, True]])
    mod = hf.describe_mask_function(mu.causal_mask_function, batch_size=1, q_length=3,
                                    kv_length=3, attention_mask=pad)
    assert mod.describe() == "causal & key_padding"
    # a static cache's unfilled tail is hidden by the causal offset: no padding needed
    full = torch.ones(1, 3, dtype=torch.bool)
    mod = hf.describe_mask_function(mu.causal_mask_function, batch_size=1, q_length=3,
                                    kv_length=16, q_offset=torch.tensor(0), attention_mask=full)
    assert mod.describe() == "causal"
    assert hf.describe_mask_function(mu.bidirectional_mask_function, batch_size=1,
                                     q_length=3, kv_length=3) is None


def test_an_unrecognised_closure_falls_back_to_a_counted_dense_mask():
    def image_tokens(b, h, q, k):  # a model's own or_mask_function
        return k < 2

    fn = mu.or_masks(mu.causal_mask_function, image_tokens)
    with pytest.raises(LookupError, match="image_tokens"):
        hf.describe_mask_function(fn, batch_size=1, q_length=4, kv_length=4)
    before = sum(hf.dense_fallbacks.values())
    got = hf.mask_interface(batch_size=1, q_length=4, kv_length=4, mask_function=fn,
                            use_vmap=True)
    assert got.dense and "image_tokens" in got.reason
    assert sum(hf.dense_fallbacks.values()) == before + 1
    expected = mu.sdpa_mask(batch_size=1, q_length=4, kv_length=4, mask_function=fn,
                            allow_is_causal_skip=False, use_vmap=True)
    assert torch.equal(got.to_dense(), expected)


def test_attention_forward_maps_the_call():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    sinks = torch.randn(4)
    mask = hf.mask_interface(batch_size=2, q_length=5, kv_length=7, q_offset=2,
                             mask_function=mu.sliding_window_causal_mask_function(3))
    out, weights = hf.attention_forward(None, q, k, v, mask, scaling=0.3, softcap=2.0,
                                        s_aux=sinks, output_attentions=True)
    ref = __import__("attnkit").attention(q, k, v, causal=True, causal_align=2, window=3,
                                          scale=0.3, softcap=2.0, sinks=sinks)
    assert out.shape == (2, 5, 4, 8) and weights.shape == (2, 4, 5, 7)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_register_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of .*got 'nope'"):
        hf.register("attnkit_x", backend="nope")


def test_register_refuses_transformers_own_names():
    with pytest.raises(ValueError, match="'sdpa' is one of transformers' own"):
        hf.register("sdpa")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        hf.register("")


def test_unregister_only_removes_own_names():
    with pytest.raises(ValueError, match="'eager' was not registered by attnkit"):
        hf.unregister("eager")


def test_attention_forward_rejects_a_foreign_mask_type():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="attention_mask must be an attnkit HFMask.*got dict"):
        hf.attention_forward(None, q, q, q, {})


def test_attention_forward_rejects_a_mask_of_other_lengths():
    q = torch.randn(1, 2, 3, 4)
    mask = hf.mask_interface(batch_size=1, q_length=3, kv_length=5)
    with pytest.raises(ValueError, match=r"built for \(T, S\) = \(3, 5\).*\(3, 3\)"):
        hf.attention_forward(None, q, q, q, mask)
    with pytest.raises(ValueError, match="was built for another call"):
        hf.mask_interface(batch_size=1, q_length=3, kv_length=6, attention_mask=mask)


def _forget_the_integration(monkeypatch):
    import attnkit.integrations as package

    for name in [m for m in sys.modules if m.startswith("attnkit.integrations.transformers")]:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(package, name.rsplit(".", 1)[1], raising=False)


def test_missing_transformers_says_how_to_install(monkeypatch):
    _forget_the_integration(monkeypatch)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "attnkit\[hf\]"'):
        importlib.import_module("attnkit.integrations.transformers")


def test_transformers_4_is_refused(monkeypatch):
    _forget_the_integration(monkeypatch)
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"supports transformers 5.x, found 4.57.1"):
        importlib.import_module("attnkit.integrations.transformers")


def test_import_attnkit_does_not_import_the_integration():
    code = ("import sys, attnkit; bad = [m for m in sys.modules if m == 'transformers' or "
            "m.startswith('attnkit.integrations')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("left_padding", [[0, 0], [3, 70]])
def test_chunked_skipping_is_exact_for_llama4_chunks(left_padding):
    """The per-sample chunk description's block summaries never lie: chunked == math."""
    import attnkit

    mask = hf.mask_interface(batch_size=2, q_length=150, kv_length=230, q_offset=80,
                             mask_function=mu.chunked_causal_mask_function(
                                 48, torch.tensor(left_padding)))
    assert not mask.dense
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 150, 8), torch.randn(2, 2, 230, 8), torch.randn(2, 2, 230, 8)
    ours = attnkit.attention(q, k, v, mask_mod=mask.mask_mod, backend="chunked")
    ref = attnkit.attention(q, k, v, mask_mod=mask.mask_mod, backend="math")
    torch.testing.assert_close(ours, ref)


def test_position_bias_and_a_missing_mask():
    import attnkit

    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 4)
    bias = torch.randn(1, 2, 6, 6)
    out, _ = hf.attention_forward(None, q, q, q, None, position_bias=bias, is_causal=False)
    torch.testing.assert_close(out, attnkit.attention(q, q, q, bias=bias).transpose(1, 2))
    out, _ = hf.attention_forward(None, q, q, q, None, sliding_window=2)  # is_causal default
    ref = attnkit.attention(q, q, q, window=2)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_mask_algebra_the_reader_uses_lives_in_masks():
    from attnkit import masks as M

    merged = M.merge_and(M.Window(left=3, right=None, offset=2), M.Causal(offset=2), None)
    assert merged.describe() == "window(left=3, right=0, offset=2)"
    assert M.merge_and(M.Causal(offset=0), M.Causal(offset=0)).describe() == "causal"
    apart = M.merge_and(M.Causal(offset=0), M.Causal(offset=1))  # other offsets stay apart
    assert isinstance(apart, M.And) and len(apart.parts) == 2
    assert M.merge_and(None, None) is None
    pad = M.KeyPadding(torch.ones(1, 9, dtype=torch.bool))
    assert M.visible_key_bound(M.merge_and(M.Causal(offset=8), pad), T=1) == 9
    assert M.visible_key_bound(pad, T=1) is None
    assert M.depends_on_difference_only(M.merge_and(M.Causal(offset=0), M.Window(left=2)))
    assert not M.depends_on_difference_only(pad)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got \(3,\)"):
        M.PerSampleChunks(4, torch.tensor([0, 1, 2])).validate(2, 1, 4, 4)
    with pytest.raises(TypeError, match="start must be an integer tensor"):
        M.PerSampleChunks(4, torch.tensor([0.5]))
