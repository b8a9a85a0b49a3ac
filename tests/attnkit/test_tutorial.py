"""The tutorial ladder: published values, rung against rung, peers, seed bugs, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from attnkit import functional
from attnkit.masks import causal_mask
from attnkit.tutorial import (
    CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, SelfAttentionV1,
    SelfAttentionV2, mask_after_softmax, mask_before_softmax, mha_from_wrapper,
    simple_self_attention, v1_from_v2,
)

# "Your journey starts with one step", 3-d embeddings (rows = tokens), as in the tutorial.
INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                       [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])
BATCH = torch.stack((INPUTS, INPUTS))  # (2, 6, 3)
F64 = torch.float64


def published(actual, expected):
    """The tutorial prints 4 decimals."""
    assert_close(actual, torch.tensor(expected), atol=1e-4, rtol=0)


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- published values (seeded construction reproduces the tutorial's tables) ---------------

def test_simple_attention_published_values():
    context, weights = simple_self_attention(INPUTS)
    published(weights[1], [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    published(context[1], [0.4419, 0.6515, 0.5683])
    published(context[[0, 5]], [[0.4421, 0.5931, 0.5790], [0.4177, 0.6503, 0.5645]])


def test_v1_seed_123_published_values():
    torch.manual_seed(123)
    sa_v1 = SelfAttentionV1(3, 2)
    published(INPUTS[1] @ sa_v1.W_query, [0.4306, 1.4551])  # query_2
    published(sa_v1(INPUTS).detach(), [[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203],
                                       [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]])


def test_v2_seed_789_published_values_and_causal_methods():
    torch.manual_seed(789)
    sa_v2 = SelfAttentionV2(3, 2)
    context, weights = sa_v2(INPUTS, return_weights=True)
    published(context[[0, 5]].detach(), [[-0.0739, 0.0713], [-0.0754, 0.0693]])
    published(weights[0].detach(), [0.1921, 0.1646, 0.1652, 0.1550, 0.1721, 0.1510])
    masked_simple_norm = mask_after_softmax(weights).detach()
    published(masked_simple_norm[2], [0.3800, 0.3097, 0.3103, 0, 0, 0])
    scores = sa_v2.W_query(INPUTS) @ sa_v2.W_key(INPUTS).T
    assert_close(mask_before_softmax(scores, 2).detach(), masked_simple_norm)
    torch.manual_seed(123)
    dropped = torch.nn.Dropout(0.5)(masked_simple_norm)
    published(dropped[2:4], [[0.7599, 0.6194, 0.6206, 0, 0, 0], [0, 0.4921, 0.4925, 0, 0, 0]])


def test_causal_wrapper_mha_seed_123_published_values():
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, 6, 0.0)
    torch.manual_seed(123)
    wrapper = MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    with torch.no_grad():
        ca_out, wrapper_out, mha_out = ca(BATCH), wrapper(BATCH), mha(BATCH)
    assert ca_out.shape == (2, 6, 2) and wrapper_out.shape == (2, 6, 4)
    published(ca_out[1, [0, 5]], [[-0.4519, 0.2216], [-0.5299, -0.1081]])
    published(wrapper_out[0, [0, 5]], [[-0.4519, 0.2216, 0.4772, 0.1063],
                                       [-0.5299, -0.1081, 0.5077, 0.3493]])
    published(mha_out[1], [[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
                           [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]])


# --- rung against rung with copied weights ------------------------------------------------

def test_simple_attention_is_v1_with_identity_weights():
    x = rand(2, 5, 4)
    v1 = SelfAttentionV1(4, 4).double()
    with torch.no_grad():  # (x A)(x A)^T / sqrt(4) = x x^T when A = 4 ** 0.25 * I
        v1.W_query.copy_(torch.eye(4) * 4 ** 0.25)
        v1.W_key.copy_(torch.eye(4) * 4 ** 0.25)
        v1.W_value.copy_(torch.eye(4))
    context, weights = simple_self_attention(x)
    assert_close(v1(x, return_weights=True), (context, weights))


@pytest.mark.parametrize("shape", [(1, 3), (97, 5), (3, 1, 7), (2, 9, 3)])
def test_v2_to_v1_identical(shape):
    torch.manual_seed(1)
    v2 = SelfAttentionV2(shape[-1], 4).double()
    x = rand(*shape)
    assert_close(v1_from_v2(v2)(x), v2(x))


def test_causal_attention_is_v2_weights_masked():
    torch.manual_seed(2)
    ca = CausalAttention(5, 3, 11, 0.5, qkv_bias=True).double().eval()
    v2 = SelfAttentionV2(5, 3, qkv_bias=True).double()
    for name in ("W_query", "W_key", "W_value"):
        getattr(v2, name).load_state_dict(getattr(ca, name).state_dict())
    x = rand(2, 7, 5)  # T < context_length: the buffer is sliced
    _, v2_weights = v2(x, return_weights=True)
    context, weights = ca(x, return_weights=True)
    assert_close(weights, mask_after_softmax(v2_weights))
    assert_close(context, weights @ v2.W_value(x))
    assert_close(context[:, -1], v2(x)[:, -1])  # the last token sees every token


def test_one_head_wrapper_is_causal_attention():
    torch.manual_seed(3)
    wrapper = MultiHeadAttentionWrapper(4, 3, 8, 0.0, num_heads=1).double()
    x = rand(3, 8, 4)
    assert_close(wrapper(x), wrapper.heads[0](x))


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("num_heads,head_width,T", [(2, 1, 6), (3, 2, 1), (2, 5, 97)])
def test_wrapper_to_mha_identical(qkv_bias, num_heads, head_width, T):
    torch.manual_seed(4)
    wrapper = MultiHeadAttentionWrapper(7, head_width, 97, 0.0, num_heads, qkv_bias).double()
    mha = mha_from_wrapper(wrapper)
    assert mha.d_out == num_heads * head_width and mha.head_dim == head_width
    x = rand(2, T, 7)
    out, weights = mha(x, return_weights=True)
    ref_out, ref_weights = wrapper(x, return_weights=True)
    assert_close(out, ref_out)
    assert_close(weights, ref_weights)


def test_converters_leave_the_global_rng_alone():
    wrapper, v2 = MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2), SelfAttentionV2(3, 2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mha_from_wrapper(wrapper), v1_from_v2(v2)
    assert_close(torch.rand(3), expected)


# --- against the spec and against torch ----------------------------------------------------

def mha_via_functional(mha, x):
    """The same projections, attention from attnkit.functional (the spec)."""
    B, T, _ = x.shape
    def split(layer):
        return layer(x).view(B, T, mha.num_heads, mha.head_dim).transpose(1, 2)  # (B, H, T, D)
    out, weights = functional.scaled_dot_product_attention(
        split(mha.W_query), split(mha.W_key), split(mha.W_value), causal=True,
        return_weights=True)  # (B, H, T, D), (B, H, T, T)
    return mha.out_proj(out.transpose(1, 2).reshape(B, T, mha.d_out)), weights  # (B, T, d_out)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 12), d_in=st.integers(1, 7),
       num_heads=st.integers(1, 3), head_dim=st.integers(1, 4), qkv_bias=st.booleans())
def test_mha_matches_functional_any_shape(B, T, d_in, num_heads, head_dim, qkv_bias):
    torch.manual_seed(T)
    mha = MultiHeadAttention(d_in, num_heads * head_dim, 12, 0.3, num_heads, qkv_bias)
    mha = mha.double().eval()
    x = rand(B, T, d_in, seed=B)
    assert_close(mha(x, return_weights=True), mha_via_functional(mha, x))


def test_mha_matches_functional_long_odd():
    torch.manual_seed(6)
    mha = MultiHeadAttention(5, 9, 128, 0.0, num_heads=3, qkv_bias=True).double()
    x = rand(2, 97, 5)
    assert_close(mha(x, return_weights=True), mha_via_functional(mha, x))


@pytest.mark.parametrize("T", [1, 6, 13])
def test_mha_matches_torch_multihead_attention(T):
    torch.manual_seed(7)
    mha = MultiHeadAttention(8, 8, 16, 0.0, num_heads=4, qkv_bias=True).double()
    peer = torch.nn.MultiheadAttention(8, 4, bias=True, batch_first=True, dtype=F64)
    with torch.no_grad():
        peer.in_proj_weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight,
                                             mha.W_value.weight]))  # (3 * E, E)
        peer.in_proj_bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        peer.out_proj.load_state_dict(mha.out_proj.state_dict())
    x = rand(3, T, 8)
    # torch's bool attn_mask is True = BLOCKED: the negation of attnkit's causal_mask.
    out, weights = peer(x, x, x, attn_mask=~causal_mask(T), average_attn_weights=False)
    assert_close(mha(x, return_weights=True), (out, weights))
    assert torch.equal(mha.mask[:T, :T], ~causal_mask(T))  # the buffer marks blocked cells


def test_gradcheck_float64():
    torch.manual_seed(8)
    mha = MultiHeadAttention(3, 4, 5, 0.0, num_heads=2, qkv_bias=True).double()
    x = rand(2, 5, 3).requires_grad_()
    assert torch.autograd.gradcheck(mha, (x,))
    v1 = SelfAttentionV1(3, 2).double()
    assert torch.autograd.gradcheck(v1, (rand(4, 3).requires_grad_(),))
    assert torch.autograd.gradcheck(lambda w: mask_after_softmax(w.softmax(-1)),
                                    (rand(2, 4, 4).requires_grad_(),))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), S=st.integers(1, 9), d_k=st.integers(1, 8),
       batch=st.integers(1, 2), seed=st.integers(0, 2**16), custom=st.booleans())
def test_two_causal_methods_agree(T, S, d_k, batch, seed, custom):
    scores = rand(batch, T, S, seed=seed)
    mask = None
    if custom:  # random masks, fully blocked rows included: both give zeros there
        mask = torch.rand(T, S, generator=torch.Generator().manual_seed(seed)) > 0.5
    weights = mask_after_softmax(torch.softmax(scores / d_k ** 0.5, dim=-1), mask)
    assert_close(mask_before_softmax(scores, d_k, mask), weights)
    expected = causal_mask(T, S) if mask is None else mask
    assert (weights[..., ~expected] == 0).all()
    assert_close(weights.sum(-1), expected.any(-1).to(F64).expand(batch, T))


def test_dropout_only_in_training_mode():
    torch.manual_seed(9)
    mha = MultiHeadAttention(4, 4, 8, 0.5, num_heads=2).double()
    x = rand(2, 8, 4)
    _, train_weights = mha(x, return_weights=True)
    mha.eval()
    out, weights = mha(x, return_weights=True)
    assert_close(mha(x), out)  # eval is deterministic
    kept = train_weights != 0
    assert (~kept & (weights > 0)).any(), "training mode must drop some weights"
    assert_close(train_weights[kept], 2 * weights[kept])  # survivors scaled by 1 / (1 - p)
    ca = CausalAttention(4, 4, 8, 0.5).double().eval()
    assert_close(ca(x), ca(x))


# --- the seed's bugs: two are silent at head_dim = 1, so the ladder is tested at D > 1 -----

def test_seed_star_instead_of_matmul_is_silent_only_at_head_dim_1():
    for D, T in ((1, 6), (2, 6), (3, 3)):
        q, k = rand(2, 2, T, D, seed=D), rand(2, 2, T, D, seed=D + 10)  # (B, H, T, D)
        right = q @ k.transpose(2, 3)  # (B, H, T, T)
        if D == 1:  # (T, 1) * (1, T) broadcasts to the outer product, which is q @ k^T
            assert_close(q * k.transpose(2, 3), right)
        elif D == T:  # shapes agree, so it runs, elementwise: silently wrong
            assert not torch.allclose(q * k.transpose(2, 3), right)
        else:
            with pytest.raises(RuntimeError, match="must match the size"):
                q * k.transpose(2, 3)


def test_seed_view_without_contiguous_is_silent_only_at_head_dim_1():
    for D in (1, 2):
        context = rand(2, 3, 5, D).transpose(1, 2)  # (B, T, H, D), not contiguous
        if D == 1:  # merging H with a size-1 dim needs no copy: works, same values
            assert_close(context.view(2, 5, 3), context.reshape(2, 5, 3))
        else:
            with pytest.raises(RuntimeError, match="view size is not compatible"):
                context.view(2, 5, 3 * D)
    mha = MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)  # head_dim 2: our fix is exercised
    assert mha(BATCH).shape == (2, 6, 4)


def test_seed_tril_diagonal_1_buffer_lets_each_token_see_the_next():
    scores = rand(6, 6)
    seed_buffer = torch.ones(6, 6).tril(diagonal=1)
    leaky = torch.softmax(scores.masked_fill(seed_buffer == 0, -torch.inf), dim=-1)
    assert (leaky.diagonal(offset=1) > 0).all()  # token i attends to token i + 1
    assert (mask_before_softmax(scores, 1).diagonal(offset=1) == 0).all()


def test_seed_dot_T_on_a_batch_reverses_every_dim():
    keys = rand(2, 6, 3)  # (B, T, d_out)
    with pytest.warns(UserWarning, match="deprecated"):
        reversed_keys = keys.T
    assert reversed_keys.shape == (3, 6, 2)  # not (2, 3, 6)
    with pytest.raises(RuntimeError):
        keys @ reversed_keys


def test_seed_multihead_argument_order_fails_loudly_here():
    # The seed's MultiHeadAttention takes (..., num_heads, dropout); ours keeps the
    # wrapper's (..., dropout, num_heads). Passing the seed's order is caught, not run.
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0.0"):
        MultiHeadAttention(3, 2, 6, 2, 0.0)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0.5"):
        MultiHeadAttention(3, 2, 6, 2, 0.5)


# --- bad input: one test per message -------------------------------------------------------

def _mha():
    return MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)


ERRORS = {
    "not a tensor": (lambda: simple_self_attention([[1.0]]), TypeError,
                     "x must be a torch.Tensor, got list"),
    "integer input": (lambda: SelfAttentionV1(3, 2)(torch.ones(6, 3, dtype=torch.long)),
                      TypeError, r"x must be a floating-point tensor, got dtype torch.int64; "
                                 r"convert with x.float\(\) \(token ids need an nn.Embedding"),
    "rank, unbatched rung": (lambda: SelfAttentionV2(3, 2)(torch.ones(3)), ValueError,
                             r"x must have shape \(T, d_in\) or \(B, T, d_in\), got shape \(3,\)"),
    "rank, batched rung": (lambda: _mha()(INPUTS), ValueError,
                           r"x must have shape \(B, T, d_in\), got shape \(6, 3\); add a batch "
                           r"dim with x.unsqueeze\(0\)"),
    "last dim != d_in": (lambda: CausalAttention(3, 2, 6, 0.0)(torch.ones(2, 6, 4)),
                         ValueError, r"x's last dim must equal d_in=3, got shape \(2, 6, 4\)"),
    "too long": (lambda: _mha()(torch.ones(2, 7, 3)), ValueError,
                 "x has 7 tokens, more than context_length=6"),
    "dtype vs weights": (lambda: _mha()(BATCH.double()), TypeError,
                         "x has dtype torch.float64 but the weights are torch.float32"),
    "heads divide d_out": (lambda: MultiHeadAttention(3, 5, 6, 0.0, num_heads=2), ValueError,
                           "d_out must be divisible by num_heads, got d_out=5 and num_heads=2"),
    "dropout 1": (lambda: CausalAttention(3, 2, 6, 1.0), ValueError,
                  r"dropout must be a float in \[0, 1\), got 1.0"),
    "dropout negative": (lambda: MultiHeadAttentionWrapper(3, 2, 6, -0.1, 2), ValueError,
                         r"dropout must be a float in \[0, 1\), got -0.1"),
    "size": (lambda: SelfAttentionV1(0, 2), ValueError, "d_in must be a positive int, got 0"),
    "num_heads": (lambda: MultiHeadAttentionWrapper(3, 2, 6, 0.0, 0), ValueError,
                  "num_heads must be a positive int, got 0"),
    "context_length": (lambda: CausalAttention(3, 2, 2.5, 0.0), ValueError,
                       "context_length must be a positive int, got 2.5"),
    "d_k": (lambda: mask_before_softmax(torch.ones(2, 2), 0), ValueError,
            "d_k must be a positive int, got 0"),
    "mask not bool": (lambda: mask_after_softmax(torch.ones(4, 4), torch.ones(4, 4)),
                      TypeError, r"mask must be a bool tensor \(True = may attend\), got "
                                 r"torch.float32; for a 0/1 tensor use mask.bool\(\)"),
    "mask broadcast": (lambda: mask_before_softmax(torch.ones(2, 4, 4), 2,
                                                   torch.ones(3, 3, dtype=torch.bool)),
                       ValueError, r"mask of shape \(3, 3\) does not broadcast to "
                                   r"attn_scores's shape \(2, 4, 4\) \(..., T, S\)"),
    "weights rank": (lambda: mask_after_softmax(torch.ones(4)), ValueError,
                     r"attn_weights must have shape \(..., T, S\), got shape \(4,\)"),
    "v2 type": (lambda: v1_from_v2(SelfAttentionV1(3, 2)), TypeError,
                "v2 must be a SelfAttentionV2, got SelfAttentionV1"),
    "v2 bias": (lambda: v1_from_v2(SelfAttentionV2(3, 2, qkv_bias=True)), ValueError,
                "v2 has qkv_bias=True, but SelfAttentionV1 has no bias"),
    "wrapper type": (lambda: mha_from_wrapper(_mha()), TypeError,
                     "wrapper must be a MultiHeadAttentionWrapper, got MultiHeadAttention"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_error_messages(case):
    call, error, message = ERRORS[case]
    with pytest.raises(error, match=message):
        call()
