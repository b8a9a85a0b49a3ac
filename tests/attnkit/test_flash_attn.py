"""attnkit.flash_attn against flash-attn's own interface tests (tests/test_flash_attn.py of
Dao-AILab/flash-attention), ported to CPU sizes: every function is compared with a float64
reference written from flash-attn's documented semantics (bottom-right causal and windows,
softcap on the scaled scores, ALiBi with (nheads,) or (batch, nheads) slopes, GQA/MQA, padding
masks unpadded into varlen batches, KV caches dense and paged, rotary, left padding), outputs,
log-sum-exps and gradients. What cannot be ported is listed in docs/serving.md."""

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import flash_attn as fa
from attnkit.flash_attn import (FlashAttnArgumentError, flash_attn_func,
                                flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

F64 = torch.float64


# --- the reference (flash-attn's semantics, float64) ----------------------------------------

def flash_window(window_size, causal, seqlen_k):
    """The window flash-attn's kernel applies (csrc/flash_attn/flash_api.cpp: mha_fwd and
    set_params_fprop): a side >= seqlen_k is dropped, causal sets the right side to 0, and
    one unbounded side next to a bounded one becomes seqlen_k."""
    left, right = (int(x) for x in window_size)
    left, right = (-1 if x >= seqlen_k else x for x in (left, right))
    right = 0 if causal else right
    if left < 0 and right < 0:
        return -1, -1
    return (seqlen_k if left < 0 else left), (seqlen_k if right < 0 else right)


def attention_ref(q, k, v, query_padding_mask=None, key_padding_mask=None, alibi_slopes=None,
                  causal=False, window_size=(-1, -1), softcap=0.0, key_leftpad=None,
                  scale=None, seqlen_k=None):
    """``(out (B, Sq, H, Dv), lse (B, H, Sq))`` in float64. Per sample, queries are the
    last ``sq`` of ``sk`` positions (lengths from the padding masks); keys before
    ``key_leftpad`` do not count. Rows that see no key: zeros and lse ``+inf``. The window
    goes through flash-attn's rule for ``seqlen_k`` (default ``k``'s length; the kernel's
    ``max_seqlen_k`` for varlen, the cache's capacity for a KV cache)."""
    B, Sq, H, D = q.shape
    Sk, G = k.shape[1], H // k.shape[2]
    window_size = flash_window(window_size, causal, Sk if seqlen_k is None else seqlen_k)
    q, k, v = q.double(), k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * (D ** -0.5 if scale is None else scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq = torch.full((B,), Sq) if query_padding_mask is None else query_padding_mask.sum(-1)
    lp = torch.zeros(B, dtype=torch.long) if key_leftpad is None else key_leftpad.long()
    kpm = torch.ones(B, Sk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    sk = kpm.sum(-1) - lp if key_leftpad is None else kpm.sum(-1)
    i = torch.arange(Sq).view(1, 1, -1, 1)
    j = torch.arange(Sk).view(1, 1, 1, -1) - lp.view(-1, 1, 1, 1)  # key index after left pad
    p = i + (sk - sq).view(-1, 1, 1, 1)  # the query's position among its keys
    left, right = window_size
    right = 0 if causal else right
    visible = kpm.view(B, 1, 1, Sk) & (j >= 0)
    if left >= 0:
        visible = visible & (j >= p - left)
    if right >= 0:
        visible = visible & (j <= p + right)
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().expand(B, H).reshape(B, H, 1, 1)
        s = s - slopes * (p - j).abs()
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, H, Sq)
    w = torch.softmax(s, -1).nan_to_num(0.0)
    if query_padding_mask is not None:
        w = w.masked_fill(~query_padding_mask.view(B, 1, Sq, 1), 0.0)
    out = torch.einsum("bhts,bshd->bthd", w, v)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def unpad(x, mask):
    """flash-attn's bert_padding.unpad_input: ``(packed, indices, cu_seqlens, max_seqlen)``."""
    lens = mask.sum(-1)
    idx = mask.flatten().nonzero()[:, 0]
    cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return x.flatten(0, 1)[idx], idx, cu, int(lens.max())


def pad(x, idx, B, S):
    out = x.new_zeros(B * S, *x.shape[1:])
    return out.index_copy(0, idx, x).view(B, S, *x.shape[1:])


def padding_mask(S, B, g, mode="random"):
    lo = {"random": max(1, S - 20), "third": S // 3}[mode]
    lens = torch.randint(lo, S + 1, (B, 1), generator=g)
    return torch.arange(S).view(1, -1) < lens


def heads(mha_type, H=6):
    return {"mha": H, "mqa": 1, "gqa": 2}[mha_type]


def _window(local, Sk, g):
    return (-1, -1) if not local else tuple(torch.randint(0, Sk, (2,), generator=g))


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


# --- dense batches ---------------------------------------------------------------------------

SHAPES = [(1, 7), (7, 1), (13, 29), (29, 13), (17, 17)]
# flash-attn's grid (causal x local x alibi x softcap x shapes x MHA/MQA/GQA x kvpacked x d)
# thinned for CPU: every (causal, local, alibi, softcap) at two shapes, the rest cycling.
GRID = [(*opts, *SHAPES[(i + j * 2) % len(SHAPES)]) for i, opts in enumerate(
    itertools.product([False, True], [False, True], [False, True], [0.0, 5.0])) for j in (0, 1)]


@pytest.mark.parametrize("causal,local,alibi,softcap,seqlen_q,seqlen_k", GRID)
def test_flash_attn_output(causal, local, alibi, softcap, seqlen_q, seqlen_k):
    n = GRID.index((causal, local, alibi, softcap, seqlen_q, seqlen_k))
    mha_type, kvpacked, d = ["mha", "mqa", "gqa"][n % 3], n % 2 == 1, [8, 13][n % 2]
    g = torch.Generator().manual_seed(n)
    B, H = 2, 6
    Hk = heads(mha_type, H)
    window_size = _window(local, seqlen_k, g)
    q = torch.randn(B, seqlen_q, H, d, generator=g, dtype=F64) * (softcap or 1.0)
    q.requires_grad_()
    kv = torch.randn(B, seqlen_k, 2, Hk, d, generator=g, dtype=F64, requires_grad=True)
    slopes = torch.rand(B, H, generator=g, dtype=F64) * 0.3 if alibi else None
    kw = dict(causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes,
              return_attn_probs=True)
    if kvpacked:
        out, lse, s_dmask = flash_attn_kvpacked_func(q, kv, 0.0, **kw)
    else:
        out, lse, s_dmask = flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], 0.0, **kw)
    ref, ref_lse = attention_ref(q, kv[:, :, 0], kv[:, :, 1], alibi_slopes=slopes,
                                 causal=causal, window_size=window_size, softcap=softcap)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert s_dmask.numel() == 0 and out.is_contiguous()
    gout = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, kv), gout), _grads(ref, (q, kv), gout)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal,local,alibi", [(False, False, False), (True, False, True),
                                                (False, True, False), (True, True, True)])
@pytest.mark.parametrize("seqlen", [1, 17])
def test_flash_attn_qkvpacked(seqlen, causal, local, alibi):
    g = torch.Generator().manual_seed(seqlen)
    B, H, d = 3, 4, 16
    qkv = torch.randn(B, seqlen, 3, H, d, generator=g, dtype=F64, requires_grad=True)
    window_size = _window(local, seqlen, g)
    slopes = torch.rand(H, generator=g, dtype=F64) * 0.3 if alibi else None
    out = flash_attn_qkvpacked_func(qkv, 0.0, None, causal, window_size, 0.0, slopes)
    ref, _ = attention_ref(*qkv.unbind(2), alibi_slopes=slopes, causal=causal,
                           window_size=window_size)
    torch.testing.assert_close(out, ref)
    gout = torch.randn_like(out)
    torch.testing.assert_close(_grads(out, qkv, gout)[0], _grads(ref, qkv, gout)[0])


def test_positional_arguments_scale_and_value_head_dim():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 8, generator=g, dtype=F64)
    k = torch.randn(2, 9, 2, 8, generator=g, dtype=F64)
    v = torch.randn(2, 9, 2, 3, generator=g, dtype=F64)  # Dv != D (flash-attn 3 allows it)
    out = flash_attn_func(q, k, v, 0.0, 0.25, True)  # dropout_p, softmax_scale, causal
    ref, _ = attention_ref(q, k, v, causal=True, scale=0.25)
    assert out.shape == (2, 5, 4, 3)
    torch.testing.assert_close(out, ref)
    # softcap <= 0 is off; window sides >= seqlen_k are unbounded (flash-attn's rules)
    torch.testing.assert_close(flash_attn_func(q, k, v, softcap=-1.0, window_size=(9, 40)),
                               attention_ref(q, k, v)[0])
    # flash-attn's kernel bounds an unbounded right side at seqlen_k next to a bounded left:
    # with 20 queries over 3 keys, query i sits at i - 17 and sees keys j <= i - 14
    q20 = torch.randn(1, 20, 4, 8, generator=g, dtype=F64)
    out, lse, _ = flash_attn_func(q20, k[:1, :3], v[:1, :3], window_size=(2, -1),
                                  return_attn_probs=True)
    assert torch.equal(out[0, :14], torch.zeros(14, 4, 3, dtype=F64))
    assert torch.isposinf(lse[0, :, :14]).all() and torch.isfinite(lse[0, :, 14:]).all()
    torch.testing.assert_close(out, attention_ref(q20, k[:1, :3], v[:1, :3],
                                                  window_size=(2, -1))[0])


def test_dropout_keeps_the_expectation():
    # flash-attn checks its dropout pattern through S_dmask (not produced here, see the docs);
    # the semantics it shares with attnkit: inverted dropout on the weights, E[out] = out.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g, dtype=F64) for _ in range(3))
    ref, _ = attention_ref(q, k, v, causal=True)
    torch.manual_seed(0)
    runs = flash_attn_func(*(t.expand(400, -1, -1, -1) for t in (q, k, v)), 0.17, causal=True)
    assert not torch.allclose(runs[0], ref[0])  # dropout happened, independently per sample
    assert not torch.allclose(runs[0], runs[1])
    torch.testing.assert_close(runs.mean(0), ref[0], atol=0.08, rtol=0)


def test_deterministic_backward():  # port of test_flash_attn_deterministic
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 47, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 47, 2, 8, generator=g, requires_grad=True)
    out = flash_attn_func(q, k, v, 0.0, causal=True, window_size=(5, 3), deterministic=True)
    gout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), gout, retain_graph=True)
    for _ in range(3):
        for a, b in zip(torch.autograd.grad(out, (q, k, v), gout, retain_graph=True), first):
            assert torch.equal(a, b)


def test_bfloat16_within_2x_of_the_plain_implementation():
    from tests.tolerance import assert_within_2x
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g) for _ in range(3))
    exact, _ = attention_ref(q, k, v, causal=True, window_size=(7, 0))
    fast = flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True,
                           window_size=(7, 0))
    plain = attnkit.attention(*(t.bfloat16().transpose(1, 2) for t in (q, k, v)), causal=True,
                              causal_align="bottom_right", window=(7, 0), backend="math")
    assert fast.dtype == torch.bfloat16
    assert_within_2x(fast, plain.transpose(1, 2), exact)


# --- varlen ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,local,alibi,softcap,seqlen_q,seqlen_k", [
    (False, False, False, 0.0, 1, 9), (False, False, False, 0.0, 29, 13),
    (True, False, True, 0.0, 13, 29), (True, False, True, 0.0, 33, 33),
    (False, True, True, 5.0, 29, 13), (False, True, True, 5.0, 1, 9),
    (True, True, False, 5.0, 33, 33), (True, True, False, 5.0, 13, 29),
    (True, False, False, 0.0, 29, 13), (False, False, True, 0.0, 13, 29)])
def test_flash_attn_varlen_output(causal, local, alibi, softcap, seqlen_q, seqlen_k):
    n = seqlen_q + seqlen_k + int(causal) + 2 * int(local) + 4 * int(alibi)
    mha_type, kvpacked = ["mha", "mqa", "gqa"][n % 3], n % 2 == 1
    g = torch.Generator().manual_seed(n)
    B, H, d = 3, 6, 8
    Hk = heads(mha_type, H)
    window_size = _window(local, seqlen_k, g)
    q = (torch.randn(B, seqlen_q, H, d, generator=g, dtype=F64) * (softcap or 1.0))
    k = torch.randn(B, seqlen_k, Hk, d, generator=g, dtype=F64)
    v = torch.randn(B, seqlen_k, Hk, d, generator=g, dtype=F64)
    qpm, kpm = padding_mask(seqlen_q, B, g), padding_mask(seqlen_k, B, g)
    slopes = torch.rand(B, H, generator=g, dtype=F64) * 0.3 if alibi else None
    q_un, idx_q, cu_q, max_q = unpad(q, qpm)
    k_un, _, cu_k, max_k = unpad(k, kpm)
    v_un = unpad(v, kpm)[0]
    q_un, k_un, v_un = (t.requires_grad_() for t in (q_un, k_un, v_un))
    kw = dict(causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=slopes,
              return_attn_probs=True)
    if kvpacked:
        kv_un = torch.stack([k_un, v_un], 1)  # (total_k, 2, Hk, d)
        out_un, lse, _ = flash_attn_varlen_kvpacked_func(q_un, kv_un, cu_q, cu_k, max_q, max_k,
                                                         0.0, **kw)
    else:
        out_un, lse, _ = flash_attn_varlen_func(q_un, k_un, v_un, cu_q, cu_k, max_q, max_k,
                                                0.0, **kw)
    out = pad(out_un, idx_q, B, seqlen_q)
    # the reference on padded tensors, its padding filled with the packed values
    kp = pad(k_un, unpad(k, kpm)[1], B, seqlen_k)
    vp = pad(v_un, unpad(k, kpm)[1], B, seqlen_k)
    qp = pad(q_un, idx_q, B, seqlen_q)
    ref, ref_lse = attention_ref(qp, kp, vp, qpm, kpm, alibi_slopes=slopes, causal=causal,
                                 window_size=window_size, softcap=softcap, seqlen_k=max_k)
    torch.testing.assert_close(out, ref)
    # lse (H, total_q): the reference's rows of real queries, in packed order
    torch.testing.assert_close(lse, ref_lse.transpose(1, 2).flatten(0, 1)[idx_q].T)
    gout = torch.randn_like(out_un)
    for a, b in zip(_grads(out_un, (q_un, k_un, v_un), gout),
                    _grads(ref.flatten(0, 1)[idx_q], (q_un, k_un, v_un), gout)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_qkvpacked(causal):
    g = torch.Generator().manual_seed(4)
    B, S, H, d = 3, 19, 4, 8
    x = torch.randn(B, S, 3, H, d, generator=g, dtype=F64)
    mask = padding_mask(S, B, g, "third")
    qkv_un, idx, cu, max_s = unpad(x, mask)
    qkv_un.requires_grad_()
    out_un = flash_attn_varlen_qkvpacked_func(qkv_un, cu, max_s, 0.0, causal=causal)
    xp = pad(qkv_un, idx, B, S)
    ref, _ = attention_ref(*xp.unbind(2), mask, mask, causal=causal)
    torch.testing.assert_close(pad(out_un, idx, B, S), ref)
    gout = torch.randn_like(out_un)
    torch.testing.assert_close(_grads(out_un, qkv_un, gout)[0],
                               _grads(ref.flatten(0, 1)[idx], qkv_un, gout)[0])


@pytest.mark.parametrize("seqlen_q,seqlen_k,local,paged_kv_block_size", [
    (3, 29, False, None), (29, 13, True, None), (1, 9, False, 4), (3, 29, True, 4),
    (29, 13, False, 8), (1, 9, True, 8)])
def test_flash_attn_varlen_causal(seqlen_q, seqlen_k, local, paged_kv_block_size):
    g = torch.Generator().manual_seed(seqlen_q * seqlen_k + int(local))
    B, H, d = 3, 3, 8
    window_size = _window(local, seqlen_k, g)
    q = torch.randn(B, seqlen_q, H, d, generator=g, dtype=F64)
    if paged_kv_block_size is None:
        k, v = (torch.randn(B, seqlen_k, H, d, generator=g, dtype=F64) for _ in range(2))
    else:
        k, v, table, k_pages, v_pages = _block_kvcache(seqlen_k, paged_kv_block_size, B, H, d, g)
    qpm, kpm = padding_mask(seqlen_q, B, g), padding_mask(seqlen_k, B, g)
    q_un, idx_q, cu_q, max_q = unpad(q, qpm)
    k_un, _, cu_k, max_k = unpad(k, kpm)
    v_un = unpad(v, kpm)[0]
    if paged_kv_block_size is None:
        out_un = flash_attn_varlen_func(q_un, k_un, v_un, cu_q, cu_k, max_q, max_k, 0.0,
                                        causal=True, window_size=window_size)
    else:  # the packed keys of a sequence are the first ones of its block table
        out_un = flash_attn_varlen_func(q_un, k_pages, v_pages, cu_q, cu_k, max_q, max_k, 0.0,
                                        causal=True, window_size=window_size, block_table=table)
    ref, _ = attention_ref(q, k, v, qpm, kpm, causal=True, window_size=window_size,
                           seqlen_k=max_k)
    torch.testing.assert_close(pad(out_un, idx_q, B, seqlen_q), ref)


# --- KV cache ---------------------------------------------------------------------------------

def _block_kvcache(seqlen_k, page, B, Hk, d, g, dtype=F64):
    """A shuffled page pool and the dense caches it holds (flash-attn's _generate_block_kvcache)."""
    num_blocks = math.ceil(seqlen_k / page) * B * 3
    k_pages = torch.randn(num_blocks, page, Hk, d, generator=g, dtype=dtype)
    v_pages = torch.randn(num_blocks, page, Hk, d, generator=g, dtype=dtype)
    table = torch.randperm(num_blocks, generator=g).to(torch.int32).view(B, -1)
    k = k_pages[table.long().flatten()].view(B, -1, Hk, d)[:, :seqlen_k]
    v = v_pages[table.long().flatten()].view(B, -1, Hk, d)[:, :seqlen_k]
    return k, v, table, k_pages, v_pages


def rotary_ref(x, cos, sin, offsets, interleaved):
    """Independent rotary reference: feature pairs as complex numbers times ``e^{i angle}``.
    ``x (B, L, H, D)`` rotated at positions ``offsets[b] + l``."""
    R = 2 * cos.shape[1]
    pos = offsets.long().view(-1, 1) + torch.arange(x.shape[1])  # (B, L)
    rot = torch.complex(cos[pos], sin[pos]).unsqueeze(2)  # (B, L, 1, R/2)
    head = x[..., :R].double()
    if interleaved:
        z = torch.view_as_complex(head.reshape(*head.shape[:-1], R // 2, 2).contiguous())
        out = torch.view_as_real(z * rot).flatten(-2)
    else:
        z = torch.complex(head[..., :R // 2], head[..., R // 2:])
        w = z * rot
        out = torch.cat([w.real, w.imag], -1)
    return torch.cat([out.to(x.dtype), x[..., R:]], -1)


KVCACHE = [  # (seqlen_q, seqlen_k, new_kv, causal, local, alibi, rotary_fraction, interleaved,
    #        paged_kv_block_size, has_leftpad, has_batch_idx, mha_type)
    (1, 13, True, True, False, False, 0.5, True, None, False, False, "mha"),
    (1, 13, False, False, False, True, 0.0, False, 4, False, False, "gqa"),
    (3, 29, True, True, True, False, 1.0, False, None, True, False, "mqa"),
    (3, 29, True, False, False, True, 1.0, True, 8, False, False, "gqa"),
    (8, 20, True, False, True, False, 0.5, False, None, False, True, "mha"),
    (8, 20, False, True, False, True, 0.0, False, None, True, True, "mqa"),
    (16, 16, False, True, True, False, 0.0, True, 4, False, False, "mha"),
    (16, 40, True, True, False, True, 0.5, True, 4, False, False, "mqa"),
    (2, 33, False, False, True, True, 0.0, False, None, False, False, "gqa"),
    (4, 17, True, False, False, False, 0.0, False, None, True, False, "mha"),
]


@pytest.mark.parametrize("case", KVCACHE)
def test_flash_attn_kvcache(case):
    (seqlen_q, seqlen_k, new_kv, causal, local, alibi, rotary_fraction, interleaved,
     page, has_leftpad, has_batch_idx, mha_type) = case
    g = torch.Generator().manual_seed(seqlen_q * 100 + seqlen_k)
    B, H, d = 2, 6, 16
    B_cache = B * 2 if has_batch_idx else B
    Hk = {"mha": 6, "mqa": 1, "gqa": 3}[mha_type]
    R = math.floor(int(rotary_fraction * d) / 4) * 4
    window_size = _window(local, seqlen_k, g)
    q = torch.randn(B, seqlen_q, H, d, generator=g, dtype=F64)
    seqlen_new = seqlen_q if seqlen_q == 1 else int(torch.randint(1, seqlen_q + 1, (1,),
                                                                  generator=g))
    k = torch.randn(B, seqlen_new, Hk, d, generator=g, dtype=F64) if new_kv else None
    v = torch.randn(B, seqlen_new, Hk, d, generator=g, dtype=F64) if new_kv else None
    if page is None:
        k_cache = torch.randn(B_cache, seqlen_k, Hk, d, generator=g, dtype=F64)
        v_cache = torch.randn(B_cache, seqlen_k, Hk, d, generator=g, dtype=F64)
        table = None
    else:
        k_cache, v_cache, table, k_pages, v_pages = _block_kvcache(seqlen_k, page, B, Hk, d, g)
    hi = (seqlen_k - (seqlen_q if (causal or local) and R > 0 else seqlen_new) + 1) if new_kv \
        else seqlen_k + 1
    cache_seqlens = torch.randint(0 if new_kv else 1, hi, (B,), generator=g, dtype=torch.int32)
    leftpad = torch.stack([torch.randint(0, int(s), (1,), generator=g)[0] if s > 0 else
                           torch.tensor(0) for s in cache_seqlens]).to(torch.int32) \
        if has_leftpad else None
    arange = torch.arange(seqlen_k).view(1, -1)
    key_padding_mask = arange < cache_seqlens.view(-1, 1) + (seqlen_new if new_kv else 0)
    if has_leftpad:
        key_padding_mask &= arange >= leftpad.view(-1, 1)
    batch_idx = torch.randperm(B_cache, generator=g)[:B].to(torch.int32) if has_batch_idx \
        else None
    slopes = torch.rand(B, H, generator=g, dtype=F64) * 0.3 if alibi else None
    if R > 0:
        angle = torch.rand(seqlen_k if page is None else k_pages.shape[0] * page, R // 2,
                           generator=g, dtype=F64) * 2 * math.pi
        cos, sin = angle.cos(), angle.sin()
        if causal or local:
            q_ro = rotary_ref(q, cos, sin, cache_seqlens, interleaved)
        else:  # every query at position cache_seqlens
            q_ro = rotary_ref(q.reshape(B, 1, seqlen_q * H, d), cos, sin, cache_seqlens,
                              interleaved).view(B, seqlen_q, H, d)
        k_ro = rotary_ref(k, cos, sin, cache_seqlens, interleaved)
    else:
        cos = sin = None
        q_ro, k_ro = q, k
    k_ref = (k_cache if batch_idx is None else k_cache[batch_idx.long()]).clone()
    v_ref = (v_cache if batch_idx is None else v_cache[batch_idx.long()]).clone()
    if new_kv:
        update = (cache_seqlens.view(-1, 1) <= arange) & \
            (arange < cache_seqlens.view(-1, 1) + seqlen_new)
        k_ref[update] = k_ro.flatten(0, 1)
        v_ref[update] = v.flatten(0, 1)
    out, lse = flash_attn_with_kvcache(
        q, k_cache if page is None else k_pages, v_cache if page is None else v_pages, k, v,
        rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx,
        cache_leftpad=leftpad, block_table=table, causal=causal, window_size=window_size,
        rotary_interleaved=interleaved, alibi_slopes=slopes, return_softmax_lse=True)
    ref, ref_lse = attention_ref(q_ro, k_ref, v_ref, None, key_padding_mask, slopes,
                                 causal=causal, window_size=window_size, key_leftpad=leftpad,
                                 seqlen_k=seqlen_k if page is None else table.shape[1] * page)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    if new_kv:  # appended in place
        if page is None:
            k_sel = k_cache if batch_idx is None else k_cache[batch_idx.long()]
            v_sel = v_cache if batch_idx is None else v_cache[batch_idx.long()]
        else:
            k_sel = k_pages[table.long().flatten()].view(B, -1, Hk, d)[:, :seqlen_k]
            v_sel = v_pages[table.long().flatten()].view(B, -1, Hk, d)[:, :seqlen_k]
        torch.testing.assert_close(k_sel, k_ref)
        assert torch.equal(v_sel, v_ref)


@pytest.mark.parametrize("append_knew", [False, True])
def test_flash_attn_kvcache_paged_block_table_bounds(append_knew):
    page, cap = 4, 4  # one page per sequence
    k_pages, v_pages = torch.randn(4, page, 1, 8), torch.randn(4, page, 1, 8)
    table = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(1, 1, 1, 8)
    k_new = torch.randn(1, 1, 1, 8) if append_knew else None
    seqlens = torch.full((1,), cap if append_knew else cap + 1, dtype=torch.int32)
    match = r"exceeds the capacity addressable by block_table" if append_knew else \
        r"cache_seqlens must lie in \[0, 4\], got 5"
    with pytest.raises(RuntimeError, match=match):
        flash_attn_with_kvcache(q, k_pages, v_pages, k=k_new, v=k_new, cache_seqlens=seqlens,
                                block_table=table)
    assert torch.equal(k_pages, k_pages)  # nothing written: checked before the write
    out = flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=torch.full(
        (1,), cap, dtype=torch.int32), block_table=table)
    assert out.shape == (1, 1, 1, 8) and not out.isnan().any()
    ref, _ = attention_ref(q, k_pages[0:1], v_pages[0:1])
    torch.testing.assert_close(out, ref.float())


def test_kvcache_equal_lengths_is_one_call_and_empty_caches_give_zeros():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 2, 4, 8, generator=g, dtype=F64)
    kc, vc = (torch.randn(3, 10, 2, 8, generator=g, dtype=F64) for _ in range(2))
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6, causal=True)
    torch.testing.assert_close(out, attention_ref(q, kc[:, :6], vc[:, :6], causal=True)[0])
    out = flash_attn_with_kvcache(q, kc, vc)  # no cache_seqlens: the whole cache
    torch.testing.assert_close(out, attention_ref(q, kc, vc)[0])
    out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([0, 3, 0]),
                                       return_softmax_lse=True)
    assert torch.equal(out[0], torch.zeros(2, 4, 8, dtype=F64)) and torch.isposinf(lse[0]).all()
    torch.testing.assert_close(out[1], attention_ref(q[1:2], kc[1:2, :3], vc[1:2, :3])[0][0])


# --- the interface itself -------------------------------------------------------------------

FLASH_SIGNATURES = {  # flash-attn 2's public signatures (flash_attn/flash_attn_interface.py)
    "flash_attn_func": "q k v dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) "
                       "softcap=0.0 alibi_slopes=None deterministic=False "
                       "return_attn_probs=False",
    "flash_attn_qkvpacked_func": "qkv dropout_p=0.0 softmax_scale=None causal=False "
                                 "window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                                 "deterministic=False return_attn_probs=False",
    "flash_attn_kvpacked_func": "q kv dropout_p=0.0 softmax_scale=None causal=False "
                                "window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                                "deterministic=False return_attn_probs=False",
    "flash_attn_varlen_func": "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k "
                              "dropout_p=0.0 softmax_scale=None causal=False "
                              "window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                              "deterministic=False return_attn_probs=False block_table=None",
    "flash_attn_varlen_qkvpacked_func": "qkv cu_seqlens max_seqlen dropout_p=0.0 "
                                        "softmax_scale=None causal=False window_size=(-1, -1) "
                                        "softcap=0.0 alibi_slopes=None deterministic=False "
                                        "return_attn_probs=False",
    "flash_attn_varlen_kvpacked_func": "q kv cu_seqlens_q cu_seqlens_k max_seqlen_q "
                                       "max_seqlen_k dropout_p=0.0 softmax_scale=None "
                                       "causal=False window_size=(-1, -1) softcap=0.0 "
                                       "alibi_slopes=None deterministic=False "
                                       "return_attn_probs=False",
    "flash_attn_with_kvcache": "q k_cache v_cache k=None v=None rotary_cos=None "
                               "rotary_sin=None cache_seqlens=None cache_batch_idx=None "
                               "cache_leftpad=None block_table=None softmax_scale=None "
                               "causal=False window_size=(-1, -1) softcap=0.0 "
                               "rotary_interleaved=True alibi_slopes=None num_splits=0 "
                               "return_softmax_lse=False",
}


@pytest.mark.parametrize("name", sorted(FLASH_SIGNATURES))
def test_same_signatures_and_defaults(name):
    params = inspect.signature(getattr(fa, name)).parameters.values()
    got = " ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                   for p in params)
    assert got == FLASH_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert sorted(fa.__all__) == sorted([*FLASH_SIGNATURES, "FlashAttnArgumentError"])


def _x(*shape):
    return torch.zeros(*shape)


ERRORS = [
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4), 0.1,
                             return_attn_probs=True),
     r"return_attn_probs=True with dropout_p > 0 asks for flash-attn's S_dmask"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4),
                             deterministic=None), "deterministic must be a bool, got None"),
    (lambda: flash_attn_func(_x(2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4)),
     r"q must be \(batch_size, seqlen, nheads, headdim\), got shape \(2, 2, 4\)"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4), window_size=3),
     r"window_size must be a \(left, right\) pair \(-1 = unbounded\), got 3"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4),
                             window_size=(1.5, 0)), "window_size must be an int, got float 1.5"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4), softcap=None),
     r"softcap must be a finite float \(0.0 = off\), got None"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4),
                             alibi_slopes=_x(3)),
     r"alibi_slopes must have shape \(nheads,\) = \(2,\) or \(batch_size, nheads\) = "
     r"\(1, 2\), got \(3,\)"),
    (lambda: flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4),
                             alibi_slopes=torch.ones(2, dtype=torch.long)),
     r"alibi_slopes must be a float tensor \(nheads,\) or \(batch_size, nheads\)"),
    (lambda: flash_attn_qkvpacked_func(_x(1, 2, 2, 2, 4)),
     r"qkv must be \(batch_size, seqlen, 3, nheads, headdim\), got shape \(1, 2, 2, 2, 4\)"),
    (lambda: flash_attn_kvpacked_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4)),
     r"kv must be \(batch_size, seqlen, 2, nheads_k, headdim\), got shape \(1, 2, 2, 4\)"),
    (lambda: flash_attn_varlen_qkvpacked_func(_x(4, 2, 2, 4), [0, 4], 4),
     r"qkv must be \(total, 3, nheads, headdim\), got shape \(4, 2, 2, 4\)"),
    (lambda: flash_attn_varlen_kvpacked_func(_x(4, 2, 4), _x(4, 3, 2, 4), [0, 4], [0, 4], 4, 4),
     r"kv must be \(total_k, 2, nheads_k, headdim\), got shape \(4, 3, 2, 4\)"),
    (lambda: flash_attn_varlen_func(_x(4, 2, 4), _x(3, 4, 2, 4), _x(3, 4, 2, 4), [0, 4],
                                    [0, 4], 4, 4, block_table=torch.zeros(2)),
     r"block_table must be an integer tensor \(batch_size, max_num_blocks_per_seq\)"),
    (lambda: flash_attn_varlen_func(_x(4, 2, 4), _x(12, 2, 4), _x(12, 2, 4), [0, 4], [0, 4],
                                    4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32)),
     r"with block_table, k and v must be the page pools \(num_blocks, page_block_size"),
    (lambda: flash_attn_varlen_func(_x(4, 2, 4), _x(3, 4, 2, 4), _x(3, 4, 2, 4), [0, 4],
                                    [0, 4], 4, 4, block_table=torch.zeros(2, 1, dtype=torch.int32)),
     "block_table has 2 rows but cu_seqlens_k describes 1 sequences"),
    (lambda: flash_attn_varlen_func(_x(4, 2, 4), _x(3, 4, 2, 4), _x(3, 4, 2, 4), [0, 4],
                                    [0, 6], 4, 6, block_table=torch.zeros(1, 1, dtype=torch.int32)),
     r"a sequence of 6 keys exceeds the capacity addressable by block_table"),
    (lambda: flash_attn_varlen_func(_x(4, 2, 4), _x(3, 4, 2, 4), _x(3, 4, 2, 4), [0, 4],
                                    [0, 4], 4, 4, block_table=torch.full((1, 1), 3)),
     "block_table points outside the pool of 3 pages"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     block_table=torch.zeros(1, 1, dtype=torch.int32),
                                     cache_batch_idx=torch.zeros(1, dtype=torch.int32)),
     "Paged KVcache does not support cache_batch_idx"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     block_table=torch.zeros(1, 1, dtype=torch.int32),
                                     cache_leftpad=torch.zeros(1, dtype=torch.int32)),
     "cache_leftpad cannot be combined with block_table"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 5, 2, 4)),
     "k_cache and v_cache must agree on all but the head dim"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     block_table=torch.zeros(2, 1, dtype=torch.int32)),
     r"block_table must be an integer tensor \(batch_size, max_num_blocks_per_seq\) with "
     r"batch_size = 1"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     block_table=torch.full((1, 1), 2, dtype=torch.int32)),
     r"block_table holds page ids outside the pool of 2 pages \(valid 0..1\)"),
    (lambda: flash_attn_with_kvcache(_x(3, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4)),
     "k_cache holds 2 sequences but q has batch_size 3; pass cache_batch_idx"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     cache_batch_idx=torch.tensor([2])),
     r"cache_batch_idx must lie in \[0, 1\], got 2"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     cache_seqlens=torch.tensor([1.0])),
     r"cache_seqlens must be an int or an integer tensor \(batch_size,\) = \(1,\)"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     k=_x(1, 1, 2, 4), cache_seqlens=1),
     "k and v go together: pass both"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     k=_x(1, 1, 2, 4), v=_x(1, 1, 2, 4)),
     "k and v are appended at cache_seqlens: pass cache_seqlens"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     k=_x(1, 1, 1, 4), v=_x(1, 1, 1, 4), cache_seqlens=1),
     r"k and v must be \(batch_size, seqlen_new, nheads_k, headdim\) like the cache"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     k=_x(1, 2, 2, 4), v=_x(1, 2, 2, 4), cache_seqlens=3),
     r"max\(cache_seqlens\) \+ seqlen_new = 5 exceeds the capacity of k_cache "
     r"\(seqlen_cache = 4\)"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     cache_seqlens=2, cache_leftpad=torch.tensor([3])),
     r"cache_leftpad must not pass cache_seqlens \(\+ new tokens\), got \[3\] and \[2\]"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     num_splits=-1), "num_splits must be an int >= 0, got -1"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     rotary_cos=_x(8, 2)),
     "rotary_cos and rotary_sin go together"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     rotary_cos=_x(8, 2), rotary_sin=_x(8, 2)),
     "rotary_cos/rotary_sin rotate the new keys: pass k and v"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     _x(1, 1, 2, 4), _x(1, 1, 2, 4), _x(8, 3), _x(8, 3),
                                     cache_seqlens=1),
     r"rotary_cos and rotary_sin must both be \(seqlen_ro, rotary_dim / 2\) with rotary_dim "
     r"<= headdim = 4, got \(8, 3\)"),
    (lambda: flash_attn_with_kvcache(_x(1, 1, 2, 4), _x(2, 4, 2, 4), _x(2, 4, 2, 4),
                                     _x(1, 1, 2, 4), _x(1, 1, 2, 4), _x(2, 2), _x(2, 2),
                                     cache_seqlens=2),
     r"rotary_cos/rotary_sin have 2 positions but position 2 is needed"),
]


@pytest.mark.parametrize("call,match", ERRORS, ids=range(len(ERRORS)))
def test_errors_are_value_and_runtime_errors_naming_the_argument(call, match):
    with pytest.raises(FlashAttnArgumentError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_a_refused_call_leaves_the_cache_untouched():
    k_cache, v_cache = torch.randn(2, 8, 1, 4), torch.randn(2, 8, 1, 4)
    before = k_cache.clone(), v_cache.clone()
    new = torch.randn(2, 1, 1, 4)
    for bad in (dict(alibi_slopes=_x(5)), dict(num_splits=-1), dict(window_size=None),
                dict(softcap="x"), dict(rotary_cos=_x(8, 2), rotary_sin=_x(3, 2))):
        with pytest.raises(FlashAttnArgumentError):
            flash_attn_with_kvcache(_x(2, 1, 2, 4), k_cache, v_cache, new, new,
                                    cache_seqlens=3, **bad)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_type_errors():
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        flash_attn_func(_x(1, 2, 2, 4), [1], _x(1, 2, 2, 4))
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        flash_attn_func(_x(1, 2, 2, 4), _x(1, 2, 2, 4).double(), _x(1, 2, 2, 4))
    with pytest.raises(TypeError, match="needs causal=True or causal=False"):
        attnkit.varlen_attention(_x(4, 2, 4), _x(4, 2, 4), _x(4, 2, 4), [0, 4])


@pytest.mark.gpu
def test_on_cuda_in_half_precision():  # tier 3: flash-attn's home ground
    from tests.tolerance import assert_within_2x
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 67, n, 64, generator=g) for n in (8, 2, 2))
    exact, _ = attention_ref(q, k, v, causal=True, window_size=(20, 0))
    cq, ck, cv = (t.cuda().half() for t in (q, k, v))
    out = flash_attn_func(cq, ck, cv, causal=True, window_size=(20, 0))
    plain = attnkit.attention(*(t.transpose(1, 2) for t in (cq, ck, cv)), causal=True,
                              causal_align="bottom_right", window=(20, 0), backend="math")
    assert out.device.type == "cuda" and out.dtype == torch.float16
    assert_within_2x(out.cpu(), plain.transpose(1, 2).cpu(), exact)
    k_pages, v_pages = (torch.randn(12, 16, 2, 64, generator=g).cuda().half() for _ in range(2))
    table = torch.randperm(12, generator=g).view(2, 6).to(torch.int32).cuda()
    lens = torch.tensor([40, 75], dtype=torch.int32).cuda()
    out = flash_attn_with_kvcache(cq[:, :1], k_pages, v_pages, ck[:, :1], cv[:, :1],
                                  cache_seqlens=lens, block_table=table, causal=True)
    dense_k = k_pages[table.long().flatten()].view(2, -1, 2, 64)
    dense_v = v_pages[table.long().flatten()].view(2, -1, 2, 64)
    for b, n in enumerate((41, 76)):
        ref, _ = attention_ref(cq[b:b + 1, :1].cpu(), dense_k[b:b + 1, :n].cpu(),
                               dense_v[b:b + 1, :n].cpu(), causal=True)  # half inputs, exact
        torch.testing.assert_close(out[b:b + 1].cpu().double(), ref, atol=2e-3, rtol=2e-3)
