"""The flex backend: its refusals and length buckets (no compile needed) and one compiled
shape class against the math path (three lengths sharing one graph, quietly, NaN kept).
Compiling costs ~15-60 s on a loaded 2-core CPU, so this is the only compile here; it skips
with the reason where flex cannot run."""

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.backends import flex as flex_mod
from attnkit.backends import get_backend


def qkv(dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 200, 16, generator=g, dtype=dtype)
    k = torch.randn(2, 2, 200, 16, generator=g, dtype=dtype)
    v = torch.randn(2, 2, 200, 16, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _why(q, k, v, **call):
    spec = attnkit.MaskSpec.from_args()
    return get_backend("flex").why_not(q, k, v, spec, dropout_p=call.pop("dropout_p", 0.0),
                                       **{"return_lse": False, **call})


@pytest.mark.skipif(flex_mod._unavailable("cpu") is not None,
                    reason=f"flex unavailable: {flex_mod._unavailable('cpu')}")
def test_cpu_refusals_name_the_reason():
    assert "no backward on CPU" in _why(*qkv(grad=True))
    assert "log-sum-exp" in _why(*qkv(), return_lse=True)
    assert "float64" in _why(*qkv(dtype=torch.float64))
    assert "dropout" in _why(*qkv(), dropout_p=0.1)
    assert "weights" in _why(*qkv(), return_weights=True)
    with pytest.raises(ValueError, match="backend 'flex' cannot serve this call: .*backward"):
        attnkit.attention(*qkv(grad=True), backend="flex")


def test_auto_does_not_compile_flex_on_first_use():
    q, k, v = qkv()
    with torch.no_grad():
        explanation = attnkit.explain(q, k, v, window=30)
    assert explanation.chosen != "flex"
    if "flex" in explanation.estimates:  # counted with its compile time until compiled
        assert explanation.estimates["flex"] > 1.0


def test_refuses_a_new_shape_class_past_the_recompile_limit(monkeypatch):
    """Rather than let torch fall back to dense, uncompiled flex, check says why."""
    q, k, v = qkv()
    monkeypatch.setattr(flex_mod, "_compiled_keys", {("another class",)})
    monkeypatch.setattr(flex_mod, "_compiles", [8])
    monkeypatch.setattr(flex_mod, "_recompile_limit", lambda: 8)
    why = _why(q, k, v)
    if flex_mod._unavailable("cpu") is None:
        assert "recompile limit is 8" in why and "uncompiled" in why


def test_lengths_share_a_graph_per_bucket():
    """Structural descriptions pad to a power of two; tensors shaped by the lengths and user
    functions compile per exact length."""
    from attnkit.spec import Call
    q, k, _ = qkv()
    window = attnkit.MaskSpec.from_args(window=40, softcap=2.0)
    docs = attnkit.MaskSpec.from_args(mask_mod=M.documents(cu_seqlens=[0, 70, 200]))
    assert flex_mod._lengths(Call.of(q, k, window, False)) == (256, 256)
    assert flex_mod._lengths(Call.of(q[:, :, :129], k, window, False)) == (256, 256)
    assert flex_mod._lengths(Call.of(q, k, docs, False)) == (200, 200)
    fn = attnkit.MaskSpec.from_args(mask_mod=lambda b, h, qi, ki: qi >= ki)
    assert flex_mod._lengths(Call.of(q, k, fn, False)) == (200, 200)


@pytest.mark.skipif(flex_mod._unavailable("cpu") is not None,
                    reason=f"flex unavailable: {flex_mod._unavailable('cpu')}")
def test_compiled_flex_one_graph_for_lengths_matches_math_quietly(capfd):
    """One compile serves T=200, 150 and 129 (bucket 256), each equal to math; nothing from
    torch on stderr; then the cost rule stops charging the compile and NaN propagates. (The
    suite's only compile here: flex compiles take 15-60 s on a loaded 2-core CPU.)"""
    q, k, v = qkv()
    slopes = attnkit.scores.alibi_slopes(4)
    mod = M.sliding_window(40) & M.dilated(2, causal=False) | M.prefix_lm(3)
    kw = {"mask_mod": mod, "softcap": 2.0, "alibi_slopes": slopes}
    before = flex_mod.compile_count()
    with torch.no_grad():
        for T in (200, 150, 129):
            sub = [t[:, :, :T].contiguous() for t in (q, k, v)]
            ref = attnkit.attention(*sub, backend="math", **kw)
            out = attnkit.attention(*sub, backend="flex", **kw)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert flex_mod.compile_count() - before == 1
        assert capfd.readouterr().err == ""
        spec = attnkit.MaskSpec.from_args(**kw)
        assert flex_mod.is_compiled(q, k, spec)
        q[0, 1, 5, 0] = float("nan")
        out = attnkit.attention(q, k, v, backend="flex", **kw)
        assert torch.isnan(out[0, 1, 5]).all()
