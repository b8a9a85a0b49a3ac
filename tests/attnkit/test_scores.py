"""Score functions and sinks: every backend against the float64 math path, gradcheck through
the chunked backward, and the engine's new arguments and errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit import scores as Sc
from attnkit.backends.chunked import chunked_attention
from tolerance import assert_within_2x


def qkv(B=2, H=4, Hkv=2, T=9, S=13, D=6, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g, dtype=dtype).requires_grad_(grad)
            for h, n in ((H, T), (Hkv, S), (Hkv, S))]


def _bias(T=9, S=13, grad=True):
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 4, T, S, generator=g, dtype=torch.float64).requires_grad_(grad)


def _sinks(grad=True):
    return torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64).requires_grad_(grad)


SCORES = {
    "softcap": lambda: {"softcap": 0.7},
    "alibi": lambda: {"alibi_slopes": Sc.alibi_slopes(4).double(), "causal": True},
    "alibi_bottom_right": lambda: {"alibi_slopes": Sc.alibi_slopes(4).double(),
                                   "causal": True, "causal_align": "bottom_right"},
    "bias": lambda: {"bias": _bias()},
    "float_mask": lambda: {"bias": torch.zeros(9, 13, dtype=torch.float64).masked_fill(
        torch.rand(9, 13, generator=torch.Generator().manual_seed(2)) > 0.6, float("-inf"))},
    "sinks": lambda: {"sinks": _sinks()},
    "sinks_window": lambda: {"sinks": _sinks(), "window": 3},
    "callable": lambda: {"score_mod": lambda s, b, h, q, k: s * (1 + 0.1 * h) - 0.05 * q},
    "all": lambda: {"softcap": 2.0, "bias": _bias(), "sinks": _sinks(),
                    "mask_mod": M.documents(cu_seqlens=[0, 4, 9]),
                    "key_padding_mask": None},
}


def _tensors(kwargs):
    return [t for t in kwargs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("case", sorted(SCORES))
def test_chunked_matches_math_with_grads(case, chunked_impl):
    kwargs = SCORES[case]()
    T = 9
    S = 9 if "mask_mod" in kwargs else 13
    if "mask_mod" in kwargs:
        kwargs["bias"] = _bias(9, 9)
    q, k, v = qkv(T=T, S=S)
    extra = _tensors(kwargs)
    ref, ref_lse = attnkit.attention(q, k, v, backend="math", return_lse=True, **kwargs)
    out, lse = attnkit.attention(q, k, v, backend="chunked", return_lse=True, **kwargs)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    g = torch.randn_like(ref)
    inputs = (q, k, v, *extra)
    for a, b in zip(torch.autograd.grad((ref * g).sum(), inputs),
                    torch.autograd.grad((out * g).sum(), inputs)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("case", ["softcap", "alibi", "bias", "sinks"])
def test_gradcheck_chunked_float64(case, chunked_impl):
    kwargs = SCORES[case]()
    q, k, v = qkv(B=1, T=5, S=7, D=3)
    extra = _tensors(kwargs)
    if "bias" in kwargs:
        kwargs["bias"] = _bias(5, 7)
        extra = [kwargs["bias"]]
    names = [n for n, t in kwargs.items() if isinstance(t, torch.Tensor) and t.requires_grad]

    def fn(q, k, v, *ts):
        kw = dict(kwargs, **dict(zip(names, ts)))
        spec_kw = {n: kw[n] for n in kw}
        out, lse = attnkit.attention(q, k, v, backend="chunked", return_lse=True, **spec_kw)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, *extra))


def test_sinks_match_the_lse_formula_and_its_gradient(chunked_impl):
    """Attention with a sink == attention rescaled by sigmoid(lse - sink), whose gradient
    is exact now that chunked's lse is differentiable (it was 49% off before)."""
    q, k, v = qkv(dtype=torch.float32)
    sinks = _sinks().float()
    with_sink = attnkit.attention(q, k, v, sinks=sinks, causal=True, backend="chunked")
    out, lse = attnkit.attention(q, k, v, causal=True, backend="chunked", return_lse=True)
    rebuilt = out * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1)
    torch.testing.assert_close(with_sink, rebuilt)
    g = torch.randn_like(out)
    a = torch.autograd.grad((with_sink * g).sum(), (q, k, sinks))
    b = torch.autograd.grad((rebuilt * g).sum(), (q, k, sinks))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_softcap_bounds_scores():
    q, k, v = (t.detach() * 100 for t in qkv(grad=False))
    _, lse = attnkit.attention(q, k, v, softcap=1.0, backend="chunked", return_lse=True)
    assert (lse <= 1.0 + math.log(13) + 1e-9).all()


def test_one_key_rows_get_exactly_zero_gradients(chunked_impl):
    q, k, v = qkv(T=40, S=40, dtype=torch.float32)
    out = attnkit.attention(q, k, v, window=1, backend="chunked")
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert dv.abs().sum() > 0


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 40), S=st.integers(1, 40), cap=st.floats(0.3, 5.0),
       sink=st.booleans(), bias=st.booleans(), causal=st.booleans(),
       block_q=st.integers(1, 17), block_k=st.integers(1, 17), seed=st.integers(0, 999))
def test_chunked_property_scores(T, S, cap, sink, bias, causal, block_q, block_k, seed,
                                 chunked_impl):
    q, k, v = qkv(T=T, S=S, seed=seed)
    g = torch.Generator().manual_seed(seed)
    score = Sc.chain(Sc.Softcap(cap),
                     Sc.Bias(torch.randn(2, 1, T, S, generator=g, dtype=torch.float64))
                     if bias else None)
    spec = M.MaskSpec.from_args(causal=causal, causal_align="bottom_right", score_mod=score,
                      sinks=torch.randn(4, generator=g, dtype=torch.float64) if sink else None)
    ref, ref_lse = attnkit.backends.math_attention(q, k, v, spec, dropout_p=0.0, scale=0.6,
                                                   return_lse=True)
    out, lse = chunked_attention(q, k, v, spec, scale=0.6, return_lse=True, block_q=block_q,
                                 block_k=block_k)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    gr = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), gr),
                    torch.autograd.grad(out, (q, k, v), gr)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{"softcap": 3.0, "causal": True},
                                    {"mask_mod": M.documents(cu_seqlens=[0, 50, 130, 200])},
                                    {"sinks": torch.zeros(4), "window": 40}],
                         ids=["softcap", "documents", "sinks"])
def test_low_precision_error_within_2x_of_math(dtype, kwargs, chunked_impl):
    q64, k64, v64 = (t.detach() for t in qkv(B=1, H=4, Hkv=4, T=200, S=200, D=32, grad=False,
                                             seed=3))
    ref = attnkit.attention(q64, k64, v64, backend="math", **kwargs)
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    assert_within_2x(attnkit.attention(q, k, v, backend="chunked", **kwargs),
                     attnkit.attention(q, k, v, backend="math", **kwargs), ref)


def test_return_weights_through_the_engine():
    q, k, v = qkv(grad=False)
    out, w, lse = attnkit.attention(q, k, v, causal=True, return_weights=True, return_lse=True)
    ref_out, ref_w = attnkit.functional.scaled_dot_product_attention(
        q, attnkit.backends.repeat_kv(k, 2), attnkit.backends.repeat_kv(v, 2),
        mask=M.causal_mask(9, 13), return_weights=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    assert attnkit.explain(q, k, v, return_weights=True).chosen == "math"


def test_spec_argument_and_explain_description():
    q, k, v = qkv(grad=False)
    spec = M.MaskSpec.from_args(mask_mod=M.prefix_lm(3), score_mod=Sc.Softcap(5.0))
    torch.testing.assert_close(attnkit.attention(q, k, v, spec=spec),
                               attnkit.attention(q, k, v, mask_mod=M.prefix_lm(3), softcap=5.0))
    text = str(attnkit.explain(q, k, v, spec=spec))
    assert "prefix(3) | causal" in text and "softcap(5)" in text


ERRORS = [
    (dict(causal=1), TypeError, "causal must be a bool, got int"),
    (dict(causal=torch.tensor(True)), TypeError, "causal must be a bool"),
    (dict(scale=0.0), ValueError, "scale must be a finite non-zero number"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite non-zero number"),
    (dict(spec=M.MaskSpec.from_args(), causal=True), ValueError, r"either spec= or .*\['causal'\]"),
    (dict(spec="causal"), TypeError, "spec must be an attnkit.masks.MaskSpec"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite positive number"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"one slope per query head, shape \(H,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.long)), TypeError, "alibi_slopes must be"),
    (dict(bias=torch.ones(9, 12)), ValueError, "bias of shape .* does not broadcast"),
    (dict(bias=torch.ones(9, 13, dtype=torch.bool)), TypeError, "bias must be a float tensor"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(H,\)"),
    (dict(sinks=torch.zeros(4, 1)), TypeError, "sinks must be a 1-D float tensor"),
    (dict(score_mod=3), TypeError, "score_mod must be a score description"),
    (dict(return_weights=True, backend="chunked"), ValueError,
     "backend 'chunked' cannot serve this call: .*T x S weights"),
    (dict(sinks=torch.zeros(4), backend="sdpa"), ValueError, "sdpa.*no attention sinks"),
    (dict(softcap=1.0, backend="sdpa"), ValueError, "no score function"),
    (dict(causal=True, causal_align=True), ValueError, "causal_align must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,match", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_engine_errors(kwargs, exc, match):
    q, k, v = (t.float() for t in qkv(grad=False))
    kwargs = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for n, t in kwargs.items()}
    with pytest.raises(exc, match=match):
        attnkit.attention(q, k, v, **kwargs)


def test_explain_takes_exactly_attentions_arguments():
    q, k, v = qkv(grad=False)
    with pytest.raises(TypeError, match="windw"):
        attnkit.explain(q, k, v, windw=4)
    with pytest.raises(ValueError, match="unknown backend"):
        attnkit.explain(q, k, v, backend="flash9")


def test_auto_ranks_a_registered_backend_by_its_declared_cost(monkeypatch):
    """No backend name is written into auto: a new one with a lower cost wins, and one that
    lacks a capability the call needs is refused with that capability named."""
    from attnkit.backends import registry

    calls = []

    def cheap(q, k, v, call, *, dropout_p, scale, return_lse):
        calls.append(call.describe())
        return attnkit.backends.math_attention(q, k, v, call, dropout_p=dropout_p, scale=scale,
                                               return_lse=return_lse)

    monkeypatch.setitem(registry._REGISTRY, "cheap", registry.Backend(
        "cheap", cheap, capabilities=frozenset({"lse", "grad"}), cost=lambda call: 0.0))
    q, k, v = qkv(grad=False)
    assert attnkit.explain(q, k, v, causal=True).chosen == "cheap"
    attnkit.attention(q, k, v, causal=True)
    assert calls == ["causal"]
    refused = attnkit.explain(q, k, v, softcap=2.0)
    assert refused.chosen != "cheap"
    assert refused.rejected["cheap"] == "cheap cannot apply a score function (softcap, ALiBi, bias)"


@pytest.mark.parametrize("kwargs", [{"window": 7}, {"sinks": torch.zeros(2, dtype=torch.float64)}])
def test_value_head_dim_may_differ(kwargs):
    """Dv != D: chunked's fused tiles need equal head sizes and step aside for its block loop."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64).requires_grad_()
            for _ in range(2))
    v = torch.randn(1, 2, 50, 5, generator=g, dtype=torch.float64).requires_grad_()
    ref = attnkit.attention(q, k, v, backend="math", **kwargs)
    out = attnkit.attention(q, k, v, backend="chunked", **kwargs)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(ref.sum(), (q, k, v)),
                    torch.autograd.grad(out.sum(), (q, k, v))):
        torch.testing.assert_close(b, a)
