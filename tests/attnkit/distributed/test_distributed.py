"""Ring and Ulysses attention on 1-4 local gloo processes against single-process attention.

Tier 2: for every world size, layout, causal flag and method, the gathered outputs and
gradients equal the spec (:func:`attnkit.functional.scaled_dot_product_attention`) on the full
sequence in float64. Tier 1: every error message, a peer that dies, and the sharding helpers.

Each world size is one fork of P processes running every case (start-up is paid once); the
test items then read the cached results. Shapes are tiny: the point is the bookkeeping.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import attnkit.distributed.ring as ring_module
from attnkit.backends import repeat_kv
from attnkit.distributed import (LAYOUTS, position_ids, ring_attention, shard,
                                 ulysses_attention, unshard)
from attnkit.functional import scaled_dot_product_attention

from _dist_harness import run_ranks, values
from tolerance import assert_within_2x

WORLD_SIZES = [1, 2, 3, 4]
# H = 12 splits over 2, 3 and 4 ranks; Hkv = 6 (GQA) splits over 2 and 3, so Ulysses also
# takes its repeat-the-key/value-heads path at P = 4.
B, H, HKV, D = 2, 12, 6, 8
CASES = [(method, layout, causal) for method in ("ring", "ulysses") for layout in LAYOUTS
         for causal in (False, True)]
METHODS = {"ring": ring_attention, "ulysses": ulysses_attention}
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64: observed errors are ~1e-15


def inputs(T: int, dtype=torch.float64, seed: int = 0):
    """Full-sequence q, k, v and an upstream gradient, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, HKV, T, D), (B, HKV, T, D), (B, H, T, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def reference(T: int, causal: bool, dtype=torch.float64):
    """Output and gradients of single-process attention on the whole sequence."""
    q, k, v, grad_out = inputs(T, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    groups = H // HKV
    out = scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                       causal=causal)
    return dict(zip(("out", "dq", "dk", "dv"),
                    (out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out))))


def _sharded_run(fn, T, layout, causal, dtype=torch.float64, group=None, **kwargs):
    """Shard, run ``fn`` forward and backward, gather everything back (as NumPy)."""
    q, k, v, grad_out = inputs(T, dtype)
    q, k, v = (shard(t, layout=layout, group=group).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=causal, layout=layout, group=group, **kwargs)
    out.backward(shard(grad_out, layout=layout, group=group))
    full = [unshard(t, layout=layout, group=group) for t in (out, q.grad, k.grad, v.grad)]
    # float64 holds float32 and bfloat16 exactly, and NumPy has no bfloat16.
    return {name: t.double().numpy() for name, t in zip(("out", "dq", "dk", "dv"), full)}


def _equivalence_rank(rank, P):
    # Backward tiles of 4 x 4 on blocks of 6 (or 3) keys: several tiles, partial last ones,
    # skipped and masked causal tiles get exercised, not one tile that fits all.
    ring_module._BLOCK_Q = ring_module._BLOCK_K = 4
    T = 6 * P
    sends = []
    isend = dist.isend  # count point-to-point messages (patched in this forked rank only)
    dist.isend = lambda *a, **kw: (sends.append(1), isend(*a, **kw))[1]
    results = {}
    for method, layout, causal in CASES:
        results[(method, layout, causal)] = _sharded_run(METHODS[method], T, layout, causal)
    # One more ring, counting messages between forward and backward.
    q, k, v = (shard(t).requires_grad_() for t in inputs(T)[:3])
    sends.clear()
    out = ring_attention(q, k, v, causal=True)
    forward_sends = len(sends)
    out.sum().backward()
    results["sends"] = (forward_sends, len(sends) - forward_sends)
    results["float32"] = _sharded_run(ring_attention, T, "zigzag", True, dtype=torch.float32)
    results["bfloat16"] = {method: _sharded_run(fn, 4 * T, "zigzag", True, dtype=torch.bfloat16)
                           for method, fn in METHODS.items()}
    positions = torch.arange(T).view(1, 1, T, 1)
    results["shard_positions"] = {layout: (shard(positions, layout=layout).flatten().tolist(),
                                           position_ids(T, layout=layout).tolist())
                                  for layout in LAYOUTS}
    if P == 4:  # a subgroup whose ranks are not 0..2: group ranks != global ranks
        sub = dist.new_group([1, 2, 3])
        if rank in (1, 2, 3):
            results["subgroup"] = _sharded_run(ring_attention, 18, "zigzag", True, group=sub)
    if P == 2:  # a 1-D DeviceMesh is accepted as the group
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (P,))
        results["mesh"] = _sharded_run(ulysses_attention, T, "zigzag", True, group=mesh)
    return results


_RUNS: dict[int, list] = {}


def equivalence_run(P: int) -> list:
    """Per-rank results of :func:`_equivalence_rank` on P processes, run once per P."""
    if P not in _RUNS:
        _RUNS[P] = values(run_ranks(_equivalence_rank, P))
    return _RUNS[P]


def _assert_matches(got: dict, want: dict, **tol):
    for name in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(torch.from_numpy(got[name]).to(want[name].dtype),
                                   want[name], **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,layout,causal", CASES)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_matches_single_process(P, method, layout, causal):
    got = equivalence_run(P)[0][(method, layout, causal)]
    _assert_matches(got, reference(6 * P, causal), **EXACT)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_float32_ring_is_close(P):
    _assert_matches(equivalence_run(P)[0]["float32"], reference(6 * P, True, torch.float32),
                    rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_bfloat16_error_at_most_twice_the_spec_in_bfloat16(P, method):
    got = equivalence_run(P)[0]["bfloat16"][method]
    exact, spec = reference(24 * P, True), reference(24 * P, True, torch.bfloat16)
    for name in ("out", "dq", "dk", "dv"):
        assert_within_2x(torch.from_numpy(got[name]), spec[name], exact[name], name=name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_ring_sends_one_packed_message_per_step(P):
    # Forward: P - 1 hops of the K/V buffer. Backward: P - 1 hops of K/V + dK/dV, then one
    # hop taking the finished gradient home.
    for rank_results in equivalence_run(P):
        assert rank_results["sends"] == (P - 1, P - 1 + (P > 1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("P", WORLD_SIZES)
def test_shard_matches_position_ids(P):
    for rank_results in equivalence_run(P):
        for layout, (sharded, positions) in rank_results["shard_positions"].items():
            assert sharded == positions, layout


@pytest.mark.timeout(60)
def test_subgroup_with_offset_ranks():
    results = equivalence_run(4)
    assert "subgroup" not in results[0]
    for rank in (1, 2, 3):
        _assert_matches(results[rank]["subgroup"], reference(18, True), **EXACT)


@pytest.mark.timeout(60)
def test_device_mesh_as_group():
    _assert_matches(equivalence_run(2)[0]["mesh"], reference(12, True), **EXACT)


def test_position_ids_truth_table():
    assert position_ids(8, layout="zigzag", rank=0, world_size=2).tolist() == [0, 1, 6, 7]
    assert position_ids(8, layout="zigzag", rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    assert position_ids(6, layout="contiguous", rank=2, world_size=3).tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"divisible by 2 \* world_size = 6, got T=9"):
        position_ids(9, layout="zigzag", rank=0, world_size=3)


def test_no_process_group_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    for call in (lambda: ring_attention(q, q, q), lambda: ulysses_attention(q, q, q),
                 lambda: shard(q), lambda: position_ids(8)):
        with pytest.raises(RuntimeError, match="init_process_group.*or pass group="):
            call()
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, layout="striped")


# Each entry: (exception type, message pattern, the call on rank ``rank`` of 3).
def _bad(rank):
    def t(n, heads=H, dtype=torch.float64):
        return torch.zeros(1, heads, n, D, dtype=dtype)

    return {
        "shape_differs": (ValueError, r"differ across ranks.*rank 2: \(1, 12, 12, 4, 4,",
                          lambda: ring_attention(*[t(6 if rank < 2 else 4)] * 3)),
        "dtype_differs": (ValueError, "differ across ranks",
                          lambda: ring_attention(*[t(4, dtype=torch.float32 if rank else
                                                     torch.float64)] * 3)),
        "layout_differs": (ValueError, "differ across ranks",
                           lambda: ring_attention(t(4), t(4), t(4), causal=True,
                                                  layout=LAYOUTS[rank % 2])),
        "zigzag_odd": (ValueError, r"2 \* world_size.*got T/P=3",
                       lambda: ring_attention(t(3), t(3), t(3), layout="zigzag")),
        "ulysses_odd_zigzag": (ValueError, "got T/P=3",
                               lambda: ulysses_attention(t(3), t(3), t(3), causal=True)),
        "ulysses_heads": (ValueError, r"num_heads \(4\) must be divisible by the world size "
                                      r"\(3\)", lambda: ulysses_attention(*[t(4, 4)] * 3)),
        "shard_length": (ValueError, r"divisible by 2 \* world_size = 6, got T=8",
                         lambda: shard(t(8), layout="zigzag")),
        "not_4d": (ValueError, r"q must be this rank's shard \(B, heads, T/P, head_dim\)",
                   lambda: ring_attention(t(4)[0], t(4), t(4))),
        "mixed_dtypes": (TypeError, "share a dtype",
                         lambda: ring_attention(t(4), t(4, dtype=torch.float32), t(4))),
        "causal_lengths": (ValueError, "same length, got 4 and 6",
                           lambda: ring_attention(t(4), t(6), t(6), causal=True)),
    }


def _error_rank(rank, P):
    outcome = {}
    for name, (error, pattern, call) in _bad(rank).items():
        try:
            with pytest.raises(error, match=pattern):
                call()
            outcome[name] = "ok"
        except BaseException as err:  # pytest's Failed is a BaseException
            outcome[name] = f"{type(err).__name__}: {err}"
    # Every case failed on every rank alike, so the group is still usable afterwards.
    ok = torch.ones(1)
    dist.all_reduce(ok)
    outcome["group_still_usable"] = "ok" if ok.item() == P else f"all_reduce gave {ok.item()}"
    return outcome


_ERRORS: list = []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", [*_bad(0), "group_still_usable"])
def test_bad_input_message(case):
    if not _ERRORS:
        _ERRORS.extend(values(run_ranks(_error_rank, 3)))
    for rank, outcome in enumerate(_ERRORS):
        assert outcome[case] == "ok", f"rank {rank}: {outcome[case]}"


def _dying_rank(rank, P, method):
    q, k, v = (shard(t).requires_grad_() for t in inputs(6 * P)[:3])
    out = METHODS[method](q, k, v, causal=True)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose between forward and backward")
    out.sum().backward()  # needs rank 1: must fail, not hang
    return "backward finished without rank 1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method,message", [("ring", "ring_attention: backward step"),
                                            ("ulysses", "ulysses_attention: all-to-all")])
def test_a_failing_rank_fails_the_others_fast(method, message):
    start = time.monotonic()
    outcome = run_ranks(_dying_rank, 3, method, timeout_s=40, pg_timeout_s=15)
    elapsed = time.monotonic() - start
    assert outcome[1][0] == "error" and "on purpose" in outcome[1][1]
    for rank in (0, 2):
        status, error = outcome[rank]
        assert status == "error", f"rank {rank}: {error}"
        assert message in error and "another rank has probably raised or died" in error
    assert elapsed < 30, f"took {elapsed:.1f} s"
