"""NaN and empty rows at every size, on every backend (backends/_edges.py).

torch's fused CPU kernel zeroes rows whose scores are all NaN below a CPU-dependent size, so
the sizes here straddle it (1, 3, 6, 17, 40, 97 keys), on one and two threads, and the fused
cases run once more in a subprocess with ``ATEN_CPU_CAPABILITY=default`` (the scalar and
AVX2 code paths a different CPU would take).
"""

import os
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit import masks as M
from attnkit.backends import _edges, chunked

SIZES = [(1, 1), (1, 7), (3, 3), (3, 5), (6, 6), (17, 17), (40, 40), (97, 97), (4, 300)]
MASKS = {
    "none": {},
    "causal": {"causal": True},
    "bottom_right": {"causal": True, "causal_align": "bottom_right"},
    "window": {"mask_mod": M.sliding_window(2)},
    "padding": "padding",
}
# flex compiles per shape and description (seconds each, and torch's recompile limit is 8 per
# process): it gets the sizes where the kernel path differs, on two masks, one thread.
FLEX_SIZES = [(3, 3), (40, 40)]
FLEX_MASKS = ("none", "causal")


def _backends():
    # "chunked" runs its C++ kernel; "chunked-torch" its PyTorch block loop.
    return [b for b in attnkit.available_backends()] + ["chunked-torch"]


def _call(name, T, S):
    kw = MASKS[name]
    if kw == "padding":
        keep = torch.ones(2, S, dtype=torch.bool)
        keep[1, S // 2:] = False  # sample 1 sees the first half of the keys
        return {"key_padding_mask": keep}
    return dict(kw)


def _visible(call, B, H, T, S):
    spec = attnkit.MaskSpec.from_args(**call)
    dense = spec.dense(T, S, B=B, H=H)
    full = torch.ones(B, H, T, S, dtype=torch.bool)
    return full if dense is None else full & dense


def _run(backend, q, k, v, call):
    if backend == "flex" and attnkit.backends.flex._unavailable("cpu"):
        pytest.skip(attnkit.backends.flex._unavailable("cpu"))
    impl = chunked.use_implementation("torch" if backend == "chunked-torch" else "kernel")
    with torch.no_grad(), impl:
        return attnkit.attention(q, k, v, backend=backend.split("-")[0], **call)


# `auto` runs one of the registered backends, which hold the NaN rules themselves, on the same
# inputs: the full grid for it would repeat theirs. One row per mask checks its choices.
CASES = [(b, m, w, n) for b in _backends() for m in MASKS
         for w in ("q", "k", "v", "all_k") for n in (1, 2)
         if b != "flex" or (m in FLEX_MASKS and n == 1)] + [("auto", m, "q", 1) for m in MASKS]


@pytest.mark.parametrize("backend, mask, where, threads", CASES)
def test_nan_reaches_every_row_that_sees_it(backend, mask, where, threads):
    sizes = FLEX_SIZES if backend == "flex" else SIZES
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T, S in sizes:
            g = torch.Generator().manual_seed(T * 1000 + S)
            B, H, Hkv, D = 2, 4, 2, 5  # odd head dim, GQA
            q = torch.randn(B, H, T, D, generator=g)
            k = torch.randn(B, Hkv, S, D, generator=g)
            v = torch.randn(B, Hkv, S, D, generator=g)
            call = _call(mask, T, S)
            vis = _visible(call, B, H, T, S)  # (B, H, T, S)
            if where == "q":
                q[0, 1, T // 2, 3] = float("nan")
                expect = torch.zeros(B, H, T, dtype=torch.bool)
                expect[0, 1, T // 2] = vis[0, 1, T // 2].any()
            elif where == "all_k":
                k[1, 0, :, 0] = float("nan")  # every key of kv head 0 (query heads 0, 1)
                expect = torch.zeros(B, H, T, dtype=torch.bool)
                expect[1, :2] = vis[1, :2].any(-1)
            else:
                j = S // 3
                {"k": k, "v": v}[where][1, 1, j, 2] = float("nan")  # kv head 1: heads 2, 3
                expect = torch.zeros(B, H, T, dtype=torch.bool)
                expect[1, 2:] = vis[1, 2:, :, j]
            out = _run(backend, q, k, v, call)
            got = torch.isnan(out).any(-1)
            missing = expect & ~got
            assert not missing.any(), (
                f"{backend} T={T} S={S}: rows {missing.nonzero().tolist()} see a NaN but are "
                f"finite")
            empty = ~vis.any(-1)  # rows that see no key: zeros, never NaN
            assert (out[empty] == 0).all(), f"{backend} T={T} S={S}: an empty row is not zeros"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_nan_rows_match_math_exactly_where_finite(backend, chunked_impl):
    """The fix-up changes nothing else: every finite row equals math's, the rows that see the
    NaN are NaN. (A hidden NaN key inside a computed block may also reach rows that do not
    see it: the kernels add the mask to the NaN score. It is never hidden from a row that
    sees it.)"""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 6, generator=g, dtype=torch.float64) for n in (5, 5, 5))
    k[0, 0, 3, 1] = float("nan")
    out = attnkit.attention(q, k, v, causal=True, backend=backend)
    ref = attnkit.attention(q, k, v, causal=True, backend="math")
    assert torch.isnan(out[0, 0, 3:]).all() and torch.isnan(ref[0, 0, 3:]).all()
    finite = torch.isfinite(out).all(-1)  # (B, H, T)
    assert finite[0, 1].all()  # the other head never sees the NaN
    torch.testing.assert_close(out[finite], ref[finite])


def test_all_nan_rows_rules():
    q = torch.zeros(1, 2, 4, 3)
    k = torch.zeros(1, 1, 4, 3)
    k[0, 0, :2, 0] = float("nan")  # keys 0, 1 bad
    # Causal: rows 0 and 1 see only bad keys.
    assert _edges.all_nan_rows(q, k, 0)[0, 0].tolist() == [True, True, False, False]
    # Bottom-right by 2 (offset 2): row 0 already sees key 2.
    assert not _edges.all_nan_rows(q, k, 2).any()
    # A row that sees nothing is not NaN (it is an empty row).
    vis = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    vis[..., 1, :2] = True
    assert _edges.all_nan_rows(q, k, vis)[0, 0].tolist() == [False, True, False, False]
    q[0, 1, 3, 2] = float("nan")
    assert _edges.all_nan_rows(q, k, None)[0, 1].tolist() == [False, False, False, True]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="already running with ATEN_CPU_CAPABILITY=default")
def test_fused_paths_under_default_cpu_capability(target_builds):
    """The same NaN tests on torch's scalar dispatch, as another CPU would run them, with
    chunked's C++ kernel built for that CPU (the SSE2 target, built once per session)."""
    env, first = target_builds("default")
    assert first.returncode == 0, first.stderr[-2000:]
    # the decode kernel's SSE2 build runs its NaN cases in test_decode.py; here auto's
    # decode steps take decode's PyTorch path, so this run does not wait for that build
    env = {**env, "ATTNKIT_DECODE_IMPL": "torch"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "(sees_it or finite) and (sdpa or chunked or auto)", "-x"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
