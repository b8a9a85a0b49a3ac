"""Varlen attention (flash-attn's convention) and the varlen mask kind: truth tables, block
summaries that never lie, every option against a per-sequence float64 reference, gradients,
and every error message."""

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.functional import scaled_dot_product_attention as sdpa_ref
from attnkit.varlen import plan_groups


def _ref(q, k, v, cu_q, cu_k, *, causal=True, window=None, softcap=None, slopes=None,
         sinks=None, scale=None):
    """One sequence at a time with dense masks: ``(total_q, H, D)``."""
    H, Hkv = q.shape[1], k.shape[1]
    outs = []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)  # (H, Lq, D)
        ks = k[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        vs = v[cu_k[s]:cu_k[s + 1]].transpose(0, 1).repeat_interleave(H // Hkv, 0)
        Lq, Lk = qs.shape[1], ks.shape[1]
        if Lk == 0:  # no keys: zeros (Dv columns)
            outs.append(q.new_zeros(Lq, H, v.shape[-1]))
            continue
        p = torch.arange(Lq).view(-1, 1) + Lk - Lq  # (Lq, 1) bottom-right positions
        j = torch.arange(Lk).view(1, -1)
        mask = torch.ones(Lq, Lk, dtype=torch.bool)
        left, right = window if window is not None else (-1, -1)
        if causal:
            right = 0 if right == -1 else min(right, 0)
        if left != -1:
            mask &= j >= p - left
        if right != -1:
            mask &= j <= p + right

        def score_mod(sc, b, h, qi, kj, p=p, j=j):
            if softcap is not None:
                sc = softcap * torch.tanh(sc / softcap)
            if slopes is not None:
                sc = sc - slopes.view(-1, 1, 1) * (p - j).abs()
            return sc
        out = sdpa_ref(qs[None], ks[None], vs[None], mask=mask, scale=scale,
                       score_mod=score_mod, sinks=sinks)[0]
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, 0)


def _packed(lq, lk, H=4, Hkv=2, D=8, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = [0] + torch.tensor(lq).cumsum(0).tolist()
    cu_k = [0] + torch.tensor(lk).cumsum(0).tolist()
    q = torch.randn(cu_q[-1], H, D, generator=g, dtype=dtype)
    k = torch.randn(cu_k[-1], Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(cu_k[-1], Hkv, D, generator=g, dtype=dtype)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, cu_q, cu_k


def test_varlen_mask_truth_table_bottom_right_per_sequence():
    m = M.varlen([0, 1, 3], [0, 3, 5])
    dense = M.MaskSpec(mask_mod=m).dense(3, 5)[0, 0]
    assert dense.int().tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    win = M.MaskSpec(mask_mod=M.varlen([0, 4], causal=False, window=(1, 1))).dense(4, 4)
    assert win[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert "varlen(2 seqs, causal" in m.describe()


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 12)), min_size=1, max_size=5),
       left=st.sampled_from([-1, 0, 2]), right=st.sampled_from([-1, 0, 3]),
       causal=st.booleans(), bq=st.integers(1, 5), bk=st.integers(1, 5))
def test_block_summaries_never_lie(lens, left, right, causal, bq, bk):
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q, cu_k = [0], [0]
    for a, b in zip(lq, lk):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    T, S = cu_q[-1], cu_k[-1]
    if T == 0 or S == 0:
        return
    m = M.varlen(cu_q, cu_k, causal=causal, window=(left, right))
    dense = M.MaskSpec(mask_mod=m).dense(T, S)[0, 0]
    some, every = m.summary(T, S, bq, bk)
    for i in range(some.shape[0]):
        for j in range(some.shape[1]):
            blk = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            assert bool(some[i, j]) or not blk.any()
            assert not bool(every[i, j]) or blk.all()
    # cross-sequence blocks are skipped: a single-sequence query tile never visits another's
    if len(lens) > 1 and all(a > 0 and b > 0 for a, b in lens) and bq == 1 and bk == 1:
        assert int(some.sum()) == int(dense.sum())


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (3, -1)),
                                           (False, (2, 1))])
def test_matches_per_sequence_reference(causal, window):
    # decode-like (1 query over a cache), prefill chunks, an empty sequence, more queries
    # than keys (the first ones see nothing when causal)
    q, k, v, cu_q, cu_k = _packed([1, 5, 0, 7, 3, 4], [9, 300, 2, 7, 3, 2])
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, window=window)
    torch.testing.assert_close(out, _ref(q, k, v, cu_q, cu_k, causal=causal, window=window))


def test_softcap_alibi_sinks_scale_and_gqa():
    q, k, v, cu_q, cu_k = _packed([2, 3, 1, 1], [5, 3, 40, 1], H=4, Hkv=1)
    slopes = attnkit.scores.alibi_slopes(4).double()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    kw = dict(softcap=2.0, alibi_slopes=slopes, sinks=sinks, scale=0.3)
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, **kw)
    ref = _ref(q, k, v, cu_q, cu_k, softcap=2.0, slopes=slopes, sinks=sinks, scale=0.3)
    torch.testing.assert_close(out, ref)


def test_one_sequence_chunk_over_a_cache_split_and_merged():
    # one sequence: a 6-query chunk over 40 keys runs as past + diagonal, merged by LSE
    q, k, v, cu_q, cu_k = _packed([6], [40], H=4, Hkv=2, grad=True)
    slopes = attnkit.scores.alibi_slopes(4).double()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    kw = dict(softcap=2.0, alibi_slopes=slopes, sinks=sinks, scale=0.3)
    out, lse = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True,
                                        **kw)
    ref = _ref(q, k, v, cu_q, cu_k, softcap=2.0, slopes=slopes, sinks=sinks, scale=0.3)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, sinks), g),
                    torch.autograd.grad(ref, (q, k, v, sinks), g)):
        torch.testing.assert_close(a, b)
    qs = q.transpose(0, 1)[None]  # (1, H, 6, D)
    ks, vs = (t.transpose(0, 1).repeat_interleave(2, 0)[None] for t in (k, v))  # (1, H, 40, D)

    def score(sc, b, h, i, j):
        return 2.0 * torch.tanh(sc / 2.0) - slopes.view(-1, 1, 1) * (i + 34 - j).abs()
    _, ref_lse = sdpa_ref(qs, ks, vs, mask=M.causal_mask(6, 40, align="bottom_right"),
                          scale=0.3, sinks=sinks, score_mod=score, return_lse=True)
    torch.testing.assert_close(lse, ref_lse[0])


@pytest.mark.parametrize("backend", ["auto", "math", "chunked", "sdpa"])
def test_exact_gradients(backend):
    q, k, v, cu_q, cu_k = _packed([3, 1, 60], [3, 80, 70], grad=True)
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, backend=backend, causal=True)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = _ref(*ref_in, cu_q, cu_k)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_lse_and_float32_long_packed_rows_use_one_call():
    q, k, v, cu_q, cu_k = _packed([200, 150, 300], [200, 150, 300], dtype=torch.float32)
    out, lse = attnkit.varlen_attention(q, k, v, cu_q, causal=True, return_lse=True,
                                        backend="chunked")
    ref = _ref(q.double(), k.double(), v.double(), cu_q, cu_k)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    assert lse.shape == (4, 650) and lse.dtype == torch.float32
    s = q[0:1, 0] @ k[0:1, 0].T / math.sqrt(8)  # the first query sees only key 0
    torch.testing.assert_close(lse[0, 0], s[0, 0])


def test_plan_groups_merges_small_and_splits_wasteful():
    assert plan_groups([1] * 4, [10] * 4, 64.0) == [(0, 4)]  # tiny: one call
    big = plan_groups([1] * 4, [100_000] * 4, 1024.0)
    assert big == [(0, 1), (1, 2), (2, 3), (3, 4)]  # 2x+ waste of large reads: one each
    assert plan_groups([512, 512], [512, 512], 1024.0) == [(0, 1), (1, 2)]  # long: alone
    assert plan_groups([2, 3, 2], [4, 3, 5], 1024.0) == [(0, 3)]


@pytest.mark.parametrize("cu,match", [
    ([1, 3], "cu_seqlens_q must start at 0"),
    ([0, 3, 2], r"cu_seqlens_q must be non-decreasing .* cu_seqlens_q\[1\] = 3"),
    ([0, 2], "cu_seqlens_q must end at the packed length 3"),
    ([[0, 3]], "cu_seqlens_q must be 1-D"),
])
def test_bad_cu_seqlens_name_the_argument(cu, match):
    q, k, v, _, _ = _packed([3], [3])
    with pytest.raises(ValueError, match=match):
        attnkit.varlen_attention(q, k, v, cu, [0, 3], causal=True)


def test_other_errors():
    q, k, v, cu_q, cu_k = _packed([3], [3])
    with pytest.raises(ValueError, match="cu_seqlens_k must end at the packed length 3"):
        attnkit.varlen_attention(q, k, v, cu_q, [0, 4], causal=True)
    with pytest.raises(ValueError, match="same number of sequences, got 1 and 2"):
        attnkit.varlen_attention(q, k, v, cu_q, [0, 1, 3], causal=True)
    with pytest.raises(TypeError, match="cu_seqlens_q must hold integers"):
        attnkit.varlen_attention(q, k, v, torch.tensor([0.0, 3.0]), cu_k, causal=True)
    with pytest.raises(ValueError, match=r"max_seqlen_q = 2 is below the longest"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=2, causal=True)
    with pytest.raises(ValueError, match=r"q must be packed 3-D \(total_tokens"):
        attnkit.varlen_attention(q[None], k, v, cu_q, cu_k, causal=True)
    with pytest.raises(ValueError, match=r"window must be \(left, right\)"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, window=5, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the packed query length"):
        M.varlen([0, 2]).validate(1, 1, 3, 2)
    with pytest.raises(ValueError, match="cu_seqlens_k must end at the packed key length S = 3"):
        M.varlen([0, 2], [0, 4]).validate(1, 1, 2, 3)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D integer tensor or list"):
        M.varlen(["a", "b"])
    with pytest.raises(ValueError, match="window left must be a non-negative int or None"):
        M.Varlen(torch.tensor([0, 2]), torch.tensor([0, 2]), left=-2)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        attnkit.varlen_attention(q, [1], v, cu_q, cu_k, causal=True)


# --- #23: Dv != D, sinks' log-sum-exp, causal without a default, per-sequence ALiBi ---------

def _packed_dv(lq, lk, Dv, H=4, Hkv=2, D=8, seed=3):
    q, k, _, cu_q, cu_k = _packed(lq, lk, H=H, Hkv=Hkv, D=D, seed=seed)
    v = torch.randn(cu_k[-1], Hkv, Dv, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("lq,lk", [
    ([3], [0]),  # alone: came back (3, H, D) instead of (3, H, Dv)
    ([3, 300], [0, 2000]),  # next to a sequence large enough to run alone: torch.cat failed
    ([3, 2, 1], [0, 4, 6]),  # grouped with small neighbours
])
def test_value_head_dim_with_keyless_sequences(lq, lk):
    q, k, v, cu_q, cu_k = _packed_dv(lq, lk, Dv=5)
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert out.shape == (sum(lq), 4, 5)
    torch.testing.assert_close(out, _ref(q, k, v, cu_q, cu_k))
    torch.testing.assert_close(out[:3], torch.zeros(3, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("lq,lk", [
    ([2, 1], [0, 2]),  # one group: the empty rows come from attention()
    ([2, 600], [0, 2000]),  # the neighbour runs alone: the empty sequence is its own group
    ([2], [0]),  # alone
    ([1, 2, 1], [3, 0, 3]),  # between two small neighbours
])
def test_keyless_queries_lse_is_the_sink_logit_whatever_the_neighbours(lq, lk):
    q, k, v, cu_q, cu_k = _packed(lq, lk, H=2, Hkv=2, dtype=torch.float32)
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    out, lse = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, sinks=sinks,
                                        return_lse=True)
    s = lk.index(0)
    rows = slice(cu_q[s], cu_q[s + 1])
    torch.testing.assert_close(lse[:, rows], sinks.detach().view(2, 1).expand(2, lq[s]))
    torch.testing.assert_close(out[rows], torch.zeros(lq[s], 2, 8))
    # and the same as attention() gives a query that sees no key: d lse / d sink = 1
    grad, = torch.autograd.grad(lse[:, rows].sum(), sinks)
    torch.testing.assert_close(grad, torch.full((2,), float(lq[s])))
    ref = attnkit.attention(q[rows].transpose(0, 1)[None], k[:1].transpose(0, 1)[None],
                            v[:1].transpose(0, 1)[None], mask=torch.zeros(1, 1, dtype=torch.bool),
                            sinks=sinks, return_lse=True)[1]
    torch.testing.assert_close(lse[:, rows], ref[0].detach())


def test_sinks_are_checked_even_when_no_sequence_has_keys():
    q, k, v, cu_q, cu_k = _packed([2], [0], H=2, Hkv=2)
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\) = \(2,\), one per query "
                                         r"head, got \(3,\)"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks must be a 1-D float tensor"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, sinks=torch.zeros(2, 1))


def test_keyless_queries_without_sinks_keep_minus_inf():
    q, k, v, cu_q, cu_k = _packed([2, 600], [0, 2000], dtype=torch.float64)
    _, lse = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :2]).all() and lse.dtype == torch.float64
    assert torch.isfinite(lse[:, 2:]).all()


def test_causal_has_no_default_and_names_the_fix():
    q, k, v, cu_q, cu_k = _packed([3], [3])
    with pytest.raises(TypeError, match=r"needs causal=True or causal=False: it has no "
                                        r"default \(flash-attn's flash_attn_varlen_func "
                                        r"defaults to False"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k)
    with pytest.raises(TypeError, match="causal must be a bool, got int 1"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=1)
    with pytest.raises(TypeError, match="positional"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, 3, 3, True)  # keyword-only
    param = inspect.signature(attnkit.varlen_attention).parameters["causal"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and repr(param.default) == "<required>"


@pytest.mark.parametrize("lq,lk", [([2, 3, 1, 1], [5, 3, 40, 1]), ([6], [40]), ([1, 300], [2, 500])])
def test_per_sequence_alibi_slopes(lq, lk):
    q, k, v, cu_q, cu_k = _packed(lq, lk, H=4, Hkv=2)
    slopes = torch.rand(len(lq), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes)
    ref = torch.cat([_ref(q[cu_q[s]:cu_q[s + 1]], k[cu_k[s]:cu_k[s + 1]], v[cu_k[s]:cu_k[s + 1]],
                          [0, lq[s]], [0, lk[s]], slopes=slopes[s]) for s in range(len(lq))])
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(H,\) = \(4,\) or "
                                         r"\(N, H\) = \(\d+, 4\), got \(2, 2\)"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True,
                                 alibi_slopes=torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"alibi_slopes must be a float tensor \(H,\) or \(N, H\)"):
        attnkit.varlen_attention(q, k, v, cu_q, cu_k, causal=True,
                                 alibi_slopes=torch.ones(1, 1, 4))
