"""The ``decode`` backend (backends/decode.py): every mask and score kind, sizes, GQA groupings,
cache views, threads, NaN and empty rows, against the math spec; both implementations (the
compiled kernel, skipped with the reason when ``make`` did not build it, and pure PyTorch)."""

import math
import os

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit import scores as Sc
from attnkit.backends import _decode_ext, _ext, get_backend
from attnkit.backends import decode as dec
from attnkit.masks import MaskSpec
from tolerance import assert_within_2x

CPP_REASON = ("decode kernel not available on this machine (make or the first decode call "
              "builds it; explain() says why not); only the pure-PyTorch path ran")
IMPLS = [pytest.param("cpp", marks=pytest.mark.skipif(not dec.kernel_built(),
                                                      reason=CPP_REASON)), "torch"]


def test_says_which_implementation_runs(capsys):
    chosen = {str(dt): dec.implementation("cpu", dt) for dt in (torch.float32, torch.bfloat16)}
    assert set(chosen.values()) <= {"cpp", "torch"}
    line = _decode_ext.implementation()
    if dec.kernel_built():
        assert line.startswith(f"C++ kernel, {_decode_ext.target()} build")
    else:
        assert set(chosen.values()) == {"torch"}
        assert line.startswith("pure PyTorch (")
    with capsys.disabled():
        print(f"\n[decode: {line}; default implementation {chosen}]")


def test_explain_says_which_decode_implementation_runs():
    q, k, v = make(B=1, H=8, Hkv=2, T=1, S=2048, D=64, dtype=torch.float32)
    with torch.no_grad():
        step = attnkit.explain(q, k, v, causal=True, causal_align="bottom_right")
        docs = attnkit.explain(q, k, v, mask_mod=M.at_positions(
            M.documents(torch.zeros(1, 2048, dtype=torch.long)), q_offset=2047),
            backend="decode")
    assert step.chosen == "decode", str(step)
    assert ("decode runs: the C++ kernel" if dec.kernel_built() else "decode runs: PyTorch") \
        in str(step)
    if dec.kernel_built():
        assert "C++ kernel" in step.implementation and "one pass" in step.implementation
        assert "two passes" in dec.describe(
            attnkit.engine.Call.of(q, k, MaskSpec.from_args(mask_mod=M.at_positions(
                M.documents(torch.zeros(1, 2048, dtype=torch.long)), q_offset=2047)), False))
    else:
        assert "PyTorch" in step.implementation
    assert docs.chosen  # explain() ranks every backend whatever the description


def make(B=2, H=4, Hkv=2, T=2, S=97, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return q, k, v


def run(impl, q, k, v, spec, threads=1, scale=None):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return dec.decode_attention(q, k, v, spec, dropout_p=0.0,
                                        scale=scale or 1 / math.sqrt(q.shape[-1]),
                                        return_lse=True, impl=impl)
    finally:
        torch.set_num_threads(old)


def reference(q, k, v, spec, scale=None):
    return attnkit.attention(q, k, v, spec=spec, backend="math", return_lse=True, scale=scale)


def check(impl, q, k, v, spec, threads=1, **tol):
    out, lse = run(impl, q, k, v, spec, threads)
    ref, ref_lse = reference(q, k, v, spec)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), **tol)


def kinds(B, H, T, S):
    """Every mask and score kind, as a MaskSpec for a decode block (the T queries are the
    last T of the S positions)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.arange(S).div(max(1, S // 3), rounding_mode="floor").view(1, S).expand(B, S)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[-1, : S // 2] = False  # the last sample lost its first half (left padding)
    bias = torch.randn(B, H, T, S, generator=g, dtype=torch.float64)
    bias[0, 0, 0, : S // 2] = float("-inf")
    sinks = torch.randn(H, generator=g, dtype=torch.float64)
    dense = torch.rand(B, 1, T, S, generator=g) > 0.4
    br = "bottom_right"
    return {
        "none": MaskSpec.from_args(),
        "causal_bottom_right": MaskSpec.from_args(causal=True, causal_align=br),
        "causal_offset": MaskSpec.from_args(causal=True, causal_align=max(0, S - T - 1)),
        "window": MaskSpec.from_args(window=3, causal_align=br),
        "sliding_window_two_sided": MaskSpec.from_args(mask_mod=M.sliding_window(2, 1, align=br)),
        "documents_at_positions": MaskSpec.from_args(mask_mod=M.at_positions(M.documents(ids),
                                                                   q_offset=S - T)),
        "prefix_lm": MaskSpec.from_args(mask_mod=M.prefix_lm(2, align=br)),
        "key_padding": MaskSpec.from_args(causal=True, causal_align=br, key_padding_mask=keep),
        "dense": MaskSpec.from_args(mask=dense),
        "sinks": MaskSpec.from_args(causal=True, causal_align=br, sinks=sinks),
        "softcap": MaskSpec.from_args(causal=True, causal_align=br, score_mod=Sc.Softcap(0.5)),
        "alibi": MaskSpec.from_args(causal=True, causal_align=br,
                          score_mod=Sc.Alibi(Sc.alibi_slopes(H).double(), align=br)),
        "bias": MaskSpec.from_args(score_mod=Sc.Bias(bias)),
        "softcap_window_sinks": MaskSpec.from_args(window=2, causal_align=br, sinks=sinks,
                                         score_mod=Sc.Softcap(1.0)),
        # score functions of positions on a trimmed span (the window starts at key S-T-3)
        "alibi_window": MaskSpec.from_args(window=4, causal_align=br,
                                 score_mod=Sc.Alibi(Sc.alibi_slopes(H).double(), align=br)),
        "score_fn_window": MaskSpec.from_args(window=4, causal_align=br,
                                    score_mod=lambda s, b, h, q, k: s + 0.1 * k - 0.2 * h),
        "dense_per_head": MaskSpec.from_args(mask=torch.rand(1, H, T, S, generator=g) > 0.5),
    }


KINDS = list(kinds(1, 1, 1, 4))


def _to(spec, dtype):
    """The spec's float tensors (bias, slopes, sinks) in ``dtype``."""
    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t
    score = spec.score_mod
    if isinstance(score, Sc.Bias):
        score = Sc.Bias(cast(score.bias))
    elif isinstance(score, Sc.Alibi):
        score = Sc.Alibi(cast(score.slopes), align=score.align)
    return MaskSpec(mask_mod=spec.mask_mod, score_mod=score, sinks=cast(spec.sinks))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_matches_math(impl, dtype, T, kind):
    B, H, Hkv, S, D = 2, 8, 2, 97, 64
    q, k, v = make(B, H, Hkv, T, S, D, dtype=dtype)
    check(impl, q, k, v, _to(kinds(B, H, T, S)[kind], dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["none", "causal_bottom_right", "window", "sinks", "softcap",
                                  "alibi", "documents_at_positions"])
def test_bfloat16_within_2x_of_math(impl, kind):
    B, H, Hkv, T, S, D = 1, 8, 2, 2, 1000, 128
    q, k, v = make(B, H, Hkv, T, S, D, dtype=torch.float64, seed=1)
    spec64 = kinds(B, H, T, S)[kind]
    spec = _to(spec64, torch.bfloat16)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out, lse = run(impl, qb, kb, vb, spec)
    plain, plain_lse = reference(qb, kb, vb, spec)
    exact, exact_lse = reference(*(t.double() for t in (qb, kb, vb)), spec64)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_within_2x(out, plain, exact, name=f"bf16 {kind} out")
    assert_within_2x(lse, plain_lse, exact_lse, name=f"bf16 {kind} lse", slack=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_within_2x_of_math(impl):
    B, H, Hkv, T, S, D = 1, 8, 2, 3, 500, 64
    q, k, v = make(B, H, Hkv, T, S, D, seed=4)
    spec = MaskSpec.from_args(window=200, causal_align="bottom_right")
    qh, kh, vh = (t.to(torch.float16) for t in (q, k, v))
    out, lse = run(impl, qh, kh, vh, spec)
    plain = reference(qh, kh, vh, spec)[0]
    exact = reference(*(t.double() for t in (qh, kh, vh)), spec)[0]
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert_within_2x(out, plain, exact, name="fp16 out")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D", [5, 64, 128])
@pytest.mark.parametrize("S", [1, 3, 97, 1000])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_sizes_and_groupings(impl, T, S, D):
    G = [1, 2, 4, 8][(T + S + D) % 4]  # every grouping, spread over the sizes
    Hkv = 2
    q, k, v = make(B=2, H=G * Hkv, Hkv=Hkv, T=T, S=S, D=D, seed=T * S + D)
    check(impl, q, k, v, MaskSpec.from_args(causal=True, causal_align="bottom_right"))
    check(impl, q, k, v, MaskSpec.from_args())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 4, 1), (2, 8, 4)])  # (B, H, Hkv): split-KV and not
def test_threads_and_split_kv(impl, threads, shape):
    B, H, Hkv = shape
    q, k, v = make(B, H, Hkv, T=3, S=4099, D=64, dtype=torch.float32, seed=threads)
    sinks = torch.randn(H)
    check(impl, q, k, v, MaskSpec.from_args(causal=True, causal_align="bottom_right", sinks=sinks),
          threads=threads)
    check(impl, q, k, v, MaskSpec.from_args(window=700, causal_align="bottom_right"), threads=threads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_views_are_read_in_place(impl, dtype):
    """k[:, :, :filled] of a (B, Hkv, max_len, D) buffer (attnkit's KVCache, transformers'
    StaticCache), a (B, max_len, Hkv, D) buffer seen as (B, Hkv, S, D), and a cache whose
    head dim is not contiguous (copied first)."""
    B, H, Hkv, T, max_len, filled, D = 2, 8, 2, 2, 300, 123, 64
    q, k, v = make(B, H, Hkv, T, max_len, D, dtype=torch.float32, seed=5)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    kf, vf = k[:, :, :filled], v[:, :, :filled]
    expect, expect_lse = run(impl, q, kf.contiguous(), vf.contiguous(), spec)
    assert not kf.is_contiguous()
    views = {
        "static": (kf, vf),
        "bshd": (k.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :filled],
                 v.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :filled]),
        "strided_head_dim": (kf.transpose(-1, -2).contiguous().transpose(-1, -2),
                             vf.transpose(-1, -2).contiguous().transpose(-1, -2)),
    }
    for name, (kk, vv) in views.items():
        out, lse = run(impl, q, kk, vv, spec)
        torch.testing.assert_close(out, expect, msg=name)
        torch.testing.assert_close(lse, expect_lse, msg=name)
    ref = reference(q.double(), kf.double(), vf.double(), spec)[0]
    torch.testing.assert_close(expect.double(), ref, atol=0.05 if dtype != torch.float32
                               else 1e-5, rtol=0.02 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["none", "causal_bottom_right", "documents_at_positions",
                                  "softcap_window_sinks"])
@pytest.mark.parametrize("T", [1, 3])
def test_value_head_dim_differs_from_query_head_dim(impl, kind, T):
    """#23: v's head dim (32) is not q's (64); both the one-pass and the two-pass path."""
    B, H, Hkv, S = 2, 16, 2, 97
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, H, T, 64, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, 64, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, 32, generator=g, dtype=torch.float64)
    spec = kinds(B, H, T, S)[kind]
    out, lse = run(impl, q, k, v, spec)
    ref, ref_lse = reference(q, k, v, spec)
    assert out.shape == (B, H, T, 32)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_value_head_dim_through_auto_as_in_the_issue():
    """#23's call, as written: auto picks decode for a decode step and gets Dv right."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 1, 64, generator=g)
    k = torch.randn(2, 2, 512, 64, generator=g)
    v = torch.randn(2, 2, 512, 32, generator=g)
    with torch.no_grad():
        assert attnkit.explain(q, k, v).chosen == "decode"
        out = attnkit.attention(q, k, v)
    torch.testing.assert_close(out, attnkit.attention(q, k, v, backend="math"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 4, 4, 7), (1, 8, 2, 1), (3, 16, 2, 512)])  # T, H, Hkv, S
@pytest.mark.parametrize("fn", ["identity", "view", "in_place"])
def test_score_mod_returning_its_input(impl, shape, fn):
    """#23: a score function that returns its input (or a view of it, or writes into it)
    crashed decode with an overlapping-memory copy."""
    T, H, Hkv, S = shape
    q, k, v = make(B=2, H=H, Hkv=Hkv, T=T, S=S, D=16, dtype=torch.float32, seed=S)
    score = {"identity": lambda s, *_: s, "view": lambda s, *_: s[..., :],
             "in_place": lambda s, *_: s.mul_(2.0)}[fn]
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right", score_mod=score)
    out, lse = run(impl, q, k, v, spec)
    doubled = 2.0 if fn == "in_place" else 1.0
    plain = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    ref, ref_lse = reference(q, k, v, plain, scale=doubled / math.sqrt(16))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("kind", ["causal_bottom_right", "window", "softcap_window_sinks",
                                  "alibi", "dense"])
def test_verify_blocks_over_a_long_cache(impl, T, kind):
    """Decode steps and verify blocks T = 1..16 over a cache of 3000 keys, GQA 8 (up to 128
    query rows per kv head share each K/V row), key splits over 2 threads."""
    B, H, Hkv, S, D = 1, 16, 2, 3000, 64
    q, k, v = make(B, H, Hkv, T, S, D, dtype=torch.float32, seed=T)
    check(impl, q, k, v, _to(kinds(B, H, T, S)[kind], torch.float32), threads=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.skipif(not dec.kernel_built(), reason=CPP_REASON)
def test_half_verify_blocks_within_2x_of_math(dtype, T):
    """The kernel widens half rows in registers (M <= 4 rows per kv head) or into a tile
    buffer (more rows); both within 2x of math's own error."""
    B, H, Hkv, S, D = 1, 8, 2, 700, 128
    q, k, v = make(B, H, Hkv, T, S, D, dtype=torch.float64, seed=T)
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    qh, kh, vh = (t.to(dtype) for t in (q, k, v))
    out, lse = run("cpp", qh, kh, vh, spec)
    plain, plain_lse = reference(qh, kh, vh, spec)
    exact, exact_lse = reference(*(t.double() for t in (qh, kh, vh)), spec)
    assert_within_2x(out, plain, exact, name=f"{dtype} T={T} out")
    assert_within_2x(lse, plain_lse, exact_lse, name=f"{dtype} T={T} lse", slack=1e-6)


@pytest.mark.skipif(not dec.kernel_built(), reason=CPP_REASON)
def test_one_pass_only_for_what_the_kernel_knows():
    """fused_plan: intervals and softcap/ALiBi in the kernel, everything else two passes."""
    B, H, T, S = 1, 4, 2, 50
    q, k, v = make(B, H, 2, T, S, 8)
    plans = {name: dec.fused_plan(attnkit.engine.Call.of(q, k, spec, False))
             for name, spec in kinds(B, H, T, S).items()}
    one_pass = {n for n, plan in plans.items() if plan is not None}
    assert one_pass == {"none", "causal_bottom_right", "causal_offset", "window",
                        "sliding_window_two_sided", "sinks", "softcap", "alibi",
                        "softcap_window_sinks", "alibi_window"}
    window = plans["window"]  # 3 keys, bottom-right: row t sees S - T + t - 2 .. S - T + t
    assert window["lo"] == [S - T - 2, S - T - 1] and window["hi"] == [S - 1, S]


def test_kv_cache_decoding_through_the_engine():
    """attnkit's KVCache: the views it returns go to decode, step by step equal to the full
    causal forward."""
    g = torch.Generator().manual_seed(0)
    T = 40
    q, k, v = (torch.randn(1, h, T, 16, generator=g) for h in (4, 2, 2))
    full = attnkit.attention(q, k, v, causal=True, backend="math")
    cache = attnkit.KVCache(1, 2, 64, 16)
    steps, t = [], 0
    with torch.no_grad():
        for n in (30, 1, 3, 1, 5):
            ks, vs = cache.update(k[:, :, t:t + n], v[:, :, t:t + n])
            steps.append(attnkit.attention(q[:, :, t:t + n], ks, vs, causal=True,
                                           causal_align="bottom_right", backend="decode"))
            t += n
    torch.testing.assert_close(torch.cat(steps, 2), full)


# --- NaN and empty rows -------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["q", "k", "v", "all_k", "hidden_k"])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 3), (2, 5), (5, 97), (1, 1000)])
@pytest.mark.parametrize("threads", [1, 2])
def test_nan_reaches_exactly_the_rows_that_see_it(impl, where, T, S, threads):
    B, H, Hkv, D = 2, 4, 2, 5
    q, k, v = make(B, H, Hkv, T, S, D, dtype=torch.float32, seed=S)
    spec = MaskSpec.from_args(window=2, causal_align="bottom_right")  # row t sees keys S-T+t-1, S-T+t
    dense = spec.dense(T, S, B=B, H=H)  # None: the window covers every key (lowered away)
    vis = torch.ones(B, H, T, S, dtype=torch.bool) if dense is None else dense.expand(B, H, T, S)
    expect = torch.zeros(B, H, T, dtype=torch.bool)
    if where == "q":
        q[0, 1, T - 1, 3] = float("nan")
        expect[0, 1, T - 1] = True
    elif where == "all_k":
        k[1, 0, :, 0] = float("nan")  # kv head 0 -> query heads 0, 1
        expect[1, :2] = vis[1, :2].any(-1)
    elif where == "hidden_k":
        k[1, 1, 0, 2] = float("nan")  # key 0: seen only when S - T <= 1
        expect[1, 2:] = vis[1, 2:, :, 0]
    else:
        j = S - 1  # the last key: seen by the last row only
        {"k": k, "v": v}[where][1, 1, j, 2] = float("nan")
        expect[1, 2:] = vis[1, 2:, :, j]
    out, lse = run(impl, q, k, v, spec, threads)
    got = torch.isnan(out).any(-1)
    assert torch.equal(got, expect), (got, expect)
    # the log-sum-exp sees the scores only: a NaN value leaves it finite
    assert torch.equal(torch.isnan(lse), expect if where != "v" else torch.zeros_like(expect))
    # every other row is exact: math without the NaN (math itself lets a hidden NaN value
    # reach rows through 0 * NaN in its matmul; decode does not)
    clean = [torch.nan_to_num(t, nan=0.0) for t in (q, k, v)]
    ref = reference(*clean, spec)[0]
    fine = ~expect
    torch.testing.assert_close(out[fine], ref[fine])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sinks", [False, True])
def test_rows_that_see_no_key_are_zeros(impl, sinks):
    B, H, Hkv, T, S, D = 2, 4, 2, 3, 50, 6
    q, k, v = make(B, H, Hkv, T, S, D)
    v[:, :, 0] = float("nan")  # behind the mask: must not reach the empty rows
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1] = False  # sample 1 sees nothing
    mask = torch.ones(T, S, dtype=torch.bool)
    mask[1] = False  # row 1 sees nothing
    mask[:, 0] = False
    sink = torch.randn(H, dtype=torch.float64) if sinks else None
    spec = MaskSpec.from_args(key_padding_mask=keep, mask=mask, sinks=sink)
    out, lse = run(impl, q, k, v, spec)
    ref, ref_lse = reference(q, k, torch.nan_to_num(v, nan=0.0), spec)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    if not sinks:
        assert torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_cache_and_fully_masked_call(impl):
    q, k, v = make(T=1, S=0)
    out, lse = run(impl, q, k, v, MaskSpec.from_args())
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v = make(T=2, S=9)
    spec = MaskSpec.from_args(key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    out, lse = run(impl, q, k, v, spec)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# --- the engine: registration, auto, explain, errors ----------------------------------------

def test_registered_with_its_capabilities():
    backend = attnkit.backends.get_backend("decode")
    assert set(backend.capabilities) == {"lse", "score_mod", "sinks"}


def test_explain_names_the_pytorch_path_and_why(monkeypatch):
    q, k, v = make(B=1, H=8, Hkv=2, T=1, S=64, D=16)  # float64: PyTorch
    call = attnkit.engine.Call.of(q, k, MaskSpec.from_args(), False)
    line = dec.describe(call)
    assert line.startswith("PyTorch (")
    assert ("float64" in line) if dec.kernel_built() else ("no " in line)
    monkeypatch.setenv("ATTNKIT_DECODE_IMPL", "torch")
    call = attnkit.engine.Call.of(q.float(), k.float(), MaskSpec.from_args(), False)
    assert dec.describe(call) == "PyTorch (ATTNKIT_DECODE_IMPL=torch)"


def test_auto_picks_decode_for_a_step_over_a_long_cache_not_for_prefill():
    # GQA 32/8: bfloat16 through the kernel (its measured read rate against sdpa's, which
    # reads each kv head once per query head); float32 through either implementation
    half = torch.bfloat16 if dec.kernel_built() else torch.float32
    q, k, v = make(B=1, H=32, Hkv=8, T=1, S=4096, D=128, dtype=half)
    with torch.no_grad():
        step = attnkit.explain(q, k, v, causal=True, causal_align="bottom_right")
        assert step.chosen == "decode", str(step)
        q, k, v = (t.float() for t in (q, k, v))
        window = attnkit.explain(q, k, v, window=1024, causal_align="bottom_right")
        assert window.chosen == "decode", str(window)
        qp, kp, vp = make(B=1, H=8, Hkv=2, T=512, S=512, D=64, dtype=torch.float32)
        prefill = attnkit.explain(qp, kp, vp, causal=True)
    assert prefill.chosen != "decode"
    assert "T <= 128" in prefill.rejected["decode"]


def test_auto_result_equals_math():
    q, k, v = make(B=1, H=8, Hkv=2, T=1, S=3000, D=32, dtype=torch.float32)
    with torch.no_grad():
        out = attnkit.attention(q, k, v, causal=True, causal_align="bottom_right")
    ref = attnkit.attention(q, k, v, causal=True, causal_align="bottom_right", backend="math")
    torch.testing.assert_close(out, ref)


def test_refusals_name_the_reason():
    q, k, v = make(T=2, S=10)
    with pytest.raises(ValueError, match=r"cannot serve this call: decode is not differentiable"):
        attnkit.attention(q.requires_grad_(), k, v, backend="decode")
    q = q.detach()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"decode has no dropout \(got dropout_p=0.1\)"):
            attnkit.attention(q, k, v, backend="decode", dropout_p=0.1)
        with pytest.raises(ValueError, match=r"decode does not build the attention weights"):
            attnkit.attention(q, k, v, backend="decode", return_weights=True)
        ql, kl, vl = make(T=129, S=129)
        with pytest.raises(ValueError, match=r"T <= 128.*got T=129"):
            attnkit.attention(ql, kl, vl, backend="decode")


def test_impl_errors():
    q, k, v = make(T=1, S=4)
    with pytest.raises(ValueError, match=r"impl must be 'cpp', 'torch' or None, got 'fast'"):
        dec.decode_rows(q, k, v, scale=1.0, impl="fast")
    if not dec.kernel_built():
        with pytest.raises(ValueError, match=r"impl='cpp' needs the compiled kernel"):
            dec.decode_rows(q, k, v, scale=1.0, impl="cpp")


def test_lse_through_the_engine():
    q, k, v = make(T=2, S=30)
    with torch.no_grad():
        out, lse = attnkit.attention(q, k, v, backend="decode", return_lse=True, softcap=2.0)
    ref, ref_lse = attnkit.attention(q, k, v, backend="math", return_lse=True, softcap=2.0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a first build of another target takes minutes on 2 busy cores
@pytest.mark.parametrize("target", ["avx2", "default"])
def test_kernel_built_for_other_targets_is_right_too(target, target_builds):
    """The kernel as another CPU target runs it, selected the way users select torch's own
    kernels (ATEN_CPU_CAPABILITY), built once per test session the way a pip user's first
    call builds it, and run on the kernel's cases in a subprocess. This process already ran
    this machine's own target; a target this CPU cannot run is skipped."""
    import subprocess
    import sys
    native = _decode_ext.target()
    if target == native:
        pytest.skip(f"{target} is this machine's own target: the rest of this file ran it")
    if target not in [t.name for t in _ext.TARGETS.values() if t.needs <= _ext._cpu_flags()]:
        pytest.skip(f"this CPU runs {native}, not {target}")
    env, _ = target_builds(target)
    env = {**env, "ATEN_CPU_CAPABILITY": target}
    env.pop("ATTNKIT_DECODE_TARGET", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-x", "-s", "-k", "says or (cpp and (kind or sizes or nan "
                          "or views or verify or value_head))"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"C++ kernel, {target} build" in run.stdout, run.stdout[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]


def test_target_follows_the_cpu_and_the_overrides(monkeypatch):
    for name in ("ATTNKIT_DECODE_TARGET", "ATTNKIT_KERNEL_TARGET", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert _decode_ext.target() == _ext.choose_target(_ext.ATTN)[0].name  # one rule for both
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # as torch's own kernels
    assert _decode_ext.target() == "default"
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv("ATTNKIT_KERNEL_TARGET", "default")
    monkeypatch.setenv("ATTNKIT_DECODE_TARGET", "avx2" if _decode_ext._x86() else "default")
    assert _decode_ext.target() == ("avx2" if _decode_ext._x86() else "default")  # wins
    assert _decode_ext.library_path().name.startswith(f"attnkit_decode_{_decode_ext.target()}_")
    monkeypatch.setenv("ATTNKIT_DECODE_TARGET", "sse9")
    with pytest.raises(ValueError, match=r"ATTNKIT_DECODE_TARGET='sse9' is not a target; "
                                         r"choose one of \['avx512bf16', 'avx512', 'avx2', "
                                         r"'default'\]"):
        _decode_ext.target()


def test_a_missing_build_is_built_on_first_use_with_a_notice(monkeypatch, tmp_path, capfd):
    """Installed with pip (no make): the first load compiles the kernel into the user cache,
    saying so on stderr once; with ATTNKIT_KERNEL_BUILD=0 decode runs in PyTorch and says
    why. (The whole first-use build is tested in test_kernel.py for both kernels.)"""
    monkeypatch.setenv("ATTNKIT_BUILD_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNKIT_KERNEL_BUILD", "0")
    monkeypatch.setattr(_ext, "_loaded", {})
    assert _decode_ext.load() is None
    assert not (tmp_path / "cache").exists()
    assert _decode_ext.implementation() == (
        f"pure PyTorch (the {_decode_ext.target()} kernel is not built and "
        f"ATTNKIT_KERNEL_BUILD=0)")
    assert dec.implementation("cpu", torch.bfloat16) == "torch"
    monkeypatch.setenv("ATTNKIT_DECODE_IMPL", "torch")
    assert _decode_ext.implementation() == "pure PyTorch (ATTNKIT_DECODE_IMPL=torch)"


def test_refused_inside_torch_compile():
    """Under torch.compile decode steps aside (it reads tensor values), so a compiled
    decoding loop never graph-breaks on it."""
    q, k, v = make(T=1, S=40, dtype=torch.float32)
    spec = MaskSpec.from_args(causal=True, causal_align="bottom_right")
    seen = []

    def probe(q, k, v):
        seen.append(dec.decode_check(q, k, v, spec, dropout_p=0.0, return_lse=False))
        return q * 2

    torch.compile(probe, backend="eager", fullgraph=True)(q, k, v)
    assert seen and "decode runs eagerly" in seen[0]
    assert dec.decode_check(q, k, v, spec, dropout_p=0.0, return_lse=False) is None
