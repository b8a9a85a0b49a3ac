"""attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention with copied weights
(float64) over its options, ports of torch's own MHA tests (test/nn/test_multihead_attention.py:
the reference comparison with bias_kv / zero_attn / key padding, 3-D masks, no bias, kdim/vdim,
two masks, invalid shapes with torch's messages), state_dict both ways, and the polarity
warning of attnkit's own module."""

import itertools
import warnings

import pytest
import torch
from torch import nn

import attnkit
from attnkit.nn import (MultiheadAttention, MultiheadAttentionShapeError,
                        MultiheadAttentionTypeError)

F64 = torch.float64


def _pair(seed=0, **kw):
    """A torch module with non-trivial biases and its attnkit twin (from_torch)."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(dtype=F64, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases start at 0 in torch: make them count
    return ref, MultiheadAttention.from_torch(ref)


def _inputs(N, L, S, E, kdim, vdim, batch_first, g, self_attn=False):
    def t(n, length, d):
        return torch.randn(*((n, length, d) if batch_first else (length, n, d)), generator=g,
                           dtype=F64)
    q = t(N, L, E)
    if self_attn:
        return q, q, q
    return q, t(N, S, kdim), t(N, S, vdim)


def _assert_same(ours, theirs, rows_seen=None):
    """Outputs and weights equal; rows torch fills with NaN (no visible key) are zeros here."""
    (o, w), (o_ref, w_ref) = ours, theirs
    if rows_seen is not None:
        nan = torch.isnan(o_ref)
        assert torch.equal(nan.any(-1), ~rows_seen)
        o_ref = o_ref.nan_to_num(0.0)
        o = o.masked_fill(nan, 0.0)
        if w_ref is not None:
            w_ref = w_ref.nan_to_num(0.0)
    torch.testing.assert_close(o, o_ref)
    assert (w is None) == (w_ref is None)
    if w is not None:
        torch.testing.assert_close(w, w_ref)


OPTIONS = list(itertools.product([False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("batch_first,bias,add_bias_kv,add_zero_attn", OPTIONS)
def test_matches_torch_over_its_options(batch_first, bias, add_bias_kv, add_zero_attn):
    n = OPTIONS.index((batch_first, bias, add_bias_kv, add_zero_attn))
    cross = n % 2 == 1
    kdim, vdim = (5, 7) if cross else (None, None)
    E, H, N, L, S = 12, 3, 2, 4, 6
    ref, mha = _pair(n, embed_dim=E, num_heads=H, bias=bias, add_bias_kv=add_bias_kv,
                     add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first)
    g = torch.Generator().manual_seed(n)
    q, k, v = _inputs(N, L, S if cross else L, E, kdim or E, vdim or E, batch_first, g,
                      self_attn=not cross)
    for need_weights, average in [(True, True), (True, False), (False, True)]:
        kw = dict(need_weights=need_weights, average_attn_weights=average)
        _assert_same(mha(q, k, v, **kw), ref(q, k, v, **kw))
    # gradients of the inputs and of every parameter
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = mha(qg, kg, vg, need_weights=False)
    out_ref, _ = ref(qg, kg, vg, need_weights=False)
    gout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (qg, kg, vg, *mha.parameters()), gout)
    theirs = torch.autograd.grad(out_ref, (qg, kg, vg, *ref.parameters()), gout)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


MASKS = ["bool kpm", "float kpm", "bool 2-D", "bool 3-D", "float 2-D", "float 3-D",
         "bool both", "float both", "causal hint", "causal hint + kpm", "causal + weights"]


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("batched", [True, False])
def test_masks_in_torch_polarity(kind, batched):
    E, H, N, L = 8, 2, 3, 5
    ref, mha = _pair(1, embed_dim=E, num_heads=H, batch_first=True)
    g = torch.Generator().manual_seed(MASKS.index(kind))
    x = torch.randn(N, L, E, generator=g, dtype=F64)
    kpm = torch.rand(N, L, generator=g) < 0.4  # True = padding
    kpm[:, 0] = False
    blocked = torch.rand(L, L, generator=g) < 0.4  # True = not allowed
    blocked3 = torch.rand(N * H, L, L, generator=g) < 0.4
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)

    def as_float(m):
        return torch.zeros(m.shape, dtype=F64).masked_fill(m, float("-inf"))
    kw = {"bool kpm": dict(key_padding_mask=kpm), "float kpm": dict(key_padding_mask=as_float(kpm)),
          "bool 2-D": dict(attn_mask=blocked), "bool 3-D": dict(attn_mask=blocked3),
          "float 2-D": dict(attn_mask=as_float(blocked) + 0.3 * torch.randn(L, L, dtype=F64)),
          "float 3-D": dict(attn_mask=as_float(blocked3)),
          "bool both": dict(attn_mask=blocked, key_padding_mask=kpm),
          "float both": dict(attn_mask=as_float(blocked), key_padding_mask=as_float(kpm)),
          "causal hint": dict(attn_mask=causal, is_causal=True, need_weights=False),
          "causal hint + kpm": dict(attn_mask=causal, is_causal=True, key_padding_mask=kpm),
          "causal + weights": dict(attn_mask=causal, is_causal=True)}[kind]
    if not batched:
        if kind.endswith("3-D"):
            kw["attn_mask"] = kw["attn_mask"][:H]
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][0]
        x = x[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own (nested tensors, mask types)
        theirs = ref(x, x, x, **kw)
    ours = mha(x, x, x, **kw)
    seen = ~torch.isnan(theirs[0]).any(-1)
    _assert_same(ours, theirs, rows_seen=seen)
    if not bool(seen.all()):  # torch gives NaN there, attnkit zeros: out_proj's bias
        torch.testing.assert_close(ours[0][~seen], mha.out_proj.bias.expand_as(ours[0][~seen]))


def test_dropout_only_in_training():
    ref, mha = _pair(2, embed_dim=8, num_heads=2, dropout=0.5)
    x = torch.randn(4, 2, 8, dtype=F64)
    ref.eval(), mha.eval()
    _assert_same(mha(x, x, x), ref(x, x, x))
    mha.train()
    torch.manual_seed(0)
    a, wa = mha(x, x, x)
    b, _ = mha(x, x, x)
    assert not torch.allclose(a, b)  # dropout applied
    assert (wa == 0).any() and wa.max() > 1.0 / 8  # weights after dropout, scaled by 1/(1-p)


def test_state_dict_both_ways_and_isinstance():
    for kw in (dict(), dict(kdim=3, vdim=5), dict(bias=False, add_bias_kv=True),
               dict(add_zero_attn=True, batch_first=True)):
        ref = nn.MultiheadAttention(12, 4, **kw)
        ours = MultiheadAttention(12, 4, **kw)
        assert isinstance(ours, nn.MultiheadAttention)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        back = nn.MultiheadAttention(12, 4, **kw)
        back.load_state_dict(ours.state_dict())
        for a, b in zip(back.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)
        plain = ours.to_torch()
        assert type(plain) is nn.MultiheadAttention
        x = torch.randn(3, 2, 12)
        key = torch.randn(3, 2, kw.get("kdim", 12))
        value = torch.randn(3, 2, kw.get("vdim", 12))
        if kw.get("batch_first"):
            x, key, value = (t.transpose(0, 1) for t in (x, key, value))
        torch.testing.assert_close(ours(x, key, value)[0], ref(x, key, value)[0])
        torch.testing.assert_close(plain(x, key, value)[0], ref(x, key, value)[0])


def test_from_torch_keeps_mode_dtype_and_rng():
    ref = nn.MultiheadAttention(8, 2, dropout=0.1, dtype=F64).eval()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    ours = MultiheadAttention.from_torch(ref, backend="math")
    assert torch.equal(torch.rand(1), expected)  # converting does not draw from the stream
    assert not ours.training and ours.out_proj.weight.dtype == F64 and ours.backend == "math"
    with pytest.raises(TypeError, match="from_torch needs a torch.nn.MultiheadAttention, got "
                                        "Linear"):
        MultiheadAttention.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend|not registered|no backend"):
        MultiheadAttention(8, 2, backend="nope")


def test_inside_a_transformer_encoder_layer():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0,
                                       batch_first=True, dtype=F64)
    x = torch.randn(2, 7, 16, dtype=F64)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    expected = layer(x, src_key_padding_mask=pad)
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    torch.testing.assert_close(layer(x, src_key_padding_mask=pad), expected)


# --- ports of torch's test/nn/test_multihead_attention.py ------------------------------------

def _torch_style_reference(mha, Q, K, V, kpm, unseen, bias_kv, zero_attn):
    """test_multihead_attention's reference, float64: per-head softmax(QK^T / sqrt(d)) V with
    bias_k/bias_v appended, a zero key appended, -inf where unseen or padded."""
    E, H = mha.embed_dim, mha.num_heads
    d = E // H
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = Q @ wq.T + bq, K @ wk.T + bk, V @ wv.T + bv  # (N, L|S, E)
    N = q.shape[0]
    if bias_kv:
        k = torch.cat([k, mha.bias_k.expand(N, 1, E)], 1)
        v = torch.cat([v, mha.bias_v.expand(N, 1, E)], 1)
        kpm = torch.cat([kpm, torch.zeros(N, 1, dtype=torch.bool)], 1)
        unseen = torch.cat([unseen, torch.ones(unseen.shape[0], 1)], 1)
    q, k, v = (t.view(N, -1, H, d).transpose(1, 2) for t in (q, k, v))
    if zero_attn:
        k = torch.cat([k, torch.zeros(N, H, 1, d, dtype=k.dtype)], 2)
        v = torch.cat([v, torch.zeros(N, H, 1, d, dtype=v.dtype)], 2)
        kpm = torch.cat([kpm, torch.zeros(N, 1, dtype=torch.bool)], 1)
        unseen = torch.cat([unseen, torch.ones(unseen.shape[0], 1)], 1)
    s = q @ k.transpose(-1, -2) / d ** 0.5
    s = s.masked_fill((unseen == 0).view(1, 1, *unseen.shape) | kpm.view(N, 1, 1, -1),
                      float("-inf"))
    w = torch.softmax(s, -1)
    out = (w @ v).transpose(1, 2).reshape(N, -1, E) @ mha.out_proj.weight.T + mha.out_proj.bias
    return out, w


@pytest.mark.parametrize("key_padding,bias_kv,zero_attn,same_embed_dim", [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, False, True, False), (True, True, True, False), (True, False, True, True),
    (True, True, True, True)])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # as in torch's
def test_multihead_attention_reference(key_padding, bias_kv, zero_attn, same_embed_dim,
                                       average):
    g = torch.Generator().manual_seed(int(key_padding) + 2 * int(bias_kv) + 4 * int(zero_attn))
    for _ in range(3):
        batch, seq_len = (int(torch.randint(2, 11, (1,), generator=g)) for _ in range(2))
        d_head = int(torch.randint(3, 11, (1,), generator=g))
        nheads = int(torch.randint(2, 6, (1,), generator=g)) * 2
        d_model = d_head * nheads
        kv_dim = d_model if same_embed_dim else int(torch.randint(5, 21, (1,), generator=g))
        torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
        mha = MultiheadAttention(d_model, nheads, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                 kdim=kv_dim, vdim=kv_dim, dtype=F64)
        kpm = (torch.randint(0, 2, (1, seq_len), generator=g) == 1).expand(batch, -1)
        if not key_padding:
            kpm = torch.zeros_like(kpm)
        decoder_state = torch.rand(batch, d_model, generator=g, dtype=F64)
        K = torch.rand(batch, seq_len, kv_dim, generator=g, dtype=F64)
        unseen = torch.randint(0, 2, (1, seq_len), generator=g).double()
        attn_mask = unseen.masked_fill(unseen == 0, float("-inf")).masked_fill(unseen > 0, 0.0)
        out, w = mha(decoder_state.unsqueeze(0), K.transpose(0, 1), K.transpose(0, 1),
                     key_padding_mask=kpm if key_padding else None, attn_mask=attn_mask,
                     average_attn_weights=average)
        ref, ref_w = _torch_style_reference(mha, decoder_state.unsqueeze(1), K, K, kpm, unseen,
                                            bias_kv, zero_attn)
        ref_w = ref_w.mean(1) if average else ref_w
        seen = ~torch.isnan(ref).any(-1).squeeze(1)  # the test's NaN rows: zeros here
        assert out.shape == (1, batch, d_model)
        torch.testing.assert_close(out[0][seen], ref[:, 0][seen])
        torch.testing.assert_close(w[seen], ref_w[seen])


def test_multihead_attn_3d_attn_mask():
    E, H, N, T, S = 8, 4, 8, 2, 3
    g = torch.Generator().manual_seed(5)
    query = torch.rand(N, T, E, generator=g, dtype=F64)
    key = torch.rand(N, S, E, generator=g, dtype=F64)
    mask = torch.randint(0, 2, (N, T, S), generator=g).double()
    mask = mask.masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)
    mask[:, :, 0] = 0.0  # every query sees a key (torch's rows of NaN aside)
    mha = MultiheadAttention(E, H, dtype=F64)
    out3 = mha(query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1),
               attn_mask=mask.repeat_interleave(H, 0))[0].transpose(0, 1)
    for i in range(N):
        out2 = mha(query[i:i + 1].transpose(0, 1), key[i:i + 1].transpose(0, 1),
                   key[i:i + 1].transpose(0, 1), attn_mask=mask[i])[0]
        torch.testing.assert_close(out3[i:i + 1].transpose(0, 1), out2)


def test_multihead_attn_no_bias_and_projection_weights_none():
    mha = MultiheadAttention(8, 4, bias=False)
    assert mha.in_proj_bias is None and mha.out_proj.bias is None
    q = torch.rand(2, 2, 8, dtype=F64)
    mha = MultiheadAttention(8, 4, bias=False, dtype=F64)
    torch.testing.assert_close(mha(q, q, q)[0], nn.MultiheadAttention.forward(mha, q, q, q)[0])
    mha = MultiheadAttention(4, 4, vdim=2, kdim=2, dtype=F64)  # in_proj_weight is None
    assert mha.in_proj_weight is None
    q, k = torch.rand(4, 4, 4, dtype=F64), torch.rand(4, 4, 2, dtype=F64)
    torch.testing.assert_close(mha(q, k, k)[0], nn.MultiheadAttention.forward(mha, q, k, k)[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_two_masks_match_torch_slow_path(batch_first):
    E, H, N, S = 14, 7, 8, 5
    g = torch.Generator().manual_seed(6)
    x = torch.rand(N, S, E, generator=g, dtype=F64)
    attn_mask = torch.randint(0, 2, (S, S), generator=g).bool()
    kpm = torch.randint(0, 2, (N, S), generator=g).bool()
    merged = attn_mask.view(1, S, S) | kpm.view(N, 1, S)  # (N, S, S) True = blocked
    ref, mha = _pair(7, embed_dim=E, num_heads=H, batch_first=batch_first)
    ref.eval(), mha.eval()
    xi = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        out = mha(xi, xi, xi, attn_mask=attn_mask, key_padding_mask=kpm)[0]
        out_ref = torch.nn.functional.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), E, H, ref.in_proj_weight,
            ref.in_proj_bias, None, None, False, 0.0, ref.out_proj.weight, ref.out_proj.bias,
            training=False, key_padding_mask=kpm, need_weights=False, attn_mask=attn_mask)[0]
    out = out if batch_first else out.transpose(0, 1)
    hidden = merged.all(-1, keepdim=True).expand(N, S, E)  # torch: NaN, attnkit: out_proj bias
    torch.testing.assert_close(out.masked_fill(hidden, 0),
                               out_ref.transpose(0, 1).masked_fill(hidden, 0))


INVALID = [  # torch's _test_multihead_attn_invalid_shape_impl, with its messages
    ((4, 4, 4), (4, 4), (4, 4, 4), {},
     "expected `key` and `value` to be 3-D but found 2-D and 3-D tensors respectively"),
    ((4, 4, 4), (4, 4, 4), (4, 4), {},
     "expected `key` and `value` to be 3-D but found 3-D and 2-D tensors respectively"),
    ((4, 4, 4), (4, 4, 4), (4, 4, 4), dict(key_padding_mask=torch.tensor([False, True] * 2)),
     "expected `key_padding_mask` to be `None` or 2-D but found 1-D tensor instead"),
    ((4, 4, 4), (4, 4, 4), (4, 4, 4), dict(attn_mask=torch.tensor([False, True] * 2)),
     "expected `attn_mask` to be `None`, 2-D or 3-D but found 1-D tensor instead"),
    ((4, 4), (4, 4, 4), (4, 4), {},
     "expected `key` and `value` to be 2-D but found 3-D and 2-D tensors respectively"),
    ((4, 4), (4, 4), (4, 4, 4), {},
     "expected `key` and `value` to be 2-D but found 2-D and 3-D tensors respectively"),
    ((4, 4), (4, 4), (4, 4), dict(key_padding_mask=torch.tensor([[False, True] * 4])),
     "expected `key_padding_mask` to be `None` or 1-D but found 2-D tensor instead"),
    ((4, 4), (4, 4), (4, 4), dict(attn_mask=torch.tensor([False, True] * 2)),
     "expected `attn_mask` to be `None`, 2-D or 3-D but found 1-D tensor instead"),
    ((4, 4), (4, 4), (4, 4), dict(attn_mask=torch.zeros(5, 4, 4, dtype=torch.bool)),
     r"Expected `attn_mask` shape to be \(4, 4, 4\)"),
    ((4,), (4,), (4,), {},
     "query should be unbatched 2D or batched 3D tensor but received 1-D query tensor"),
    ((3, 2, 5), (3, 2, 4), (3, 2, 4), {},
     "was expecting embedding dimension of 4, but got 5"),
    ((3, 2, 4), (3, 2, 4), (2, 2, 4), {},
     r"key shape torch.Size\(\[3, 2, 4\]\) does not match value shape torch.Size\(\[2, 2, "
     r"4\]\)"),
    ((3, 4), (3, 4), (2, 4), {},
     r"key shape torch.Size\(\[3, 1, 4\]\) does not match value shape torch.Size\(\[2, 1, "
     r"4\]\)"),
    ((3, 2, 4), (3, 2, 4), (3, 2, 4), dict(key_padding_mask=torch.zeros(3, 3, dtype=torch.bool)),
     r"Expected key_padded_mask.shape\[0\] to be 2, but got 3"),
]


@pytest.mark.parametrize("q,k,v,kw,match", INVALID)
def test_invalid_shapes_raise_torchs_messages(q, k, v, kw, match):
    mha = MultiheadAttention(4, 4)
    for module in (mha, mha.eval()):
        with pytest.raises(MultiheadAttentionShapeError, match=match) as info:
            module(torch.randn(q), torch.randn(k), torch.randn(v), **kw)
        assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)


def test_other_errors_and_warnings():
    mha = MultiheadAttention(4, 2)
    x = torch.randn(3, 2, 4)
    with pytest.raises(MultiheadAttentionTypeError, match="only bool and floating types of "
                                                          "key_padding_mask are supported, got "
                                                          "torch.int64") as info:
        mha(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long))
    assert isinstance(info.value, TypeError) and isinstance(info.value, AssertionError)
    with pytest.raises(TypeError, match="only bool and floating types of attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match=r"The shape of the 2D attn_mask is torch.Size\(\[3, "
                                           r"2\]\), but should be torch.Size\(\[3, 3\]\)"):
        mha(x, x, x, attn_mask=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"The shape of the 3D attn_mask is .* but should be "
                                           r"torch.Size\(\[4, 3, 3\]\)"):
        mha(x, x, x, attn_mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    cross = MultiheadAttention(4, 2, kdim=3, vdim=5)
    with pytest.raises(MultiheadAttentionShapeError, match=r"key's sequence and batch dims "
                                                           r"torch.Size\(\[3, 2\]\) do not match "
                                                           r"value's torch.Size\(\[4, 2\]\)"):
        cross(x, torch.randn(3, 2, 3), torch.randn(4, 2, 5))
    with pytest.warns(UserWarning, match="Support for mismatched key_padding_mask and attn_mask "
                                         "is deprecated"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool),
            attn_mask=torch.zeros(3, 3))


# --- attnkit's own module: True = attend, and a warning for torch's polarity -------------------

def test_torch_users_path_is_correct_and_attnkits_module_warns():
    torch.manual_seed(8)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, dtype=F64)
    x = torch.randn(3, 6, 16, dtype=F64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])  # torch
    expected, _ = ref(x, x, x, key_padding_mask=pad)
    drop_in = MultiheadAttention.from_torch(ref)  # the drop-in keeps torch's polarity
    torch.testing.assert_close(drop_in(x, x, x, key_padding_mask=pad)[0], expected)
    own = attnkit.MultiHeadAttention.from_torch(ref)  # attnkit's module: True = attend
    with pytest.warns(UserWarning, match=r"key_padding_mask hides every key of some batch row "
                                         r"\(a row with no True\): attnkit's masks are True = "
                                         r"may attend, the opposite of torch.nn.Multihead"):
        wrong = own(x, key_padding_mask=pad)  # torch's mask passed as is: inverted padding
    assert (wrong - expected).abs().max() > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right polarity: no warning, torch's answer
        torch.testing.assert_close(own(x, key_padding_mask=~pad), expected)
        own(x, mask=torch.ones(6, 6, dtype=torch.bool).tril())  # a causal mask is fine
    blocked = torch.ones(6, 6, dtype=torch.bool).triu(1)  # torch's causal attn_mask
    with pytest.warns(UserWarning, match="mask hides every key of some query"):
        own(x, mask=blocked)


@pytest.mark.gpu
def test_on_cuda():  # tier 3
    ref = nn.MultiheadAttention(32, 4, batch_first=True, device="cuda")
    mha = MultiheadAttention.from_torch(ref)
    x = torch.randn(2, 9, 32, device="cuda")
    pad = torch.zeros(2, 9, dtype=torch.bool, device="cuda")
    pad[1, 6:] = True
    out, w = mha(x, x, x, key_padding_mask=pad)
    out_ref, w_ref = ref(x, x, x, key_padding_mask=pad)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
