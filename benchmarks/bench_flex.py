"""attnkit.flex_attention against compiled FlexAttention on CPU, one process per
implementation, one thread.

Each implementation runs every stage in a subprocess of its own (``--worker NAME --stage
STAGE``), so compiles, caches and peak memory do not leak between them:

* ``attnkit``: ``attnkit.flex_attention`` with ``attnkit.create_block_mask`` (its own block
  summaries), and with torch's ``BlockMask`` (``attnkit(torch mask)``): the drop-in case;
* ``flex``: ``torch.compile(flex_attention)`` as a user writes it, with torch's
  ``create_block_mask``;
* ``sdpa``: ``F.scaled_dot_product_attention`` with ``is_causal`` or a dense bool mask;
* ``torch_mask`` / ``torch_mask_eager``: torch's ``create_block_mask`` with and without
  ``_compile=True``.

Groups (B=1, H=4, D=64, float32):

* ``first call``: mask + attention, the process's first call (flex: its compile included),
  window 512 at T=4096;
* ``20 lengths``: 20 distinct T from 1024 (step 97), mask + forward each; total ms and the
  graphs dynamo compiled;
* ``fwd window`` / ``fwd documents`` / ``fwd causal``: steady forward at T=16384, window
  512, 16 documents, plain causal (always printed beside the others, with SDPA). attnkit's
  rows also show the same call *written as lambdas*: ``attnkit(lambda)`` is
  ``attnkit.flex_attention`` with ``attnkit.create_block_mask(lambda ...)``,
  ``attention(lambda)`` is ``attnkit.attention(mask_mod=lambda ...)`` beside
  ``attention(args)``, the same call spelled ``causal=True`` / ``window=`` /
  ``mask_mod=masks.documents(...)`` (a lambda is read, not evaluated: it should cost the
  same; ``--quick`` times them forward only);
* ``fwd+bwd ...``: attnkit against SDPA with the dense mask (``is_causal`` for causal) at
  T=8192; flex has no backward on CPU (row left blank with the reason);
* ``block mask``: create_block_mask for 64 documents at T=65536: time and peak memory,
  from ``masks.documents`` (``attnkit``) and from the lambda ``(doc[q] == doc[kv]) & (q >=
  kv)`` (``attnkit(lambda)``); torch's eager one builds the dense mask: its process is
  capped at 8 GiB of address space, ``BENCH_FLEX_MASK_CAP_GIB``, so it fails cleanly
  instead of swapping.

The steady forward stage runs ``--rounds`` times (default 3), interleaved across
implementations, each round a fresh process; the best round is kept and every round's
median is listed. ``--quick`` shrinks every size, leaves compiled flex out (its compile alone takes tens of
seconds) and runs in seconds. FLOPs count visible pairs (4·D per pair forward, 3.5x that
forward+backward).

    python benchmarks/bench_flex.py --quick
    python benchmarks/bench_flex.py --json out/flex.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

B, H, D = 1, 4, 64
WORKERS = ("attnkit", "flex", "sdpa", "torch_mask", "torch_mask_eager")


def sizes(quick: bool) -> dict:
    if quick:
        return {"first_T": 256, "lengths": [64 + 13 * i for i in range(20)], "fwd_T": 512,
                "bwd_T": 256, "window": 64, "docs": 4, "mask_T": 2048, "mask_docs": 64,
                "reps": 2, "quick": True}
    return {"first_T": 4096, "lengths": [1024 + 97 * i for i in range(20)], "fwd_T": 16384,
            "bwd_T": 8192, "window": 512, "docs": 16, "mask_T": 65536, "mask_docs": 64,
            "reps": 3, "quick": False}


def _cuts(T: int, n: int, seed: int = 0) -> list[int]:
    """Random document boundaries ``[0, ..., T]`` (as in bench_masks)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=g)[:n - 1].add(1).sort().values.tolist()
    return [0, *cuts, T]


def _torch_mods(T: int, window: int, docs: int):
    """FlexAttention-style mask_mods, as a torch user writes them."""
    import torch
    cu = _cuts(T, docs)
    doc = torch.repeat_interleave(torch.arange(docs), torch.tensor(cu).diff())

    def causal(b, h, q, kv):
        return q >= kv

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv < window)

    def document(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    return {"window": sliding, "documents": document, "causal": causal}, cu


def _pairs(pattern: str, T: int, window: int, cu: list[int]) -> int:
    if pattern == "window":
        w = min(window, T)
        return w * (w + 1) // 2 + (T - w) * w
    if pattern == "documents":
        return sum((b - a) * (b - a + 1) // 2 for a, b in itertools.pairwise(cu))
    return T * (T + 1) // 2


def _attnkit_mods(T: int, window: int, cu: list[int]):
    from attnkit import masks as M
    return {"window": M.sliding_window(window - 1), "documents": M.documents(cu_seqlens=cu),
            "causal": M.causal()}


def _inputs(T: int, grad: bool = False):
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _median_ms(fn, reps: int, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def _row(group, impl, ms, *, min_ms=None, flops=0.0, peak=None, **info):
    return {"group": group, "impl": impl, "median_ms": ms, "min_ms": min_ms or ms,
            "gflops": flops / ms / 1e6 if flops and ms else None, "peak_mib": peak, **info}


STAGES = ("first", "lengths", "fwd", "fwd+bwd", "mask")


def worker(name: str, stage: str, quick: bool) -> list[dict]:
    """One stage of one implementation, in this (fresh) process."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    z = sizes(quick)
    if name in ("torch_mask", "torch_mask_eager"):
        if stage != "mask":
            return []
        from torch.nn.attention.flex_attention import create_block_mask
        T = z["mask_T"]
        mods, _ = _torch_mods(T, z["window"], z["mask_docs"])
        compile_ = name == "torch_mask"
        if not compile_ and not quick:  # a dense T x T mask: capped, so it fails cleanly
            import resource
            cap = int(os.environ.get("BENCH_FLEX_MASK_CAP_GIB", "8")) << 30
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        start = time.perf_counter()
        peak = _common.peak_memory_mib(lambda: create_block_mask(
            mods["documents"], None, None, T, T, device="cpu", _compile=compile_))
        first = (time.perf_counter() - start) * 1e3
        ms, lo = _median_ms(lambda: create_block_mask(mods["documents"], None, None, T, T,
                                                      device="cpu", _compile=compile_),
                            z["reps"], warmup=0)
        return [_row("block mask", name, ms, min_ms=lo, peak=peak, first_ms=first, T=T,
                     note=f"{z['mask_docs']} documents, first call incl. compile")]

    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    import attnkit

    # As a user writes it; the steady stages compile statically, as the flex backend does
    # (torch 2.13's automatic-dynamic flex graph can fail to build its C++ on CPU).
    compiled = None
    if name == "flex":
        compiled = torch.compile(torch_flex, dynamic=False if stage in ("fwd",) else None)

    def run(q, k, v, impl_mask, torch_mask, pattern):
        if name == "flex":
            return compiled(q, k, v, block_mask=torch_mask)
        if name == "sdpa":
            if pattern == "causal":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask)
        if isinstance(impl_mask, dict):  # attention() with these keyword arguments
            return attnkit.attention(q, k, v, **impl_mask)
        return attnkit.flex_attention(q, k, v, block_mask=impl_mask)

    def masks(pattern, T, window, docs, torch_block=False):
        mods, cu = _torch_mods(T, window, docs)
        if name == "flex" or torch_block:
            bm = torch_cbm(mods[pattern], None, None, T, T, device="cpu")
            return bm, bm, cu
        if name == "sdpa":
            if pattern == "causal":
                return None, None, cu
            i = torch.arange(T)
            dense = mods[pattern](0, 0, i[:, None], i[None, :])
            return None, dense, cu
        return attnkit.create_block_mask(_attnkit_mods(T, window, cu)[pattern], None, None,
                                         T, T), None, cu

    if stage == "first":  # mask + attention, the first in this process
        return _first(name, z, masks, run)
    if stage == "lengths":
        return _lengths(name, z, masks, run)
    if stage == "mask":
        return _mask(name, z) if name == "attnkit" else []
    if stage == "fwd+bwd" and name == "flex":
        return [_row(f"fwd+bwd {p}", name, None, T=z["bwd_T"], note=f"no backward on CPU "
                     f"in torch {torch.__version__}") for p in ("window", "documents", "causal")]
    return _steady(name, stage, z, masks, run)


def _first(name, z, masks, run):
    import torch
    T = z["first_T"]
    q, k, v = _inputs(T)
    before = _graphs()
    start = time.perf_counter()
    with torch.no_grad():
        ours, theirs, _ = masks("window", T, z["window"], z["docs"])
        run(q, k, v, ours, theirs, "window")
    ms = (time.perf_counter() - start) * 1e3
    return [_row("first call", name, ms, T=T, compiles=_graphs() - before,
                 note="window, mask + forward, compile included")]


def _lengths(name, z, masks, run):
    import torch
    before, start = _graphs(), time.perf_counter()
    with torch.no_grad():
        for T in z["lengths"]:
            q, k, v = _inputs(T)
            ours, theirs, _ = masks("window", T, z["window"], z["docs"])
            run(q, k, v, ours, theirs, "window")
    ms = (time.perf_counter() - start) * 1e3
    return [_row("20 lengths", name, ms, compiles=_graphs() - before,
                 T=f"{z['lengths'][0]}..{z['lengths'][-1]}", note="mask + forward each")]


def _steady(name, mode, z, masks, run):
    import torch
    rows = []
    grad = mode == "fwd+bwd"
    # --quick keeps the lambdas to the forward (a smoke test stays seconds long)
    lambdas = [("attnkit(lambda)", "lambda"), ("attention(args)", "args"),
               ("attention(lambda)", "attention")] if not (z["quick"] and grad) else []
    variants = [(name, False)] + ([("attnkit(torch mask)", True), *lambdas]
                                  if name == "attnkit" else [])
    T = z["fwd_T"] if mode == "fwd" else z["bwd_T"]
    for pattern in ("window", "documents", "causal"):
        group = f"{mode} {pattern}"
        for label, torch_block in variants:
            if torch_block is True and pattern == "causal" and grad:
                continue
            q, k, v = _inputs(T, grad)
            ours, theirs, cu = masks(pattern, T, z["window"], z["docs"], torch_block is True)
            if torch_block is True:
                ours = theirs
            elif torch_block:  # the same call written as a lambda, or with arguments
                ours = _as_lambda(torch_block, pattern, T, z["window"], cu)
            flops = 4.0 * D * H * B * _pairs(pattern, T, z["window"], cu) * \
                (3.5 if grad else 1.0)
            g = torch.randn(B, H, T, D)

            def step(q=q, k=k, v=v, ours=ours, theirs=theirs, pattern=pattern, g=g):
                if grad:
                    for t in (q, k, v):
                        t.grad = None
                    run(q, k, v, ours, theirs, pattern).backward(g)
                else:
                    with torch.no_grad():
                        run(q, k, v, ours, theirs, pattern)

            before = _graphs()
            ms, lo = _median_ms(step, z["reps"])
            rows.append(_row(group, label, ms, min_ms=lo, flops=flops, T=T,
                             compiles=_graphs() - before))
    return rows


def _as_lambda(how: str, pattern: str, T: int, window: int, cu: list[int]):
    """The attnkit call for ``pattern`` written as a lambda (a BlockMask for
    ``attnkit.flex_attention``, or ``attention()`` keyword arguments), or with the
    equivalent arguments of ``attention()``."""
    import attnkit
    mods, _ = _torch_mods(T, window, len(cu) - 1)
    if how == "lambda":
        return attnkit.create_block_mask(mods[pattern], None, None, T, T)
    if how == "attention":
        return {"mask_mod": mods[pattern]}
    return {"window": {"window": window}, "causal": {"causal": True},
            "documents": {"mask_mod": attnkit.masks.documents(cu_seqlens=cu)}}[pattern]


def _mask(name, z):
    import attnkit
    rows = []
    if True:
        T = z["mask_T"]
        mods, cu = _torch_mods(T, z["window"], z["mask_docs"])
        desc = attnkit.masks.documents(cu_seqlens=cu)
        for label, mod in (("attnkit", desc), ("attnkit(lambda)", mods["documents"])):
            def make(mod=mod):
                return attnkit.create_block_mask(mod, None, None, T, T)
            start = time.perf_counter()
            peak = _common.peak_memory_mib(make)
            first = (time.perf_counter() - start) * 1e3
            ms, lo = _median_ms(make, z["reps"], warmup=0)
            rows.append(_row("block mask", label, ms, min_ms=lo, peak=peak, first_ms=first,
                             T=T, note=f"{z['mask_docs']} documents"))
    return rows


def _run_worker(name: str, stage: str, quick: bool, timeout: float,
                cache_dir: str) -> list[dict]:
    # The first call compiles with an empty inductor cache, as a new user's would; the
    # other stages share one cache (cold for its first user, warm for later rounds).
    first_cache = tempfile.mkdtemp(prefix="bench_flex_first_") if stage == "first" else None
    # Pinned mmaps (the memory env) page-fault every large allocation: only the stage that
    # measures peak memory runs with them, never a timed stage.
    memory_env = _common._MEMORY_ENV if stage == "mask" else {}
    env = {**os.environ, **memory_env, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": first_cache or cache_dir}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                               "--stage", stage] + (["--quick"] if quick else []), env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [_row(stage, name, None, note=f"timed out after {timeout:.0f} s")]
    if first_cache:
        shutil.rmtree(first_cache, ignore_errors=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if "Error" in line][-1:] \
            or proc.stderr.strip().splitlines()[-1:] or ["?"]
        return [_row(stage, name, None, note=f"failed (exit {proc.returncode}): "
                     f"{tail[0][:160]}")]
    return json.loads(proc.stdout.strip().splitlines()[-1])


COLUMNS = [("group", "group", ""), ("T", "T", ""), ("impl", "impl", ""),
           ("median ms", "median_ms", ".1f"), ("min ms", "min_ms", ".1f"),
           ("x fastest", "ratio", ".2f"), ("lambda/spelled", "lambda_ratio", ".2f"),
           ("GFLOP/s", "gflops", ".1f"),
           ("compiles", "compiles", ""), ("peak MiB", "peak_mib", ".0f"),
           ("first ms", "first_ms", ".0f"), ("rounds ms", "round_ms", ""),
           ("note", "note", "")]


def _ratios(rows: list[dict]) -> list[str]:
    for group in dict.fromkeys(r["group"] for r in rows):
        timed = [r for r in rows if r["group"] == group and r["median_ms"]]
        best = min((r["median_ms"] for r in timed), default=None)
        for r in timed:
            r["ratio"] = r["median_ms"] / best
    lines = []
    by = {(r["group"], r["impl"]): r for r in rows}
    for group in dict.fromkeys(r["group"] for r in rows):
        ours = by.get((group, "attnkit"))
        for peer in ("flex", "sdpa", "torch_mask", "torch_mask_eager"):
            other = by.get((group, peer))
            if ours and other and ours["median_ms"] and other["median_ms"]:
                lines.append(f"{group}: {peer} / attnkit = "
                             f"{other['median_ms'] / ours['median_ms']:.2f}x (median), "
                             f"{other['min_ms'] / ours['min_ms']:.2f}x (min)")
        # written as lambdas, against the same call spelled as a description / arguments
        for lam, spelled in (("attnkit(lambda)", "attnkit"),
                             ("attention(lambda)", "attention(args)")):
            a, b = by.get((group, lam)), by.get((group, spelled))
            if a and b and a["median_ms"] and b["median_ms"]:
                a["lambda_ratio"] = a["median_ms"] / b["median_ms"]
                lines.append(f"{group}: {lam} / {spelled} = {a['lambda_ratio']:.2f}x (median)"
                             + (f", peak {a['peak_mib']:.0f} vs {b['peak_mib']:.0f} MiB"
                                if a.get("peak_mib") is not None
                                and b.get("peak_mib") is not None else ""))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="stages to run")
    parser.add_argument("--rounds", type=int, help="rounds of the steady forward stage, "
                        "interleaved across implementations; the best is kept (default 3, "
                        "quick 1): on a shared machine, load only ever adds time")
    parser.add_argument("--impls", nargs="+", choices=WORKERS, help="workers to run")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.stage, args.quick)))
        return
    from attnkit.backends import flex as flex_backend

    impls = args.impls or [w for w in WORKERS
                           if not (args.quick and w in ("flex", "torch_mask"))]
    if flex_backend._unavailable("cpu") is not None:
        impls = [w for w in impls if w not in ("flex", "torch_mask")]
    rows = []
    rounds = args.rounds or (1 if args.quick else 3)
    cache_dir = tempfile.mkdtemp(prefix="bench_flex_inductor_")
    for stage in args.stages:
        got = {}
        for r in range(rounds if stage == "fwd" else 1):
            for name in impls:
                if name.startswith("torch_mask") and stage != "mask" or \
                        r > 0 and name == "sdpa":  # dense SDPA is 10-30x off: one round
                    continue
                print(f"  running {name} {stage} (round {r + 1})", file=sys.stderr,
                      flush=True)
                for row in _run_worker(name, stage, args.quick, 120 if args.quick else 1800,
                                       cache_dir):
                    key = (row["group"], row["impl"])
                    best = got.get(key)
                    medians = (best or {}).get("round_ms", []) + [row["median_ms"]]
                    if best is None or (row["median_ms"] or 1e99) < (best["median_ms"] or 1e99):
                        best = row
                    best["round_ms"] = medians
                    got[key] = best
        for row in got.values():
            ms = row.pop("round_ms")
            row["round_ms"] = "/".join(f"{m:.0f}" for m in ms if m) if len(ms) > 1 else None
        rows += list(got.values())
    shutil.rmtree(cache_dir, ignore_errors=True)
    lines = _ratios(rows)
    env = _common.environment()
    env["threads"] = 1
    env["load"] = os.getloadavg()
    print(_common.header_text(env) + f" | load {env['load'][0]:.2f}")
    print(_common.format_table(rows, COLUMNS))
    print("\n".join(lines))
    if args.json:
        _common.write_json(args.json, env, {**vars(args), **sizes(args.quick)}, rows)


if __name__ == "__main__":
    main()
