"""Mask functions read, not only evaluated (attnkit.masks.traced): recognised native kinds,
sound block summaries for everything else, exact where the function can be evaluated, and
never a stale answer. The truth is always the user's own function on the dense grid."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks as M
from attnkit.masks.traced import TracedMask
from attnkit.summary import EMPTY, FULL, PARTIAL


def dense(fn, T, S, B=2, H=3):
    """The function itself on the whole ``(B, H, T, S)`` grid."""
    b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1)
    q, kv = torch.arange(T).view(1, 1, -1, 1), torch.arange(S).view(1, 1, 1, -1)
    return torch.broadcast_to(fn(b, h, q, kv), (B, H, T, S))


def bounds(T, S, bq, bk):
    q_lo = torch.arange(0, T, bq).view(-1, 1)
    k_lo = torch.arange(0, S, bk).view(1, -1)
    return q_lo, (q_lo + bq).clamp(max=T) - 1, k_lo, (k_lo + bk).clamp(max=S) - 1


def truth(full, T, S, bq, bk):
    """``(some, every)`` per tile over every batch index and head of ``full``."""
    nq, nk = -(-T // bq), -(-S // bk)
    pad = torch.nn.functional.pad
    f = full.reshape(-1, T, S)
    some = pad(f, (0, nk * bk - S, 0, nq * bq - T)).view(-1, nq, bq, nk, bk)
    every = pad(f, (0, nk * bk - S, 0, nq * bq - T), value=True).view(-1, nq, bq, nk, bk)
    return some.any(-1).any(-2).any(0), every.all(-1).all(-2).all(0)


def packing(T, n, g, sort=True):
    """Document ids of ``n`` random documents over ``T`` positions."""
    cuts = torch.randperm(max(T - 1, 1), generator=g)[:max(n - 1, 0)].add(1).sort().values
    ids = torch.zeros(T, dtype=torch.long)
    ids[cuts[cuts < T]] = 1
    ids = ids.cumsum(0)
    return ids if sort else ids[torch.randperm(T, generator=g)]


# --- a grammar of mask functions -------------------------------------------------------------

def atoms(T, S, g):
    """``name -> (fn, exact)``: ``exact`` when b and h are bounded by what they index (so
    every undecided tile can be evaluated)."""
    n = max(T, S)
    doc = packing(n, int(torch.randint(1, 6, (1,), generator=g)), g)
    mixed = packing(n, 3, g, sort=False)
    starts = torch.tensor([int((doc == d).nonzero()[0]) for d in range(int(doc.max()) + 1)])
    lengths = torch.randint(0, S + 1, (2,), generator=g)
    marks = torch.rand(n, generator=g) < 0.1
    c = int(torch.randint(-4, 5, (1,), generator=g))
    w = int(torch.randint(0, 9, (1,), generator=g))
    chunk = int(torch.randint(1, 9, (1,), generator=g))
    return {
        "causal": (lambda b, h, q, kv: q + c >= kv, True),
        "window": (lambda b, h, q, kv: (q - kv < w + 1) & (kv <= q), True),
        "two_sided": (lambda b, h, q, kv: (q - kv).abs() <= w, True),
        "documents": (lambda b, h, q, kv: doc[q] == doc[kv], True),
        "unsorted_documents": (lambda b, h, q, kv: mixed[q] == mixed[kv], True),
        "doc_starts": (lambda b, h, q, kv: (kv >= starts[doc[q]]) & (q >= kv), True),
        "key_padding": (lambda b, h, q, kv: kv < lengths[b], True),
        "query_padding": (lambda b, h, q, kv: q < lengths[b], True),
        "chunks": (lambda b, h, q, kv: q // chunk == kv // chunk, True),
        "modulo": (lambda b, h, q, kv: (q + kv + h) % 3 != 0, False),
        "marks": (lambda b, h, q, kv: marks[q] | marks[kv], True),
        "where": (lambda b, h, q, kv: torch.where(q >= kv, doc[q] == doc[kv], kv < w), True),
        "float": (lambda b, h, q, kv: q.float() * 0.5 + 1.0 >= kv.float() * 0.75, True),
        "bits": (lambda b, h, q, kv: ((q >> 2) & 1) == ((kv >> 1) & 1), True),
        "head": (lambda b, h, q, kv: (h == 1) | (q >= kv), False),
    }


def compose(parts, ops):
    fn = parts[0]
    for part, op in zip(parts[1:], ops):
        fn = {"and": lambda a, b: lambda *i: a(*i) & b(*i),
              "or": lambda a, b: lambda *i: a(*i) | b(*i),
              "and_not": lambda a, b: lambda *i: a(*i) & ~b(*i)}[op](fn, part)
    return fn


NAMES = sorted(atoms(8, 8, torch.Generator().manual_seed(0)))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 70), S=st.integers(1, 70), bq=st.integers(1, 20), bk=st.integers(1, 20),
       names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
       ops=st.lists(st.sampled_from(["and", "or", "and_not"]), min_size=2, max_size=2),
       seed=st.integers(0, 10_000))
def test_summaries_are_sound_and_exact_where_evaluable(T, S, bq, bk, names, ops, seed):
    """Random packings, ragged tails, block sizes, b/h-dependent masks: whatever the
    analysis turns the function into, it equals the function, its block summary never lies
    (empty => nothing visible, full => all visible), and it is exact when b and h are
    bounded."""
    table = atoms(T, S, torch.Generator().manual_seed(seed))
    fn = compose([table[n][0] for n in names], ops)
    exact = all(table[n][1] for n in names)
    mod = M.MaskFn(fn).resolve(T, S)
    full = dense(fn, T, S)
    torch.testing.assert_close(dense(mod.grid, T, S), full)  # recognition never changes it
    some, every = mod.blocks(*bounds(T, S, bq, bk))
    want_some, want_every = truth(full, T, S, bq, bk)
    some, every = (torch.broadcast_to(x, want_some.shape) for x in (some, every))
    assert not (want_some & ~some).any(), mod.describe()  # called empty, but visible
    assert not (every & ~want_every).any(), mod.describe()  # called full, but hidden
    if exact and isinstance(mod, TracedMask):
        assert torch.equal(some, want_some) and torch.equal(every, want_every)


# --- recognition -----------------------------------------------------------------------------

DOC = torch.tensor([0] * 40 + [1] * 25 + [2] * 31)  # 96 positions, sorted
OFFSETS = torch.tensor([0, 40, 65, 96])
LENGTHS = torch.tensor([50, 96, 7])


def _helper_causal(q, kv):
    return kv <= q


RECOGNISED = [
    (lambda b, h, q, kv: q >= kv, "causal"),
    (lambda b, h, q, kv: kv <= q, "causal"),
    (lambda b, h, q, kv: _helper_causal(q, kv), "causal"),
    (lambda b, h, q, kv: q > kv, "causal(offset=-1)"),
    (lambda b, h, q, kv: q + 4 >= kv, "causal(offset=4)"),
    (lambda b, h, q, kv: ~(q < kv), "causal"),
    (lambda b, h, q, kv: (q >= kv) & (q - kv < 16), "window(left=15, right=0)"),
    (lambda b, h, q, kv: (q - kv).abs() <= 3, "window(left=3, right=3)"),
    (lambda b, h, q, kv: (kv - q <= 5) & (q - kv <= 20), "window(left=20, right=5)"),
    (lambda b, h, q, kv: torch.where(q >= kv, q - kv < 8, False), "window(left=7, right=0)"),
    (lambda b, h, q, kv: DOC[q] == DOC[kv], "same_document(B=1)"),
    (lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (q >= kv), "same_document(B=1) & causal"),
    (lambda b, h, q, kv: (kv >= OFFSETS[DOC[q]]) & (q >= kv), "causal & same_document(B=1)"),
    (lambda b, h, q, kv: kv < LENGTHS[b], "prefix(per-sample)"),
    (lambda b, h, q, kv: (kv < 10) | (q >= kv), "prefix(10) | causal"),
    (lambda b, h, q, kv: q // 32 == kv // 32, "chunked_local(32)"),
    (lambda b, h, q, kv: (q // 32 == kv // 32) & (q >= kv), "chunked_local(32) & causal"),
    (lambda b, h, q, kv: b.new_ones((), dtype=torch.bool), "window(left=None, right=None)"),
    (lambda b, h, q, kv: (q - kv) + kv >= q, "window(left=None, right=None)"),
]


@pytest.mark.parametrize("fn, expected", RECOGNISED, ids=[e for _, e in RECOGNISED])
def test_known_shapes_become_native_kinds(fn, expected):
    mod = M.MaskFn(fn).resolve(96, 96)
    got = mod.describe()
    if " & " in expected:  # And's order follows the expression's; compare the parts
        assert sorted(got.split(" & ")) == sorted(expected.split(" & "))
    else:
        assert got == expected
    assert not isinstance(mod, (M.MaskFn, TracedMask))
    torch.testing.assert_close(dense(mod.grid, 96, 96, B=3, H=1),
                               dense(fn, 96, 96, B=3, H=1))


NOT_RECOGNISED = {
    "unsorted ids": lambda b, h, q, kv: DOC.flip(0)[q] == DOC.flip(0)[kv],
    "modulo": lambda b, h, q, kv: (q - kv) % 4 == 0,
    "empty": lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 0),
    "query only": lambda b, h, q, kv: q < 50,
    "key suffix": lambda b, h, q, kv: kv >= 3,
    "float": lambda b, h, q, kv: q.float() / 3 >= kv.float() / 3,
}


@pytest.mark.parametrize("name", sorted(NOT_RECOGNISED))
def test_other_expressions_keep_the_function_with_interval_summaries(name):
    fn = NOT_RECOGNISED[name]
    mod = M.MaskFn(fn).resolve(96, 96)
    assert isinstance(mod, TracedMask)
    assert "traced; tiles classified by interval rules" in mod.describe()
    some, every = mod.blocks(*bounds(96, 96, 16, 16))
    want = truth(dense(fn, 96, 96, B=1, H=1), 96, 96, 16, 16)
    assert torch.equal(some, want[0]) and torch.equal(every, want[1])


def test_a_function_that_cannot_be_read_is_evaluated_and_says_why():
    def branchy(b, h, q, kv):
        return q >= kv if bool((q > 5).all()) else q < kv

    mod = M.MaskFn(branchy).resolve(16, 16)
    assert isinstance(mod, M.MaskFn)
    assert "[opaque: its Python control flow reads index values; every tile evaluated]" \
        in mod.describe()

    def no_tensor(b, h, q, kv):
        return True

    assert "returns bool, not a tensor" in M.MaskFn(no_tensor).resolve(8, 8).describe()


def test_operators_outside_the_rules_are_named():
    table = torch.arange(50) % 7
    fn = lambda b, h, q, kv: torch.sin(q.float()) > 0  # noqa: E731
    mod = M.MaskFn(fn).resolve(50, 50)
    assert "outside the interval rules: sin" in mod.describe()
    some, every = mod.blocks(*bounds(50, 50, 8, 8))
    want = truth(dense(fn, 50, 50, B=1, H=1), 50, 50, 8, 8)
    assert torch.equal(some, want[0]) and torch.equal(every, want[1])  # evaluated
    del table


# --- the engine and explain() ----------------------------------------------------------------

def _qkv(T, S=None, B=1, H=2, D=8):
    g = torch.Generator().manual_seed(0)
    S = T if S is None else S
    return [torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (T, S, S)]


def test_lambdas_lower_like_the_arguments_they_spell():
    q, k, v = _qkv(300)
    lam = attnkit.explain(q, k, v, mask_mod=lambda b, h, qi, kv: qi >= kv)
    assert lam.description == attnkit.explain(q, k, v, causal=True).description == "causal"
    assert lam.chosen == attnkit.explain(q, k, v, causal=True).chosen
    win = attnkit.explain(q, k, v, mask_mod=lambda b, h, qi, kv: (qi >= kv) & (qi - kv < 64))
    assert win.description == attnkit.explain(q, k, v, window=64).description
    call = attnkit.spec.Call.of(q, k, M.MaskSpec(mask_mod=lambda b, h, qi, kv: qi >= kv), False)
    assert call.plain_causal  # SDPA's is_causal


def test_explain_says_when_tiles_are_evaluated():
    q, k, v = _qkv(100)
    marks = torch.arange(100) % 9 == 0
    ex = attnkit.explain(q, k, v, mask_mod=lambda b, h, qi, kv: marks[qi] | marks[kv])
    assert "traced; tiles classified by interval rules" in ex.description


@pytest.mark.parametrize("backend", ["math", "chunked", "sdpa"])
def test_recognised_and_traced_masks_give_the_functions_answer(backend):
    q, k, v = _qkv(97, 131)
    doc = torch.tensor([0] * 50 + [1] * 81)
    for fn in (lambda b, h, qi, kv: (doc[qi] == doc[kv]) & (qi + 34 >= kv),
               lambda b, h, qi, kv: (qi * 7 + kv) % 5 != 1):
        ref = attnkit.attention(q, k, v, mask=dense(fn, 97, 131, B=1, H=1), backend="math")
        out = attnkit.attention(q, k, v, mask_mod=fn, backend=backend)
        torch.testing.assert_close(out, ref)


# --- caching -----------------------------------------------------------------------------

def test_in_place_updates_and_rebinding_are_seen():
    ids = torch.tensor([0] * 30 + [1] * 34)

    def doc_mask(b, h, q, kv):
        return ids[q] == ids[kv]

    first = attnkit.create_block_mask(doc_mask, None, None, 64, 64, BLOCK_SIZE=16)
    assert first.summary.kind[0, 3] == EMPTY
    ids[30:] = 0  # one document now
    again = attnkit.create_block_mask(doc_mask, None, None, 64, 64, BLOCK_SIZE=16)
    assert (again.summary.kind == FULL).all()
    ids = torch.arange(64)  # noqa: F841 - rebinding the closure's variable: every token alone
    third = attnkit.create_block_mask(doc_mask, None, None, 64, 64, BLOCK_SIZE=16)
    assert (third.summary.kind.diagonal() == PARTIAL).all() and third.summary.kind[0, 1] == EMPTY


def test_inference_tensors_are_read_every_time():
    with torch.inference_mode():
        ids = torch.tensor([0] * 32 + [1] * 32)
        bm = attnkit.create_block_mask(lambda b, h, q, kv: ids[q] == ids[kv], None, None,
                                       64, 64, BLOCK_SIZE=32)
        ids[32:] = 0
        bm2 = attnkit.create_block_mask(lambda b, h, q, kv: ids[q] == ids[kv], None, None,
                                        64, 64, BLOCK_SIZE=32)
    assert bm.summary.kind[0, 1] == EMPTY and bm2.summary.kind[0, 1] == FULL


def test_an_index_past_the_captured_tensor_fails_like_the_function():
    short = torch.zeros(100, dtype=torch.long)
    with pytest.raises(IndexError):
        attnkit.create_block_mask(lambda b, h, q, kv: short[q] == short[kv], None, None,
                                  200, 200)


def test_under_torch_compile_nothing_is_recorded_and_answers_agree():
    q, k, v = _qkv(40)
    bias = torch.randn(2, 79, dtype=torch.float64)

    def f(q, k, v):
        return attnkit.attention(q, k, v, mask_mod=lambda b, h, qi, kv: qi >= kv,
                                 score_mod=lambda s, b, h, qi, kv: s + bias[h, qi - kv + 39])
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v), f(q, k, v))


def test_decode_steps_at_new_lengths_stay_exact():
    """Each decode step resolves at new global lengths (verified once, then proved)."""
    doc = torch.tensor([0] * 23 + [1] * 30 + [2] * 11)
    fns = [lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
           lambda b, h, q, kv: (q >= kv) & (q - kv < 9),
           lambda b, h, q, kv: (q * 5 + kv) % 4 != 1]
    for fn in fns:
        mf = M.MaskFn(fn)
        for S in range(20, 64, 3):
            step = M.at_positions(mf, S - 1, 0).resolve(1, S)
            want = dense(fn, S, S, B=1, H=1)[..., S - 1:, :]
            torch.testing.assert_close(step.tile(1, 1, 0, 1, 0, S, None).expand(1, 1, 1, S),
                                       want)


@pytest.mark.parametrize("backend", ["math", "chunked", "sdpa"])
def test_per_sample_tables_serve_fewer_samples_and_refuse_more(backend):
    """``kv < L[b]`` with three lengths runs a batch of two (as the function allows) and
    refuses four (where the function itself would fail)."""
    lengths = torch.tensor([50, 30, 20])
    doc = torch.tensor([[0] * 40 + [1] * 24, [0] * 10 + [1] * 54, [0] * 64])
    q, k, v = _qkv(64, B=2)
    for fn in (lambda b, h, qi, kv: kv < lengths[b],
               lambda b, h, qi, kv: (doc[b, qi] == doc[b, kv]) & (qi >= kv)):
        ref = attnkit.attention(q, k, v, mask=dense(fn, 64, 64, B=2, H=1), backend="math")
        torch.testing.assert_close(attnkit.attention(q, k, v, mask_mod=fn, backend=backend),
                                   ref)
    q4 = torch.cat([q, q])
    with pytest.raises(IndexError, match=r"indexes a tensor of 3 rows by its batch index b, "
                                         r"but the call has B=4 samples"):
        attnkit.attention(q4, q4, q4, mask_mod=lambda b, h, qi, kv: kv < lengths[b])
