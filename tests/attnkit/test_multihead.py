"""MultiHeadAttention against an independent math reference and torch.nn.MultiheadAttention,
weight import, need_weights, dropout, state_dict, gradients, torch.compile and every error."""

import pytest
import torch
from torch import nn

from attnkit import functional
from attnkit.kv_cache import ContextKV
from attnkit.multihead import MultiHeadAttention
from attnkit.masks import MaskSpec
from attnkit.rope import RoPE
from attnkit.tutorial import MultiHeadAttention as TutorialMHA
from tolerance import assert_within_2x

F64 = torch.float64


def reference(mha, x, context=None, *, key_padding_mask=None, mask=None):
    """The module recomputed from its state_dict with the plain-math spec (no engine)."""
    H, Hkv, D, E = mha.num_heads, mha.num_kv_heads, mha.head_dim, mha.embed_dim
    sd = mha.state_dict()
    if "qkv_proj.weight" in sd:
        w_q, w_kv = sd["qkv_proj.weight"].split((H * D, 2 * Hkv * D))
        b_q, b_kv = (0, 0)
        if mha.qkv_proj.bias is not None:
            b_q, b_kv = sd["qkv_proj.bias"].split((H * D, 2 * Hkv * D))
    else:
        w_q, w_kv = sd["q_proj.weight"], sd["kv_proj.weight"]
        b_q, b_kv = (sd["q_proj.bias"], sd["kv_proj.bias"]) if "q_proj.bias" in sd else (0, 0)
    src = x if context is None else context
    B, T, S = x.shape[0], x.shape[1], src.shape[1]
    q = (x @ w_q.T + b_q).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k, v = (src @ w_kv.T + b_kv).view(B, S, 2, Hkv, D).permute(2, 0, 3, 1, 4)  # (B, Hkv, S, D)
    if mha.rope is not None:
        q, k = mha.rope(q, torch.arange(T)), mha.rope(k, torch.arange(S))
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # (B, H, S, D)
    dense = MaskSpec.from_args(causal=mha.causal, window=mha.window, key_padding_mask=key_padding_mask,
                     mask=mask).dense(T, S)
    out = functional.scaled_dot_product_attention(q, k, v, mask=dense)  # (B, H, T, D)
    return mha.out_proj(out.transpose(1, 2).reshape(B, T, E))  # (B, T, E)


def randn(*shape, dtype=F64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


PADDING = torch.tensor([[True] * 7 + [False] * 4, [True] * 11])
CASES = {
    "plain": ({}, {}),
    "causal_bias": ({"causal": True, "bias": True}, {}),
    "gqa_rope": ({"num_kv_heads": 2, "rope": True, "causal": True}, {}),
    "mqa_window": ({"num_kv_heads": 1, "window": 3}, {}),
    "padding": ({}, {"key_padding_mask": PADDING}),
    "dense_mask": ({"num_kv_heads": 3}, {"mask": randn(2, 1, 11, 11, seed=5) > 0}),
    "cross_fused": ({"bias": True}, {"context": True}),
    "cross_kv_dim": ({"kv_dim": 10, "num_kv_heads": 2}, {"context": True}),
}


@pytest.mark.parametrize("backend", ["auto", "math", "sdpa", "chunked"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_math_reference(case, backend):
    init, call = CASES[case]
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 6, backend=backend, **init).double()
    x = randn(2, 11, 24)
    if call.get("context"):
        call = {"context": randn(2, 9, mha.kv_dim, seed=1)}
    with torch.no_grad():
        torch.testing.assert_close(mha(x, **call), reference(mha, x, **call))


def torch_pair(bias=True, kdim=None, batch_first=True, causal=False):
    """An eval-mode nn.MultiheadAttention (E=16, H=4) and its attnkit copy."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, bias=bias, kdim=kdim, vdim=kdim,
                                batch_first=batch_first).eval()
    return ref, MultiHeadAttention.from_torch(ref, causal=causal)


def test_from_torch_copies_every_weight():
    ref, mha = torch_pair()
    assert torch.equal(mha.qkv_proj.weight, ref.in_proj_weight)
    assert torch.equal(mha.qkv_proj.bias, ref.in_proj_bias)
    assert torch.equal(mha.out_proj.weight, ref.out_proj.weight)
    ref, mha = torch_pair(bias=False, kdim=6)
    assert torch.equal(mha.kv_proj.weight, torch.cat([ref.k_proj_weight, ref.v_proj_weight]))
    assert mha.q_proj.bias is None and mha.out_proj.bias is None


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


@pytest.mark.parametrize("T", [1, 13, 97])
@pytest.mark.parametrize("kind", ["self", "causal", "padding", "cross", "cross_kdim", "no_bias"])
def test_matches_torch_multihead_attention(kind, T):
    ref, mha = torch_pair(bias=kind != "no_bias", kdim=6 if kind == "cross_kdim" else None,
                          causal=kind == "causal")
    x = torch.randn(3, T, 16)
    ctx = torch.randn(3, 5, 6 if kind == "cross_kdim" else 16) if "cross" in kind else x
    ours_kw, torch_kw = {}, {}
    if kind == "causal":  # torch's bool masks are True = blocked, attnkit's True = attend
        torch_kw = {"attn_mask": ~causal(T), "is_causal": True}
    if kind == "padding":
        kpm = torch.rand(3, T) > 0.3
        kpm[:, 0] = True  # torch's need_weights=False path gives NaN for all-padding rows
        ours_kw, torch_kw = {"key_padding_mask": kpm}, {"key_padding_mask": ~kpm}
    expected, _ = ref(x, ctx, ctx, need_weights=False, **torch_kw)
    with torch.no_grad():
        out = mha(x, None if ctx is x else ctx, **ours_kw)
    torch.testing.assert_close(out, expected)


def test_weights_match_torch_and_not_batch_first():
    ref, mha = torch_pair(batch_first=False, causal=True)
    x = torch.randn(9, 2, 16)  # (T, B, E) for the torch module
    expected, expected_w = ref(x, x, x, attn_mask=~causal(9), average_attn_weights=False)
    out, weights = mha(x.transpose(0, 1), need_weights=True)
    torch.testing.assert_close(out.transpose(0, 1), expected)
    torch.testing.assert_close(weights, expected_w)


def test_gqa_equals_full_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    H, Hkv, D = 6, 2, 4
    gqa = MultiHeadAttention(24, H, num_kv_heads=Hkv, causal=True, rope=True, bias=True).double()
    full = MultiHeadAttention(24, H, causal=True, rope=True, bias=True).double()
    w_q, w_k, w_v = gqa.qkv_proj.weight.split((H * D, Hkv * D, Hkv * D))
    b_q, b_k, b_v = gqa.qkv_proj.bias.split((H * D, Hkv * D, Hkv * D))

    def rep(t):  # key/value head j serves query heads j*G .. j*G+G-1
        rest = t.shape[1:]
        return t.view(Hkv, D, *rest).repeat_interleave(H // Hkv, 0).reshape(H * D, *rest)

    with torch.no_grad():
        full.qkv_proj.weight.copy_(torch.cat([w_q, rep(w_k), rep(w_v)]))
        full.qkv_proj.bias.copy_(torch.cat([b_q, rep(b_k), rep(b_v)]))
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        x = randn(2, 10, 24)
        torch.testing.assert_close(gqa(x), full(x))
        assert gqa.qkv_proj.weight.shape[0] < full.qkv_proj.weight.shape[0]


def test_need_weights_rows_sum_to_one_or_zero_when_masked():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, bias=True).double()
    x = randn(2, 6, 16)
    kpm = torch.tensor([[True, True, False, True, False, False], [False] * 6])  # sample 1: all pad
    with pytest.warns(UserWarning, match="key_padding_mask hides every key"):  # sample 1
        out, weights = mha(x, key_padding_mask=kpm, need_weights=True)
    assert weights.shape == (2, 4, 6, 6)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(4, 6, dtype=F64))
    assert (weights[0][..., ~kpm[0]] == 0).all()
    assert (weights[1] == 0).all()
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(6, 16))  # no key: bias only
    with pytest.warns(UserWarning, match="key_padding_mask hides every key"):
        torch.testing.assert_close(out, mha(x, key_padding_mask=kpm))
    out.sum().backward()
    assert torch.isfinite(mha.qkv_proj.weight.grad).all()


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.5, backend="chunked")  # chunked has no dropout
    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match="dropout on attention weights is not implemented"):
        mha(x)  # training mode: p=0.5 reaches the backend
    mha.eval()
    with torch.no_grad():
        no_dropout = mha(x)  # eval mode: the module passes p=0, so chunked can serve it
        mha.backend = "auto"
        torch.testing.assert_close(mha(x), no_dropout)
        mha.train()
        assert not torch.allclose(mha(x), no_dropout)


def test_from_tutorial_gives_identical_outputs():
    torch.manual_seed(0)
    for qkv_bias in (False, True):
        tutorial = TutorialMHA(16, 16, context_length=20, dropout=0.1, num_heads=4,
                               qkv_bias=qkv_bias).eval()
        mha = MultiHeadAttention.from_tutorial(tutorial)
        assert not mha.training and mha.dropout == 0.1 and mha.causal
        assert (mha.qkv_proj.bias is not None) == qkv_bias and mha.out_proj.bias is not None
        x = torch.randn(2, 20, 16)
        with torch.no_grad():
            torch.testing.assert_close(mha(x), tutorial(x))
    with pytest.raises(ValueError, match="d_in == d_out, got d_in=8, d_out=16"):
        MultiHeadAttention.from_tutorial(TutorialMHA(8, 16, 4, 0.0, 2))


def test_converters_leave_the_global_rng_alone():
    ref = nn.MultiheadAttention(16, 4)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    MultiHeadAttention.from_torch(ref)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs,match", [
    ({"add_bias_kv": True}, "add_bias_kv and add_zero_attn"),
    ({"add_zero_attn": True}, "add_bias_kv and add_zero_attn"),
    ({"kdim": 6, "vdim": 8}, r"kdim \(6\) != vdim \(8\)"),
])
def test_from_torch_rejects_what_has_no_equivalent(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, **kwargs))
    with pytest.raises(TypeError, match="needs an nn.MultiheadAttention, got Linear"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


@pytest.mark.parametrize("init,keys", [
    ({"bias": True, "rope": True},
     {"qkv_proj.weight", "qkv_proj.bias", "out_proj.weight", "out_proj.bias"}),
    ({"kv_dim": 6, "num_kv_heads": 1}, {"q_proj.weight", "kv_proj.weight", "out_proj.weight"}),
])
def test_state_dict_round_trip(init, keys):
    torch.manual_seed(0)
    src = MultiHeadAttention(12, 3, **init)
    assert set(src.state_dict()) == keys
    dst = MultiHeadAttention(12, 3, **init)
    dst.load_state_dict(src.state_dict())
    x, ctx = torch.randn(2, 5, 12), (torch.randn(2, 4, 6) if "kv_dim" in init else None)
    with torch.no_grad():
        torch.testing.assert_close(dst(x, ctx), src(x, ctx), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Missing key"):
        MultiHeadAttention(12, 3, kv_dim=7).load_state_dict(MultiHeadAttention(12, 3).state_dict())


@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_gradcheck_float64(backend):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, num_kv_heads=1, causal=True, rope=True, bias=True,
                             backend=backend).double()
    x = randn(2, 3, 8).requires_grad_()
    # The weight is the module's own Parameter: gradcheck perturbs it in place, so the
    # numerical gradient goes through mha(x) without passing it explicitly.
    assert torch.autograd.gradcheck(lambda x, w: mha(x), (x, mha.qkv_proj.weight))


@pytest.mark.parametrize("E,H,Hkv", [(15, 3, 1), (21, 7, 7), (10, 2, 2)])
def test_odd_head_dims(E, H, Hkv):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, num_kv_heads=Hkv, causal=True).double()
    x = randn(2, 97, E)
    with torch.no_grad():
        torch.testing.assert_close(mha(x), reference(mha, x))


def test_autocast_bfloat16_input_is_allowed():
    mha = MultiHeadAttention(16, 4, causal=True)
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # Within 2x of the plain path's error under the same autocast (tests/tolerance.py).
    plain = MultiHeadAttention(16, 4, causal=True, backend="math")
    plain.load_state_dict(mha.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_out = plain(x.bfloat16())
    exact = mha.double()(x.double())
    assert_within_2x(out, plain_out, exact, name="autocast bf16 output")


@pytest.mark.parametrize("kwargs", [
    {}, {"cache": True}, {"context": True}, {"need_weights": True}, {"context_kv": True},
    {"positions": True}, {"cache": True, "positions": True}])
def test_forward_has_no_graph_breaks(kwargs):
    torch.manual_seed(0)
    cross = "context" in kwargs or "context_kv" in kwargs
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, rope=not cross)
    x = torch.randn(2, 5, 16)
    if kwargs.get("cache"):
        kwargs["cache"] = mha.init_cache(2, 8)
    if kwargs.get("context"):
        kwargs["context"] = torch.randn(2, 7, 16)
    if kwargs.pop("context_kv", False):
        kwargs["cache"] = mha.cache_context(torch.randn(2, 7, 16))
    if kwargs.get("positions"):
        kwargs["positions"] = torch.arange(5).expand(2, 5) + torch.tensor([[0], [3]])  # (B, T)
    explanation = torch._dynamo.explain(mha)(x, **kwargs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, \
        explanation.break_reasons


def test_compiled_forward_and_backward_match_eager():
    """AOTAutograd traces the forward and backward graphs inductor would get; no codegen."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, rope=True)
    compiled = torch.compile(mha, backend="aot_eager")
    x = torch.randn(2, 7, 16, requires_grad=True)
    expected = mha(x)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, grad_expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch internals
def test_inductor_compiled_inference_matches_eager():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, rope=True).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mha)(x), mha(x))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"embed_dim": 10, "num_heads": 3}, ValueError,
     r"embed_dim \(10\) must be divisible by num_heads \(3\)"),
    ({"num_kv_heads": 3}, ValueError,
     r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"),
    ({"num_heads": 0}, ValueError, "num_heads must be a positive int, got 0"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    ({"window": 0}, ValueError, "window must be a positive int"),
    ({"backend": "fast"}, ValueError, "unknown backend 'fast'"),
    ({"rope": "yes"}, TypeError, "rope must be True, False/None or an attnkit.rope.RoPE"),
    ({"rope": RoPE(8)}, ValueError, r"rope.head_dim \(8\) must equal the head dim"),
    ({"embed_dim": 12, "rope": True}, ValueError, "rope needs an even head dim .* = 3"),
    ({"kv_dim": 8, "rope": True}, ValueError, "rope applies to self-attention, but kv_dim=8"),
])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(**{"embed_dim": 16, "num_heads": 4, **kwargs})


BOOL = torch.bool
FORWARD_ERRORS = {  # name: (changes to the call of mha(x) below, error, message)
    "rank": (dict(x=torch.randn(5, 16)), ValueError,
             r"x must be \(B, length, embed_dim=16\), got shape \(5, 16\)"),
    "features": (dict(x=torch.randn(2, 5, 8)), ValueError,
                 r"embed_dim=16\), got shape \(2, 5, 8\)"),
    "type": (dict(x=[1.0]), TypeError, "x must be a torch.Tensor, got list"),
    "dtype": (dict(x=torch.randn(2, 5, 16).double()), TypeError,
              "x has dtype torch.float64 but the module's parameters are torch.float32"),
    "device": (dict(x=torch.randn(2, 5, 16, device="meta")), ValueError,
               "x is on meta but the module's parameters are on cpu"),
    "context_features": (dict(context=torch.randn(2, 3, 6)), ValueError,
                         r"context must be \(B, length, kv_dim=16\)"),
    "context_batch": (dict(context=torch.randn(3, 3, 16)), ValueError,
                      "context batch size 3 differs from x's 2"),
    "context_dtype": (dict(context=torch.randn(2, 3, 16).double()), TypeError,
                      "context has dtype torch.float64"),
    "context_cache": (dict(context=torch.randn(2, 3, 16), cache="cache"), ValueError,
                      "cache= and rope apply to self-attention only"),
    "cache_type": (dict(cache={}), TypeError, "cache must be a KVCache from init_cache"),
    "padding_shape": (dict(key_padding_mask=torch.ones(2, 4, dtype=BOOL)), ValueError,
                      r"key_padding_mask must have shape \(B, S\) = \(2, 5\)"),
    "mask_shape": (dict(mask=torch.ones(3, 5, 5, dtype=BOOL)), ValueError,
                   r"does not broadcast to \(B, H, T, S\) = \(2, 4, 5, 5\)"),
    "mask_dtype": (dict(mask=torch.ones(5, 5)), TypeError, "mask must be a bool tensor"),
}


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_errors(case):
    changes, error, match = FORWARD_ERRORS[case]
    mha = MultiHeadAttention(16, 4)
    kwargs = {"x": torch.randn(2, 5, 16), **changes}
    if kwargs.get("cache") == "cache":
        kwargs["cache"] = mha.init_cache(2, 8)
    with pytest.raises(error, match=match):
        mha(kwargs.pop("x"), **kwargs)


def test_cross_only_module_needs_context():
    with pytest.raises(ValueError, match=r"kv_dim=6 features \(cross-attention\); pass context"):
        MultiHeadAttention(16, 4, kv_dim=6)(torch.randn(2, 5, 16))


def test_repr_names_the_configuration():
    text = repr(MultiHeadAttention(16, 4, num_kv_heads=2, kv_dim=8, causal=True))
    assert "num_kv_heads=2" in text and "kv_dim=8" in text and "kv_proj" in text


# --- A precomputed cross-attention context: cache_context() -> ContextKV, passed as cache= ---

CONTEXT_CASES = {
    "fused": {},
    "fused_bias_gqa": {"bias": True, "num_kv_heads": 2},
    "kv_dim_mqa_causal": {"kv_dim": 10, "num_kv_heads": 1, "causal": True},
}


@pytest.mark.parametrize("backend", ["auto", "math", "chunked"])
@pytest.mark.parametrize("case", list(CONTEXT_CASES))
def test_context_kv_equals_context(case, backend):
    """The same operations on the same numbers: identical, with padding and need_weights."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 6, backend=backend, **CONTEXT_CASES[case]).double()
    x, context = randn(2, 5, 24), randn(2, 9, mha.kv_dim, seed=1)
    padding = torch.tensor([[True] * 6 + [False] * 3, [True] * 9])
    kv = mha.cache_context(context)
    assert (kv.batch_size, kv.num_kv_heads, kv.length, kv.head_dim) == (2, mha.num_kv_heads, 9, 4)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": padding}):
            assert torch.equal(mha(x, cache=kv, **kwargs), mha(x, context, **kwargs))
        out, weights = mha(x, cache=kv, key_padding_mask=padding, need_weights=True)
        ref_out, ref_weights = mha(x, context, key_padding_mask=padding, need_weights=True)
        assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)
        torch.testing.assert_close(out, reference(mha, x, context, key_padding_mask=padding))


def test_context_kv_step_by_step_equals_one_forward_and_carries_gradients():
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 6, num_kv_heads=3, bias=True).double()
    x, context = randn(2, 6, 24), randn(2, 9, 24, seed=1)
    kv = mha.cache_context(context)  # once; reused by every step
    steps = torch.cat([mha(x[:, t:t + 1], cache=kv) for t in range(6)], dim=1)  # (B, T, E)
    full = mha(x, context)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-13)
    params = list(mha.parameters())
    grads = torch.autograd.grad(steps.sum(), params)
    for grad, expected in zip(grads, torch.autograd.grad(full.sum(), params)):
        torch.testing.assert_close(grad, expected)


def test_context_kv_errors():
    mha = MultiHeadAttention(16, 4, num_kv_heads=2)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    kv = mha.cache_context(context)
    cases = [
        (dict(context=context, cache=kv), ValueError,
         r"got both context= and a ContextKV in cache=; pass the context either raw"),
        (dict(cache=MultiHeadAttention(16, 4).cache_context(context)), ValueError,
         r"the ContextKV has num_kv_heads=4, head_dim=4 but this module has num_kv_heads=2, "
         r"head_dim=4; make it with this module's cache_context\(\)"),
        (dict(cache=MultiHeadAttention(16, 2).cache_context(context)), ValueError,
         r"has num_kv_heads=2, head_dim=8 but this module has num_kv_heads=2, head_dim=4"),
        (dict(cache=mha.cache_context(torch.randn(3, 3, 16))), ValueError,
         "the ContextKV holds batch size 3 but x has 2"),
        (dict(cache=ContextKV(kv.k.double(), kv.v.double())), TypeError,
         "the ContextKV has dtype torch.float64 but x has torch.float32"),
        (dict(cache=kv, positions=torch.arange(5)), ValueError,
         r"positions= are the rotary positions of self-attention; cross-attention"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mha(x, **kwargs)
    with pytest.raises(ValueError, match="this module uses rope, which applies to "
                                         "self-attention only"):  # a self-attention-only layer
        MultiHeadAttention(16, 4, num_kv_heads=2, rope=True)(x, cache=kv)


@pytest.mark.parametrize("arg, error, match", [
    (torch.randn(2, 3, 8), ValueError, r"context must be \(B, length, kv_dim=16\), got shape"),
    (torch.randn(2, 3, 16).double(), TypeError, "context has dtype torch.float64 but the "
                                                "module's parameters are torch.float32"),
    (torch.randn(2, 3, 16, device="meta"), ValueError, "context is on meta but the module's"),
    ([1.0], TypeError, "context must be a torch.Tensor, got list"),
])
def test_cache_context_errors(arg, error, match):
    with pytest.raises(error, match=match):
        MultiHeadAttention(16, 4).cache_context(arg)


def test_cache_context_refuses_a_rope_module():
    with pytest.raises(ValueError, match=r"cache_context\(\) makes a cross-attention context, "
                                         r"but this module uses rope"):
        MultiHeadAttention(16, 4, rope=True).cache_context(torch.randn(2, 3, 16))


# --- Explicit rotary positions: forward(..., positions=(T,) or (B, T)) ---

ROPE = dict(embed_dim=24, num_heads=6, num_kv_heads=2, rope=True)


@pytest.mark.parametrize("causal", [False, True])
def test_default_positions_are_arange(causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(**ROPE, causal=causal).double()
    x, prefix = randn(2, 7, 24), randn(2, 5, 24, seed=3)
    with torch.no_grad():
        assert torch.equal(mha(x, positions=torch.arange(7)), mha(x))
        assert torch.equal(mha(x, positions=torch.arange(7).expand(2, 7)), mha(x))  # (B, T)
        outs = []
        for positions in (None, torch.arange(5, 12)):  # with a cache: arange(pos, pos + T)
            cache = mha.init_cache(2, 12)
            mha(prefix, cache=cache)
            outs.append(mha(x, cache=cache, positions=positions))
        assert torch.equal(*outs)


def test_per_sample_positions_equal_running_each_sample_alone():
    torch.manual_seed(0)
    mha = MultiHeadAttention(**ROPE, causal=True).double()
    x = randn(3, 6, 24)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12], [0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        out = mha(x, positions=positions)  # (B, T, E)
        for b in range(3):
            torch.testing.assert_close(out[b:b + 1], mha(x[b:b + 1], positions=positions[b]))


def test_left_padded_batch_with_positions_equals_each_sample_unpadded():
    """Per-sample positions start each sample's real tokens at 0 behind its left padding."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(**ROPE, causal=True).double()
    lengths = torch.tensor([6, 4, 1])
    pad = 6 - lengths  # (B,) pad tokens in front
    x = randn(3, 6, 24)
    real = torch.arange(6) >= pad[:, None]  # (B, T) True = real token
    positions = (torch.arange(6) - pad[:, None]).clamp(min=0)  # (B, T)
    with torch.no_grad():
        out = mha(x, key_padding_mask=real, positions=positions)
        for b, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(out[b, 6 - n:], mha(x[b:b + 1, 6 - n:])[0])


def test_shifted_positions_equal_a_cache_at_that_offset():
    """positions=arange(c, c + T) rotates like a cache whose pos is c (its prefix masked)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(**ROPE, causal=True).double()
    c, x = 5, randn(2, 4, 24)
    cache = mha.init_cache(2, c + 4)
    hide_prefix = torch.arange(c + 4).expand(2, c + 4) >= c  # (B, c + T): only the new keys
    with torch.no_grad():
        mha(randn(2, c, 24, seed=2), cache=cache)
        from_cache = mha(x, cache=cache, key_padding_mask=hide_prefix)
        torch.testing.assert_close(mha(x, positions=torch.arange(c, c + 4)), from_cache)


@pytest.mark.parametrize("causal", [False, True])
def test_shifting_every_position_leaves_self_attention_unchanged(causal):
    """RoPE scores depend on positions only through q_pos - k_pos."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(**ROPE, causal=causal).double()
    x = randn(2, 7, 24)
    with torch.no_grad():
        base = mha(x)
        for shift in (3, 1000):
            torch.testing.assert_close(mha(x, positions=torch.arange(7) + shift), base)
        per_sample = torch.arange(7) + torch.tensor([[11], [57]])  # (B, T): a shift per sample
        torch.testing.assert_close(mha(x, positions=per_sample), base)
        assert not torch.allclose(mha(x, positions=torch.arange(7) * 2), base)  # not relative


POSITION_ERRORS = {  # name: (module options, call changes, error, message)
    "no_rope": ({"rope": None}, {}, ValueError,
                "positions= sets rotary positions, but this module has no rope"),
    "float": ({}, {"positions": torch.arange(5.0)}, TypeError,
              r"positions must be an integer tensor such as torch.arange\(T\), got dtype "
              r"torch.float32"),
    "bool": ({}, {"positions": torch.ones(5, dtype=torch.bool)}, TypeError, "got dtype torch.bool"),
    "list": ({}, {"positions": [0, 1, 2, 3, 4]}, TypeError,
             "positions must be an integer torch.Tensor .*, got list"),
    "length": ({}, {"positions": torch.arange(4)}, ValueError,
               r"positions must have shape \(T,\) = \(5,\) or \(B, T\) = \(2, 5\), got \(4,\)"),
    "batch": ({}, {"positions": torch.zeros(3, 5, dtype=torch.long)}, ValueError,
              r"= \(2, 5\), got \(3, 5\)"),
    "device": ({}, {"positions": torch.arange(5, device="meta")}, ValueError,
               "positions is on meta but x is on cpu"),
    "context": ({"rope": None}, {"context": torch.randn(2, 3, 16)}, ValueError,
                "positions= are the rotary positions of self-attention; cross-attention "
                r"\(context= or a ContextKV\) takes none"),
}


@pytest.mark.parametrize("case", list(POSITION_ERRORS))
def test_positions_errors_leave_the_cache_untouched(case):
    init, changes, error, match = POSITION_ERRORS[case]
    mha = MultiHeadAttention(16, 4, **{"rope": True, "causal": True, **init})
    kwargs = {"positions": torch.arange(5), **changes}
    cache = None if "context" in kwargs else mha.init_cache(2, 8)
    with pytest.raises(error, match=match):
        mha(torch.randn(2, 5, 16), cache=cache, **kwargs)
    assert cache is None or cache.pos == 0
