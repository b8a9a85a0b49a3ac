"""attnkit.functional, the executable spec, against a hand-written einsum formula."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from attnkit.functional import merge_partial_attention, safe_softmax, scaled_dot_product_attention
from tolerance import assert_within_2x

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def reference(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale) v by einsum, in float64; masked-out rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("...td,...sd->...ts", q, k) * scale  # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (..., T); -inf for a fully masked row
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # exp(-inf - -inf) = NaN
    return torch.einsum("...ts,...sd->...td", weights, v), weights, lse


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_matches_einsum_formula(lead):
    q, k, v = rand(*lead, 5, 4, seed=1), rand(*lead, 7, 4, seed=2), rand(*lead, 7, 3, seed=3)
    out, weights, lse = scaled_dot_product_attention(q, k, v, return_weights=True,
                                                     return_lse=True)
    assert_close((out, weights, lse), reference(q, k, v))
    assert_close(scaled_dot_product_attention(q, k, v, scale=0.3),
                 reference(q, k, v, scale=0.3)[0])


@pytest.mark.parametrize("T,S", [(1, 1), (5, 5), (4, 9), (9, 4), (97, 97)])
def test_causal_is_top_left_tril(T, S):
    q, k, v = rand(2, T, 6, seed=T), rand(2, S, 6, seed=S), rand(2, S, 5, seed=7)
    allowed = torch.ones(T, S, dtype=torch.bool).tril()  # query i sees keys j <= i
    out, weights = scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    assert_close(out, reference(q, k, v, allowed)[0])
    assert (weights[..., ~allowed] == 0).all()


def test_mask_broadcasts_and_combines_with_causal():
    q, k, v = rand(2, 3, 6, 4), rand(2, 3, 6, 4, seed=1), rand(2, 3, 6, 4, seed=2)
    key_padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, mask=key_padding, causal=True)  # (2, 1, 1, 6)
    both = key_padding & torch.ones(6, 6, dtype=torch.bool).tril()
    assert_close(out, reference(q, k, v, both)[0])


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 11), S=st.integers(1, 11), D=st.integers(1, 9), seed=st.integers(0, 999))
def test_random_masks_any_shape(T, S, D, seed):
    q, k, v = rand(2, T, D, seed=seed), rand(2, S, D, seed=seed + 1), rand(2, S, 3, seed=seed + 2)
    mask = torch.rand(2, T, S, generator=torch.Generator().manual_seed(seed)) > 0.4
    out, weights, lse = scaled_dot_product_attention(q, k, v, mask=mask, return_weights=True,
                                                     return_lse=True)
    assert_close((out, weights, lse), reference(q, k, v, mask))


def test_fully_masked_rows_give_zeros_and_finite_grads():
    q, k, v = (rand(2, 4, 3, seed=s, grad=True) for s in (1, 2, 3))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False  # query 1 may attend to nothing
    out, lse = scaled_dot_product_attention(q, k, v, mask=mask, return_lse=True)
    assert (out[:, 1] == 0).all() and torch.isneginf(lse[:, 1]).all()
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, 1] == 0).all()  # the empty row's query influences nothing
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask), (q, k, v))


def test_gradcheck_float64_causal_with_scale():
    q, k, v = rand(4, 3, seed=4, grad=True), rand(6, 3, seed=5, grad=True), \
        rand(6, 2, seed=6, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, causal=True, scale=0.7),
        (q, k, v))


def test_safe_softmax():
    scores = rand(3, 5)
    scores[1] = float("-inf")
    weights, lse = safe_softmax(scores)
    assert_close(weights[[0, 2]], torch.softmax(scores[[0, 2]], dim=-1))
    assert_close(lse[[0, 2]], torch.logsumexp(scores[[0, 2]], dim=-1))
    assert (weights[1] == 0).all() and torch.isneginf(lse[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_softmax_runs_in_float32(dtype):
    q, k, v = (rand(2, 64, 16, seed=s).mul(3).to(dtype) for s in (1, 2, 3))
    out, weights, lse = scaled_dot_product_attention(q, k, v, return_weights=True,
                                                     return_lse=True)
    assert out.dtype == weights.dtype == dtype and lse.dtype == torch.float32
    # Same scores as the function sees (q @ k^T rounded to `dtype`), then exact maths.
    scores = (q @ k.transpose(-2, -1)).double() / 4
    # The lse computed in bf16 / fp16 would be off by ~6e-2 / ~8e-3 here; float32: ~1e-6.
    assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-6)
    exact = torch.softmax(scores, dim=-1)
    # One rounding to `dtype`; atol covers float16's subnormals (spacing 6e-8) near zero.
    assert_close(weights.double(), exact, atol=1e-7, rtol=2 ** -7)
    # The output against the obvious implementation in `dtype` (softmax in `dtype` too):
    # the spec must be no worse than twice its error (tests/tolerance.py).
    naive = torch.softmax((q @ k.transpose(-2, -1)) / 4, dim=-1) @ v  # all in `dtype`
    assert_within_2x(out, naive, exact @ v.double(), name=f"{dtype} output")


def test_dropout_scales_survivors_and_reports_dropped_weights():
    q, k, v = rand(2, 6, 4), rand(2, 6, 4, seed=1), rand(2, 6, 3, seed=2)
    _, full = scaled_dot_product_attention(q, k, v, return_weights=True)
    torch.manual_seed(0)
    out, dropped = scaled_dot_product_attention(q, k, v, dropout_p=0.25, return_weights=True)
    kept = dropped != 0
    assert (~kept).any() and kept.any()
    assert_close(dropped[kept], full[kept] / 0.75)
    assert_close(out, dropped @ v)


@pytest.mark.parametrize("split", [1, 5, 8])
def test_merge_partial_attention_equals_full(split):
    q, k, v = rand(2, 3, 9, 4), rand(2, 3, 9, 4, seed=1), rand(2, 3, 9, 5, seed=2)
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()  # early queries see no key in part b
    full, full_lse = scaled_dot_product_attention(q, k, v, mask=allowed, return_lse=True)
    parts = [scaled_dot_product_attention(q, k[..., s, :], v[..., s, :], mask=allowed[:, s],
                                          return_lse=True)
             for s in (slice(0, split), slice(split, 9))]
    out, lse = merge_partial_attention(*parts[0], *parts[1])
    assert_close((out, lse), (full, full_lse))


def test_merge_of_two_empty_parts_stays_zero():
    out, lse = merge_partial_attention(torch.ones(2, 3), torch.full((2,), float("-inf")),
                                       torch.ones(2, 3), torch.full((2,), float("-inf")))
    assert (out == 0).all() and torch.isneginf(lse).all()


ERRORS = [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor, got list"),
    (dict(k=torch.ones(3, 4, dtype=torch.long)), TypeError,
     r"k must be a floating-point tensor, got dtype torch.int64; convert it with k.float\(\)"),
    (dict(v=torch.ones(4)), ValueError,
     r"v must have at least 2 dims \(..., length, head_dim\), got shape \(4,\)"),
    (dict(k=torch.ones(3, 5)), ValueError,
     r"q and k must share the last \(head\) dim, got q \(2, 4\) and k \(3, 5\)"),
    (dict(v=torch.ones(4, 4)), ValueError,
     r"k and v must have the same length \(dim -2\), got k \(3, 4\) and v \(4, 4\)"),
    (dict(mask=torch.ones(2, 3)), TypeError,
     r"mask must be a bool tensor \(True = may attend\), got torch.float32; for a 0/1 tensor "
     r"use mask.bool\(\)"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError,
     r"mask of shape \(3, 2\) does not broadcast to the scores' shape \(2, 3\) \(..., T, S\)"),
    (dict(mask=torch.ones(2, 2, 3, dtype=torch.bool)), ValueError,
     r"mask of shape \(2, 2, 3\) does not broadcast"),  # would grow the output's batch
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize("override,error,message", ERRORS)
def test_error_messages(override, error, message):
    args = dict(q=torch.ones(2, 4), k=torch.ones(3, 4), v=torch.ones(3, 4))
    args.update(override)
    kwargs = {name: args.pop(name) for name in ("mask", "dropout_p") if name in args}
    with pytest.raises(error, match=message):
        scaled_dot_product_attention(args["q"], args["k"], args["v"], **kwargs)
