"""Tier 1 and 2: mask descriptions: truth tables, block summaries that never lie, and every
kind through every backend against the float64 math path."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.backends import get_backend
from attnkit.backends.chunked import chunked_attention


def _grid(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


def dense(mod, T, S, B=1, H=1):
    return M.MaskSpec.from_args(mask_mod=mod).dense(T, S, B=B, H=H).expand(B, H, T, S)


def test_two_sided_window_truth_table():
    expected = _grid(["11000", "11100", "01110", "00111", "00011"])
    assert torch.equal(dense(M.sliding_window(1, 1), 5, 5)[0, 0], expected)


def test_causal_explicit_offset_truth_table():
    # A static cache filled up to position 3: query 0 is position 2 of 6 slots.
    expected = _grid(["111000", "111100"])
    assert torch.equal(dense(M.causal(offset=2), 2, 6)[0, 0], expected)
    spec = M.MaskSpec.from_args(causal=True, causal_align=2)
    assert torch.equal(spec.dense(2, 6)[0, 0], expected)


def test_documents_from_ids_and_cu_seqlens_agree():
    ids = torch.tensor([[0, 0, 1, 1, 1]])
    expected = _grid(["10000", "11000", "00100", "00110", "00111"])
    assert torch.equal(dense(M.documents(ids), 5, 5)[0, 0], expected)
    assert torch.equal(dense(M.documents(cu_seqlens=[0, 2, 5]), 5, 5)[0, 0], expected)
    two_sided = dense(M.documents(ids, causal=False), 5, 5)[0, 0]
    assert torch.equal(two_sided, _grid(["11000", "11000", "00111", "00111", "00111"]))


def test_prefix_lm_and_chunked_local_truth_tables():
    assert torch.equal(dense(M.prefix_lm(2), 4, 4)[0, 0],
                       _grid(["1100", "1100", "1110", "1111"]))
    per_sample = dense(M.prefix_lm(torch.tensor([1, 3])), 3, 3, B=2)
    assert torch.equal(per_sample[1, 0], _grid(["111", "111", "111"]))
    assert torch.equal(dense(M.chunked_local(2), 5, 5)[0, 0],
                       _grid(["10000", "11000", "00100", "00110", "00001"]))


def test_query_padding_and_key_padding():
    qp = torch.tensor([[True, False, True]])
    assert torch.equal(dense(M.query_padding(qp), 3, 2)[0, 0], _grid(["11", "00", "11"]))
    kp = torch.tensor([[True, False]])
    assert torch.equal(dense(M.key_padding(kp), 3, 2)[0, 0], _grid(["10", "10", "10"]))


def test_compose_and_describe():
    mod = M.documents(cu_seqlens=[0, 3, 8]) & M.sliding_window(2)
    assert mod.describe() == "same_document(B=1) & causal & window(left=2, right=0)"
    either = M.or_masks(M.causal(), lambda b, h, q, k: k == 0)
    assert "causal | <lambda>" == either.describe()
    assert torch.equal(dense(either, 3, 3)[0, 0], _grid(["100", "110", "111"]))
    both = M.and_masks(M.causal(), M.sliding_window(0, None))  # causal & no earlier key
    assert torch.equal(dense(both, 3, 3)[0, 0], torch.eye(3, dtype=torch.bool))


def test_at_positions_shifts_every_kind():
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    full = dense(M.documents(ids), 6, 6)[0, 0]
    # Queries 4..5 against keys 2..5, as a ring shard or a decode step would see them.
    part = dense(M.at_positions(M.documents(ids), q_offset=4, kv_offset=2), 2, 4)[0, 0]
    assert torch.equal(part, full[4:6, 2:6])


MODS = {
    "window": lambda g: M.sliding_window(3, 0),
    "two_sided": lambda g: M.sliding_window(2, 3),
    "documents": lambda g: M.documents(cu_seqlens=[0, 5, 6, 20, 31], length=31),
    "unsorted_docs": lambda g: M.documents(torch.randint(0, 3, (2, 31), generator=g)),
    "prefix": lambda g: M.prefix_lm(torch.tensor([4, 9])),
    "chunked_local": lambda g: M.chunked_local(7),
    "query_padding": lambda g: M.query_padding(torch.rand(2, 31, generator=g) > 0.3),
    "key_padding": lambda g: M.key_padding(torch.rand(2, 31, generator=g) > 0.3),
    "callable": lambda g: (lambda b, h, q, k: (q + k + h) % 3 != 0),
    "or": lambda g: M.or_masks(M.sliding_window(2, 0), M.prefix_lm(3)),
    "shifted": lambda g: M.at_positions(M.causal(), q_offset=5, kv_offset=0),
    "offset_causal": lambda g: M.causal(offset=-3),
    "per_sample_chunks": lambda g: M.PerSampleChunks(7, torch.tensor([0, 3]), q_offset=2),
    "dilated": lambda g: M.dilated(3, window=9) | M.Dilated(4, offset=1),
    "varlen": lambda g: M.varlen([0, 1, 9, 9, 20, 31], [0, 6, 9, 12, 25, 31], window=(5, -1)),
}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(MODS)), bq=st.integers(1, 12), bk=st.integers(1, 12),
       seed=st.integers(0, 1000))
def test_block_summaries_never_lie(kind, bq, bk, seed):
    """``some`` False => nothing visible in the block; ``every`` True => all visible."""
    T = S = 31
    mod = M.as_mask_mod(MODS[kind](torch.Generator().manual_seed(seed))).resolve(T, S)
    full = M.MaskSpec.from_args(mask_mod=mod).dense(T, S, B=2, H=3).expand(2, 3, T, S)
    q_lo = torch.arange(0, T, bq).view(-1, 1)
    q_hi = (q_lo + bq).clamp(max=T) - 1
    k_lo = torch.arange(0, S, bk).view(1, -1)
    k_hi = (k_lo + bk).clamp(max=S) - 1
    some, every = mod.blocks(q_lo, q_hi, k_lo, k_hi)
    some = torch.broadcast_to(some, (q_lo.shape[0], k_lo.shape[1]))
    every = torch.broadcast_to(every, some.shape)
    for i in range(q_lo.shape[0]):
        for j in range(k_lo.shape[1]):
            block = full[..., q_lo[i, 0]:q_hi[i, 0] + 1, k_lo[0, j]:k_hi[0, j] + 1]
            if not some[i, j]:
                assert not block.any(), (kind, i, j)
            if every[i, j]:
                assert block.all(), (kind, i, j)


def _qkv(T, S, H=4, Hkv=2, D=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, D, generator=g, dtype=dtype).requires_grad_()
            for h, n in ((H, T), (Hkv, S), (Hkv, S))]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(MODS)), block_q=st.integers(1, 20),
       block_k=st.integers(1, 40), seed=st.integers(0, 1000))
def test_chunked_matches_math_for_every_kind(kind, block_q, block_k, seed, chunked_impl):
    """Outputs, lse and gradients in float64, any block size, 31 x 31."""
    q, k, v = _qkv(31, 31, seed=seed)
    spec = M.MaskSpec.from_args(mask_mod=MODS[kind](torch.Generator().manual_seed(seed)))
    ref, ref_lse = attnkit.backends.math_attention(q, k, v, spec, dropout_p=0.0, scale=0.4,
                                                   return_lse=True)
    out, lse = chunked_attention(q, k, v, spec, scale=0.4, return_lse=True, block_q=block_q,
                                 block_k=block_k)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), g),
                    torch.autograd.grad(out, (q, k, v), g)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("backend", [*attnkit.available_backends(), "auto"])
@pytest.mark.parametrize("kind", sorted(MODS))
def test_every_backend_serves_every_kind(backend, kind):
    q, k, v = _qkv(31, 31)
    mod = MODS[kind](torch.Generator().manual_seed(0))
    if backend != "auto":
        why = attnkit.backends.get_backend(backend).why_not(
            q, k, v, M.MaskSpec(mask_mod=mod), dropout_p=0.0, return_lse=False)
        if why:
            pytest.skip(f"{backend}: {why}")
    ref = attnkit.attention(q, k, v, mask_mod=mod, backend="math")
    out = attnkit.attention(q, k, v, mask_mod=mod, backend=backend)
    torch.testing.assert_close(out, ref)


def test_chunked_skips_empty_blocks():
    """A packed batch of 4 documents of 64 visits about a quarter of the 256 x 256 pairs."""
    q, k, v = (t.detach() for t in _qkv(256, 256, H=1, Hkv=1))
    spec = M.MaskSpec.from_args(mask_mod=M.documents(cu_seqlens=[0, 64, 128, 192, 256]))
    from attnkit.backends.chunked import _Layout
    lay = _Layout(q, k, attnkit.spec.Call.of(q, k, spec, False), 64, 64)
    visited = sum((k1 - k0) * (q1 - q0) for q0, q1, blocks in lay.tiles()
                  for k0, k1, _ in blocks)
    assert visited == 4 * 64 * 64
    assert all(not partial for _, _, blocks in lay.tiles() for *_, partial in blocks[:-1])


ERRORS = [
    (lambda: M.documents(), ValueError, "exactly one of document_ids"),
    (lambda: M.documents(cu_seqlens=[1, 3]), ValueError, "starting at 0"),
    (lambda: M.documents(torch.ones(2, 3)), TypeError, "document_ids must be an integer"),
    (lambda: M.documents(torch.ones(3, dtype=torch.long)), ValueError, r"must be \(B, length\)"),
    (lambda: M.sliding_window(-1), ValueError, "left must be a non-negative int"),
    (lambda: M.sliding_window(1, 1.5), ValueError, "right must be a non-negative int"),
    (lambda: M.causal(align="middle"), ValueError, "causal_align must be one of"),
    (lambda: M.chunked_local(0), ValueError, "chunk_size must be a positive int"),
    (lambda: M.key_padding(torch.ones(2, 3)), TypeError, "key_padding_mask must be a bool"),
    (lambda: M.query_padding(torch.ones(3, dtype=torch.bool)), ValueError,
     "query_padding_mask must have 2 dims"),
    (lambda: M.as_mask_mod(3), TypeError, "mask_mod must be a mask description"),
    (lambda: M.MaskSpec.from_args(mask_mod=M.query_padding(torch.ones(2, 4, dtype=torch.bool)))
     .validate(2, 1, 3, 3), ValueError, r"query_padding_mask must have shape \(B, T\)"),
    (lambda: M.MaskSpec.from_args(mask_mod=M.documents(torch.zeros(1, 4, dtype=torch.long)))
     .validate(1, 1, 4, 5), ValueError, "pass kv_document_ids"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[e[2][:28] for e in ERRORS])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_named_backend_refusal_reasons_name_the_capability():
    q, k, v = _qkv(4, 4)
    why = get_backend("sdpa").why_not(q, k, v, M.MaskSpec.from_args(sinks=torch.zeros(4)),
                                      dropout_p=0.0, return_lse=False)
    assert "sinks" in why


MASK_FN_ERRORS = [
    (lambda b, h, q, kv: (q >= kv).float(), r"returned a torch.float32 tensor.*compare"),
    (lambda b, h, q, kv: True, r"returned bool True, not a tensor"),
    (lambda b, h, q, kv: q >= kv if q > kv else q < kv, r"used a tensor as a Python bool.*&"),
    (lambda b, h, q, kv: torch.ones(5, 5, dtype=torch.bool), r"does not broadcast"),
]


@pytest.mark.parametrize("backend", [*attnkit.available_backends(), "auto"])
@pytest.mark.parametrize("fn, match", MASK_FN_ERRORS)
def test_mask_functions_are_checked_before_any_backend(fn, match, backend):
    q, k, v = (t.detach() for t in _qkv(6, 6))
    with pytest.raises(TypeError, match=match):
        attnkit.attention(q, k, v, mask_mod=fn, backend=backend)


@pytest.mark.parametrize("fn, match", [
    (lambda s, b, h, q, kv: s > 0, r"returned a torch.bool tensor.*score"),
    (lambda s, b, h, q, kv: s if q > kv else -s, r"used a tensor as a Python bool"),
])
def test_score_functions_are_checked(fn, match):
    q, k, v = (t.detach() for t in _qkv(6, 6))
    with pytest.raises(TypeError, match=match):
        attnkit.attention(q, k, v, score_mod=fn)


def test_cu_seqlens_that_do_not_cover_the_call_name_themselves():
    q, k, v = (t.detach() for t in _qkv(256, 256))
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 100, 200\] describe 200 positions "
                                         r"but the call has T=256"):
        attnkit.attention(q, k, v, mask_mod=M.documents(cu_seqlens=[0, 100, 200]))
