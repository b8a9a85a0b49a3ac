"""The tensors a score_mod reads, however it reaches them, get their gradients on every
backend that claims score functions with gradients; a score_mod whose reads cannot be
traced is refused where that matters; functions written for scalars (``bias[b][q]``) run.

Reference: the same bias built as a dense float64 tensor by explicit indexing, through
attnkit.functional, differentiated by autograd."""

import functools

import pytest
import torch

import attnkit
from attnkit.backends import get_backend
from attnkit.functional import scaled_dot_product_attention as reference
from attnkit.masks import MaskSpec

B, H, T, D = 2, 3, 37, 5
REL = torch.arange(T).view(-1, 1) - torch.arange(T).view(1, -1) + T - 1  # (T, T) in [0, 2T-2]


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(3)]


def table(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class RelBias(torch.nn.Module):
    """A learnable relative-position bias, read through ``self``."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(table(1, H, 2 * T - 1))
        self.heads = torch.nn.ParameterList([torch.nn.Parameter(table(2, H))])

    def score(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[h, q_idx - kv_idx + T - 1] \
            + self.heads[0][h] * (q_idx - kv_idx) / T


def _forms():
    """``name -> (score_mod, learnable tensors, dense bias (B|1, H, T, T) from them)``."""
    out = {}
    m = RelBias()
    dense = lambda: (m.bias[:, REL] + m.heads[0].view(-1, 1, 1) * (REL - T + 1) / T)[None]  # noqa: E731
    out["module attribute (bound method)"] = (m.score, [m.bias, m.heads[0]], dense)
    out["module in a lambda"] = (lambda s, b, h, q, kv: m.score(s, b, h, q, kv),
                                 [m.bias, m.heads[0]], dense)

    biases = [table(3, H, 2 * T - 1).requires_grad_()]
    out["list"] = (lambda s, b, h, q, kv: s + biases[0][h, q - kv + T - 1], biases,
                   lambda: biases[0][:, REL][None])

    named = {"rel": table(4, H, 2 * T - 1).requires_grad_(), "key": table(5, T).requires_grad_()}
    out["dict"] = (lambda s, b, h, q, kv: s + named["rel"][h, q - kv + T - 1] + named["key"][kv],
                   list(named.values()),
                   lambda: (named["rel"][:, REL] + named["key"].view(1, 1, T))[None])

    def make_nested():
        per_batch = table(6, B, T).requires_grad_()

        def lookup(b, kv):
            return per_batch[b, kv]

        def score(s, b, h, q, kv):
            return s + lookup(b, kv)
        return score, [per_batch], lambda: per_batch[:, None, None, :]
    out["nested closures"] = make_nested()

    gate = table(7, H).requires_grad_()

    def gated(s, b, h, q, kv, *, weight):
        return s * torch.sigmoid(weight[h])
    out["functools.partial"] = (functools.partial(gated, weight=gate), [gate],
                                lambda: None)

    class Callable:
        def __init__(self):
            self.slope = table(8, H).requires_grad_()

        def __call__(self, s, b, h, q, kv):
            return s - self.slope[h] * (q - kv).abs()
    c = Callable()
    out["callable object"] = (c, [c.slope], lambda: (-c.slope.view(-1, 1, 1) *
                                                     (REL - T + 1).abs())[None])

    rows = table(9, B, T).requires_grad_()
    out["chained indexing bias[b][kv]"] = (lambda s, b, h, q, kv: s + rows[b][kv], [rows],
                                           lambda: rows[:, None, None, :])
    return out


FORMS = _forms()


def _grad_backends(spec, q, k, v):
    names = []
    for name in attnkit.available_backends():
        if get_backend(name).why_not(q, k, v, spec, dropout_p=0.0, return_lse=False) is None:
            names.append(name)
    return names


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_capture_form_trains(form):
    fn, learn, dense = FORMS[form]
    q, k, v = qkv()
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    bias = dense()
    if bias is None:  # the partial: its scaling is not additive, spell it out
        ref = reference(q * torch.sigmoid(learn[0]).view(1, -1, 1, 1), k, v, mask=mask)
    else:
        ref = reference(q, k, v, mask=mask, score_mod=lambda s, *_: s + bias)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [q, k, v, *learn], g)
    spec = MaskSpec.from_args(causal=True, score_mod=fn)
    backends = _grad_backends(spec, q, k, v)
    assert {"math", "chunked"} <= set(backends)
    for name in backends:
        out = attnkit.attention(q, k, v, causal=True, score_mod=fn, backend=name)
        torch.testing.assert_close(out, ref, msg=f"{form} on {name}")
        got = torch.autograd.grad(out, [q, k, v, *learn], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, msg=f"{form} on {name}")


def test_flex_front_end_differentiates_self_bias():
    fn, learn, dense = FORMS["module attribute (bound method)"]
    q, k, v = qkv(1)
    ref = reference(q, k, v, score_mod=lambda s, *_: s + dense())
    out = attnkit.flex_attention(q, k, v, score_mod=fn)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, learn, g), torch.autograd.grad(ref, learn, g)):
        torch.testing.assert_close(a, b)


def test_a_score_mod_that_cannot_be_traced_is_refused_where_grads_would_be_lost():
    bias = table(10, H).requires_grad_()

    def branchy(s, b, h, q, kv):
        return s + bias[h] * (q - kv) if bool((q >= 0).all()) else s

    q, k, v = qkv(2)
    with pytest.raises(ValueError, match=r"score_mod branchy could not be traced .* "
                                         r"backend='math' differentiates it directly"):
        attnkit.attention(q, k, v, score_mod=branchy, backend="chunked")
    out = attnkit.attention(q, k, v, score_mod=branchy)  # auto picks one that can
    ref = attnkit.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + bias[h] * (qi - kv),
                            backend="math")
    torch.testing.assert_close(out, ref)
    with torch.no_grad():  # no gradient needed: chunked serves it
        attnkit.attention(q, k, v, score_mod=branchy, backend="chunked")


def test_frozen_and_condition_only_tensors_are_read_but_not_trained():
    frozen = table(11, H)
    gate = table(12, H).requires_grad_()
    fn = lambda s, b, h, q, kv: torch.where(gate[h] > 0, s + frozen[h] * kv, s)  # noqa: E731
    spec = MaskSpec.from_args(score_mod=fn)
    q, k, v = qkv(3)
    spec.validate(B, H, T, T)
    assert {id(t) for t in spec.tensors()} == {id(frozen), id(gate)}
    out = attnkit.attention(q, k, v, score_mod=fn, backend="chunked")
    (grad_gate,) = torch.autograd.grad(out.sum(), gate)
    assert torch.equal(grad_gate, torch.zeros_like(gate))  # read in a condition only


@pytest.mark.parametrize("front", ["flex_attention", "attention"])
def test_chained_indexing_in_a_score_mod(front):
    rows = table(13, B, T)
    q, k, v = qkv(4)
    ref = attnkit.attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + rows[b, kv],
                            backend="math")
    chained = lambda s, b, h, qi, kv: s + rows[b][kv]  # noqa: E731
    if front == "flex_attention":
        out = attnkit.flex_attention(q, k, v, score_mod=chained)
    else:
        out = attnkit.attention(q, k, v, score_mod=chained)
    torch.testing.assert_close(out, ref)


def test_chained_indexing_in_a_mask_mod_through_attention():
    doc = torch.tensor([[0] * 20 + [1] * 17, [0] * 5 + [1] * 32])
    q, k, v = qkv(5)
    ref = attnkit.attention(q, k, v, mask_mod=lambda b, h, qi, kv: doc[b, qi] == doc[b, kv],
                            backend="math")
    out = attnkit.attention(q, k, v, mask_mod=lambda b, h, qi, kv: doc[b][qi] == doc[b][kv])
    torch.testing.assert_close(out, ref)
