"""The engine's cache of lowered calls and choices (engine.py): a repeated call skips the
validation, lowering and ranking it already did, and never returns a stale answer: in-place
writes to a description's tensors, user functions that read global state, grad mode, the
registry and the environment all reach the result."""

import pytest
import torch

import attnkit
from attnkit import engine
from attnkit import masks as M
from attnkit.backends import registry
from attnkit.masks import MaskSpec


def qkv(B=2, H=4, Hkv=2, T=5, S=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


@pytest.fixture
def count_prepare(monkeypatch):
    """How many times attention() validated and lowered a call (a cache miss)."""
    calls = []
    real = engine._prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_prepare", counting)
    monkeypatch.setattr(engine, "_CHOICES", {})
    return calls


def test_a_repeated_call_is_prepared_once(count_prepare):
    q, k, v = qkv()
    first = attnkit.attention(q, k, v, causal=True)
    q2, k2, v2 = qkv(seed=1)  # other tensors, same shapes and description
    second = attnkit.attention(q2, k2, v2, causal=True)
    assert len(count_prepare) == 1
    torch.testing.assert_close(second, attnkit.attention(q2, k2, v2, causal=True,
                                                         backend="math"))  # another call
    assert not torch.equal(first, second)
    attnkit.attention(q, k, v, causal=True, causal_align="bottom_right")  # and another
    attnkit.attention(q, k, v, causal=1 == 1)  # the first one again
    assert len(count_prepare) == 3


def test_equal_descriptions_share_an_entry_but_user_functions_never_do(count_prepare):
    q, k, v = qkv()
    keep = torch.ones(2, 40, dtype=torch.bool)
    for _ in range(2):  # a new but equal MaskSpec each time (what a module builds)
        attnkit.attention(q, k, v, spec=MaskSpec.from_args(causal=True, key_padding_mask=keep))
    assert len(count_prepare) == 1
    for _ in range(2):
        attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: i >= j)
    assert len(count_prepare) == 3


def test_in_place_writes_to_a_mask_reach_the_result():
    q, k, v = qkv()
    keep = torch.ones(2, 40, dtype=torch.bool)
    with torch.no_grad():
        attnkit.attention(q, k, v, key_padding_mask=keep)  # lowered away: all True
        keep[1, :30] = False  # the same tensor, now padding most of sample 1
        out = attnkit.attention(q, k, v, key_padding_mask=keep)
    torch.testing.assert_close(out, attnkit.attention(q, k, v, key_padding_mask=keep,
                                                      backend="math"))
    bias = torch.zeros(1, 4, 5, 40)
    first = attnkit.attention(q, k, v, bias=bias)
    bias[..., :20] = float("-inf")
    second = attnkit.attention(q, k, v, bias=bias)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, attnkit.attention(q, k, v, bias=bias, backend="math"))


def test_a_user_function_reading_global_state_is_evaluated_every_time():
    q, k, v = qkv()
    state = {"width": 3}

    def band(b, h, i, j):
        return (i - j).abs() < state["width"]

    with torch.no_grad():
        first = attnkit.attention(q, k, v, mask_mod=band)
        state["width"] = 1
        second = attnkit.attention(q, k, v, mask_mod=band)
    torch.testing.assert_close(second, attnkit.attention(q, k, v, mask_mod=band,
                                                         backend="math"))
    assert not torch.allclose(first, second)


def test_grad_mode_and_requires_grad_are_part_of_the_key():
    q, k, v = qkv(T=1, S=600)
    with torch.no_grad():
        assert attnkit.explain(q, k, v).chosen == "decode"
        attnkit.attention(q, k, v)
    q.requires_grad_()
    out = attnkit.attention(q, k, v)  # decode has no gradients: another backend serves
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_registering_a_backend_or_changing_the_environment_drops_the_choices(monkeypatch):
    q, k, v = qkv()
    key = engine._call_key(q, k, v, (None,) * 12, 0.0, None, "auto", False, False)
    before = registry.state_key()
    monkeypatch.setenv("ATTNKIT_DECODE_IMPL", "torch")
    assert registry.state_key() != before
    monkeypatch.delenv("ATTNKIT_DECODE_IMPL")
    seen = []

    def cheapest(q, k, v, call, *, dropout_p, scale, return_lse):
        seen.append(call)
        return torch.zeros_like(q)

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with torch.no_grad():
        attnkit.attention(q, k, v, causal=True)
        registry.register_backend("free", cheapest, cost=lambda call: 0.0)
        out = attnkit.attention(q, k, v, causal=True)
    assert seen and torch.equal(out, torch.zeros_like(q))
    assert key != engine._call_key(q, k, v, (None,) * 12, 0.0, None, "auto", False, False)


def test_an_implementation_that_is_not_callable_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(TypeError, match=r"a backend needs a callable fn \(and check, cost and "
                                        r"implementation, if given\)"):
        registry.register(registry.Backend("odd", lambda *a, **k: None,
                                           implementation="fast"))


def test_bad_calls_are_refused_every_time():
    q, k, v = qkv()
    for _ in range(2):
        with pytest.raises(TypeError, match="causal must be a bool, got int 1"):
            attnkit.attention(q, k, v, causal=1)
        with pytest.raises(ValueError, match=r"scale must be a finite non-zero number"):
            attnkit.attention(q, k, v, scale=float("nan"))
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got True"):
            attnkit.attention(q, k, v, dropout_p=True)
        with pytest.raises(ValueError, match=r"unknown backend"):
            attnkit.attention(q, k, v, backend=["sdpa"])
    attnkit.attention(q, k, v, scale=1)  # an int scale is fine, and cached as such
    with pytest.raises(ValueError, match=r"scale must be a finite non-zero number or None"):
        attnkit.attention(q, k, v, scale=True)  # equal to 1, but a bool: refused


def test_descriptions_with_large_tensors_are_not_kept_alive(count_prepare):
    q, k, v = qkv(T=600, S=600)
    big = torch.ones(600, 600, dtype=torch.bool)  # > 256 KiB... but under the 1 MiB limit
    huge = torch.zeros(1, 4, 600, 600)  # 5.5 MiB
    attnkit.attention(q, k, v, mask=big)
    attnkit.attention(q, k, v, mask=big)
    assert len(count_prepare) == 1
    attnkit.attention(q, k, v, bias=huge)
    attnkit.attention(q, k, v, bias=huge)
    assert len(count_prepare) == 3
    assert not any(huge is t for call, _ in engine._CHOICES.values()
                   for t in call.spec.tensors())


def test_compiled_calls_take_the_full_path(count_prepare):
    q, k, v = qkv()

    def f(q, k, v):
        return attnkit.attention(q, k, v, causal=True, key_padding_mask=torch.ones(
            2, 40, dtype=torch.bool))

    compiled = torch.compile(f, backend="eager", fullgraph=True)  # a graph break would raise
    out = compiled(q, k, v)
    assert len(count_prepare) == 1 and not engine._CHOICES  # traced: the full path, no entry
    torch.testing.assert_close(out, f(q, k, v))


def test_every_mask_and_score_argument_reaches_the_key():
    """A call with one mask or score argument, then the same shapes with it left out: the
    second call must not reuse the first's lowering (a block_mask once did)."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = qkv(T=40, S=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's create_block_mask outside compile
        bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, 40, 40, device="cpu")
    given = {"block_mask": bm, "causal": True, "window": 3, "mask_mod": M.causal(),
             "mask": torch.ones(40, 40, dtype=torch.bool).tril(),
             "key_padding_mask": torch.arange(40).expand(2, 40) < 30,
             "softcap": 2.0, "bias": torch.randn(40, 40), "alibi_slopes": torch.ones(4),
             "sinks": torch.zeros(4), "score_mod": lambda s, b, h, i, j: s * 2}
    import inspect
    described = set(inspect.signature(attnkit.attention).parameters) - {
        "q", "k", "v", "dropout_p", "scale", "backend", "return_lse", "return_weights", "spec",
        "causal_align"}
    assert described == set(given), "a new argument of attention() needs a case here"
    plain = attnkit.attention(q, k, v, backend="math")
    for name, value in given.items():
        attnkit.attention(q, k, v, **{name: value})
        torch.testing.assert_close(attnkit.attention(q, k, v), plain, msg=name)
