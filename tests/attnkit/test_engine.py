"""Tier 2: every backend against the math spec; tier 1: engine errors and explain()."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.backends.chunked import chunked_attention
from attnkit.masks import MaskSpec
from attnkit.functional import merge_partial_attention
from tolerance import assert_within_2x

# Every registered backend (a new one is tested by registering it) and auto's choice.
BACKENDS = [*attnkit.available_backends(), "auto"]


def _skip_if_refused(backend, q, k, v, kwargs, **call):
    """Skip, with the backend's own reason, a call it declares it cannot serve."""
    if backend == "auto":
        return
    spec = attnkit.MaskSpec.from_args(**kwargs)
    why = attnkit.backends.get_backend(backend).why_not(q, k, v, spec, dropout_p=0.0, **call)
    if why:
        pytest.skip(f"{backend}: {why}")


def qkv(B=2, H=4, Hkv=2, T=9, S=13, D=6, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _compare(kwargs, backend, shape=None, grads=True):
    q, k, v = qkv(**(shape or {}), grad=grads)
    _skip_if_refused(backend, q, k, v, kwargs, return_lse=False)
    ref = attnkit.attention(q, k, v, backend="math", **kwargs)
    out = attnkit.attention(q, k, v, backend=backend, **kwargs)
    torch.testing.assert_close(out, ref)
    if grads:
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(ref, (q, k, v), g),
                        torch.autograd.grad(out, (q, k, v), g)):
            torch.testing.assert_close(b, a)
            assert torch.isfinite(b).all()


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_bottom_right": {"causal": True, "causal_align": "bottom_right"},
    "window": {"window": 4},
    "window_bottom_right": {"window": 5, "causal_align": "bottom_right"},
    "padding": {"key_padding_mask": torch.tensor([[True] * 10 + [False] * 3, [True] * 13])},
    "dense": {"mask": torch.rand(1, 4, 9, 13, generator=torch.Generator().manual_seed(1)) > 0.3},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_math(backend, case):
    _compare(CASES[case], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,S", [(1, 1), (1, 17), (17, 1), (97, 97)])
def test_awkward_lengths(backend, T, S):
    _compare({"causal": True, "causal_align": "bottom_right"}, backend,
             {"T": T, "S": S, "D": 7, "H": 3, "Hkv": 1})


@pytest.mark.parametrize("backend", attnkit.available_backends())
def test_fully_masked_rows_are_zero_with_finite_grads(backend):
    q, k, v = qkv(grad=True)
    _skip_if_refused(backend, q, k, v, {}, return_lse=False)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1] = False  # sample 1 has no real key at all
    # ...and a dense mask that blanks query row 3 for every sample and head.
    mask = torch.ones(9, 13, dtype=torch.bool)
    mask[3] = False
    out = attnkit.attention(q, k, v, key_padding_mask=kpm, mask=mask, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", attnkit.available_backends())
def test_lse_matches_logsumexp(backend):
    q, k, v = qkv()
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[0] = False
    _skip_if_refused(backend, q, k, v, {"causal": True, "key_padding_mask": kpm},
                     return_lse=True)
    out, lse = attnkit.attention(q, k, v, causal=True, key_padding_mask=kpm, backend=backend,
                                 return_lse=True)
    scores = (q @ attnkit.backends.repeat_kv(k, 2).transpose(-1, -2)) / math.sqrt(6)
    allowed = torch.ones(9, 13, dtype=torch.bool).tril() & kpm[:, None, None, :]
    expected = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected)
    assert lse.dtype == torch.float64 and torch.isneginf(lse[0]).all()


def test_lse_float32_for_bfloat16():
    q, k, v = qkv(dtype=torch.bfloat16)
    _, lse = attnkit.attention(q, k, v, return_lse=True)
    assert lse.dtype == torch.float32


def test_merge_two_key_halves_equals_full():
    q, k, v = qkv(Hkv=4)
    full, full_lse = attnkit.attention(q, k, v, backend="chunked", return_lse=True)
    a, la = attnkit.attention(q, k[:, :, :6], v[:, :, :6], backend="chunked", return_lse=True)
    b, lb = attnkit.attention(q, k[:, :, 6:], v[:, :, 6:], backend="chunked", return_lse=True)
    out, lse = merge_partial_attention(a, la, b, lb)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)


def test_merge_with_an_empty_part():
    q, k, v = qkv(Hkv=4)
    full, full_lse = attnkit.attention(q, k, v, backend="chunked", return_lse=True)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    empty, empty_lse = attnkit.attention(q, k, v, key_padding_mask=kpm, backend="chunked",
                                         return_lse=True)
    out, lse = merge_partial_attention(empty, empty_lse, full, full_lse)
    torch.testing.assert_close(out, full)
    both, both_lse = merge_partial_attention(empty, empty_lse, empty, empty_lse)
    assert torch.equal(both, torch.zeros_like(both)) and torch.isneginf(both_lse).all()


def test_gradcheck_chunked_float64(chunked_impl):
    q, k, v = qkv(B=1, H=2, Hkv=1, T=5, S=7, D=3, grad=True)
    spec = MaskSpec.from_args(window=3, causal_align="bottom_right")

    def fn(q, k, v):
        return chunked_attention(q, k, v, spec, scale=0.7, block_q=2, block_k=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    T=st.integers(1, 70), S=st.integers(1, 70), D=st.sampled_from([1, 3, 8]),
    groups=st.sampled_from([(1, 1), (4, 2), (3, 3), (4, 1)]),
    causal=st.booleans(), align=st.sampled_from(["top_left", "bottom_right"]),
    window=st.one_of(st.none(), st.integers(1, 20)),
    padding=st.booleans(), dense=st.booleans(),
    block_q=st.integers(1, 33), block_k=st.integers(1, 33), seed=st.integers(0, 2**16),
)
def test_chunked_property(T, S, D, groups, causal, align, window, padding, dense, block_q,
                          block_k, seed, chunked_impl):
    """chunked == math (forward, lse and gradients) for any shape, mask and block size."""
    H, Hkv = groups
    q, k, v = qkv(B=2, H=H, Hkv=Hkv, T=T, S=S, D=D, grad=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    spec = MaskSpec.from_args(
        causal=causal, causal_align=align, window=window,
        key_padding_mask=(torch.rand(2, S, generator=g) > 0.3) if padding else None,
        mask=(torch.rand(2, 1, T, S, generator=g) > 0.2) if dense else None)
    ref, ref_lse = attnkit.backends.math_attention(q, k, v, spec, dropout_p=0.0, scale=0.5,
                                                   return_lse=True)
    out, lse = chunked_attention(q, k, v, spec, scale=0.5, return_lse=True, block_q=block_q,
                                 block_k=block_k)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad),
                    torch.autograd.grad(out, (q, k, v), grad)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_low_precision_error_within_2x_of_math(dtype, backend):
    q64, k64, v64 = qkv(B=1, H=4, Hkv=4, T=200, S=200, D=32, seed=3)
    ref = attnkit.attention(q64, k64, v64, causal=True, backend="math")
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    assert_within_2x(attnkit.attention(q, k, v, causal=True, backend=backend),
                     attnkit.attention(q, k, v, causal=True, backend="math"), ref)


def test_dropout_only_when_asked_and_reproducible():
    q, k, v = qkv(Hkv=4, dtype=torch.float32)
    base = attnkit.attention(q, k, v, backend="sdpa")
    torch.manual_seed(0)
    a = attnkit.attention(q, k, v, dropout_p=0.5, backend="sdpa")
    torch.manual_seed(0)
    b = attnkit.attention(q, k, v, dropout_p=0.5, backend="sdpa")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend,kwargs", [
    ("chunked", {"causal": True}),
    ("chunked", {"window": 128}),
    ("chunked", {"key_padding_mask": torch.ones(1, 2048, dtype=torch.bool)}),
    ("sdpa", {"causal": True}),
])
def test_never_allocates_t_by_s(backend, kwargs):
    q, k, v = qkv(B=1, H=1, Hkv=1, T=2048, S=2048, D=16, dtype=torch.float32, grad=True)
    with LargestTensor() as rec:
        out = attnkit.attention(q, k, v, backend=backend, **kwargs)
        out.sum().backward()
    assert rec.largest < 2048 * 2048 // 4, rec.largest


def test_math_does_allocate_t_by_s():
    """The recorder itself can fail: the math path builds the full score matrix."""
    q, k, v = qkv(B=1, H=1, Hkv=1, T=512, S=512, D=16, dtype=torch.float32)
    with LargestTensor() as rec:
        attnkit.attention(q, k, v, causal=True, backend="math")
    assert rec.largest >= 512 * 512


def test_explain_reasons():
    q, k, v = qkv()
    plain = attnkit.explain(q, k, v, causal=True)
    assert plain.chosen == "sdpa" and "above sdpa's" in plain.rejected["chunked"]
    lse = attnkit.explain(q, k, v, return_lse=True)
    assert lse.chosen == "math"  # tiny: one matmul beats chunked's per-block overhead
    assert "log-sum-exp" in lse.rejected["sdpa"]
    big = qkv(B=1, H=2, Hkv=2, T=1024, S=1024, D=16, dtype=torch.float32)
    assert attnkit.explain(*big, return_lse=True).chosen == "chunked"
    drop = attnkit.explain(q, k, v, return_lse=True, dropout_p=0.1)
    assert drop.chosen == "math" and "dropout" in drop.rejected["chunked"]
    q, k, v = qkv(B=1, H=1, Hkv=1, T=4096, S=4096, D=16, dtype=torch.float32)
    assert attnkit.explain(q, k, v, window=64).chosen == "chunked"
    assert "auto -> chunked" in str(attnkit.explain(q, k, v, window=64))


def test_registry_custom_backend(monkeypatch):
    # The registry is process-wide: register into a copy, so that no later test (nor a docs
    # page's explain() sample) sees "test_doubled".
    monkeypatch.setattr(attnkit.backends.registry, "_REGISTRY",
                        dict(attnkit.backends.registry._REGISTRY))
    calls = []

    def doubled(q, k, v, call, *, dropout_p, scale, return_lse):
        calls.append(call.plain_causal)
        return 2 * attnkit.backends.math_attention(q, k, v, call, dropout_p=dropout_p,
                                                   scale=scale, return_lse=return_lse)

    attnkit.register_backend("test_doubled", doubled, replace=True)
    q, k, v = qkv()
    out = attnkit.attention(q, k, v, causal=True, backend="test_doubled")
    torch.testing.assert_close(out, 2 * attnkit.attention(q, k, v, causal=True, backend="math"))
    assert calls == [True] and "test_doubled" in attnkit.available_backends()
    with pytest.raises(ValueError, match="already registered"):
        attnkit.register_backend("test_doubled", doubled)
    with pytest.raises(ValueError, match="other than 'auto'"):
        attnkit.register_backend("auto", doubled)


ERRORS = [
    (lambda q, k, v: attnkit.attention(q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: attnkit.attention(q, k[:1], v[:1]), ValueError, "batch sizes differ"),
    (lambda q, k, v: attnkit.attention(q, k[..., :5], v), ValueError, "share head_dim"),
    (lambda q, k, v: attnkit.attention(q, k, v[:, :, :5]), ValueError, "same heads and length"),
    (lambda q, k, v: attnkit.attention(q[:, :3], k, v), ValueError, "must be a multiple of"),
    (lambda q, k, v: attnkit.attention(q.long(), k, v), TypeError, "floating-point"),
    (lambda q, k, v: attnkit.attention(q.float(), k, v), TypeError, "share a dtype"),
    (lambda q, k, v: attnkit.attention(q.tolist(), k, v), TypeError, "must be a torch.Tensor"),
    (lambda q, k, v: attnkit.attention(q, k, v, mask=torch.ones(9, 13)), TypeError,
     "mask must be a bool tensor"),
    (lambda q, k, v: attnkit.attention(q, k, v, mask=torch.ones(9, 12, dtype=torch.bool)),
     ValueError, "does not broadcast"),
    (lambda q, k, v: attnkit.attention(q, k, v, key_padding_mask=torch.ones(2, 9).bool()),
     ValueError, "key_padding_mask must have shape"),
    (lambda q, k, v: attnkit.attention(q, k, v, window=0), ValueError, "window must be"),
    (lambda q, k, v: attnkit.attention(q, k, v, causal=True, causal_align="top"), ValueError,
     "causal_align must be one of"),
    (lambda q, k, v: attnkit.attention(q, k, v, backend="flash9"), ValueError,
     "unknown backend 'flash9'"),
    (lambda q, k, v: attnkit.attention(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be"),
    (lambda q, k, v: attnkit.attention(q, k, v, backend="sdpa", return_lse=True), ValueError,
     "backend 'sdpa' cannot serve this call.*log-sum-exp"),
    (lambda q, k, v: attnkit.attention(q, k, v, backend="chunked", dropout_p=0.1), ValueError,
     "backend 'chunked' cannot serve this call.*dropout"),
]


@pytest.mark.parametrize("call,exc,match", ERRORS, ids=[e[2][:30] for e in ERRORS])
def test_errors(call, exc, match):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        call(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_cuda_backends_match_math(dtype, backend):
    q, k, v = (t.cuda().to(dtype).requires_grad_() for t in qkv(B=2, H=4, Hkv=2, T=300, S=300,
                                                                 D=64, seed=5))
    kwargs = {"window": 100, "key_padding_mask": torch.ones(2, 300, dtype=torch.bool,
                                                              device="cuda")}
    ref64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnkit.attention(*ref64, backend="math", **kwargs)
    math_low = attnkit.attention(q, k, v, backend="math", **kwargs)
    out = attnkit.attention(q, k, v, backend=backend, **kwargs)
    assert_within_2x(out, math_low, ref, slack=1e-6)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


PLAIN_CAUSAL_SPELLINGS = {
    "causal=True": {"causal": True},
    "masks.causal()": {"mask_mod": M.causal()},
    "causal bottom-right, T == S": {"mask_mod": M.causal(align="bottom_right")},
    "causal(offset=0)": {"mask_mod": M.causal(offset=0)},
    "window wider than S": {"window": 5000},
    "sliding_window(None, 0)": {"mask_mod": M.sliding_window(None, 0)},
    "causal & all-True padding": {"causal": True,
                                  "key_padding_mask": torch.ones(1, 2048, dtype=torch.bool)},
    "at_positions(causal, 7, 7)": {"mask_mod": M.at_positions(M.causal(), 7, 7)},
}


@pytest.mark.parametrize("spelling", list(PLAIN_CAUSAL_SPELLINGS))
def test_every_spelling_of_plain_causal_reaches_sdpa_is_causal(spelling):
    """#16: one lowering: auto runs SDPA with is_causal, never a T x S mask."""
    kwargs = PLAIN_CAUSAL_SPELLINGS[spelling]
    q, k, v = qkv(B=1, H=1, Hkv=1, T=2048, S=2048, D=16, dtype=torch.float32)
    assert attnkit.explain(q, k, v, **kwargs).chosen == "sdpa"
    with LargestTensor() as rec:
        out = attnkit.attention(q, k, v, **kwargs)
    assert rec.largest < 2048 * 2048 // 4, f"{spelling}: built a T x S tensor"
    torch.testing.assert_close(out, attnkit.attention(q, k, v, causal=True, backend="sdpa"))


@pytest.mark.parametrize("kwargs", [{"mask_mod": M.sliding_window(None, None)},
                                    {"mask_mod": M.causal(offset=5000)},
                                    {"key_padding_mask": torch.ones(1, 2048, dtype=torch.bool)}])
def test_no_mask_spelled_as_a_description_is_no_mask(kwargs):
    q, k, v = qkv(B=1, H=1, Hkv=1, T=2048, S=2048, D=16, dtype=torch.float32)
    assert attnkit.explain(q, k, v, **kwargs).description.startswith("no mask")
    with LargestTensor() as rec:
        attnkit.attention(q, k, v, **kwargs)
    assert rec.largest < 2048 * 2048 // 4
