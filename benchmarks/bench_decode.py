"""One decode step over a long KV cache: attnkit's ``decode`` backend against SDPA, plain
PyTorch and the memory-bandwidth roof, measured side by side in one process.

A decode step (one new token, ``T = 1``) attends over ``S`` cached positions: GQA with 32
query heads and 8 key/value heads, head dim 128, batch 1, a causal bottom-right mask (the
new token is the last position). Its arithmetic is tiny; its time is the time to read K and
V. Rows, per cache depth, dtype and thread count:

* ``roof``          - a read-bandwidth probe: ``k.sum()`` and ``v.sum()`` over the same bytes
                      (what one pass over the cache costs on this machine, right now);
* ``sdpa``          - ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``;
* ``grouped``       - plain PyTorch, each kv head read once for its 4 query heads: two
                      grouped matmuls with a float32 softmax between them;
* ``decode``        - ``attnkit.attention(..., backend="decode")`` (its default
                      implementation for the dtype: the C++ kernel for bfloat16 when built,
                      grouped MKL matmuls for float32); ``decode[cpp]``/``decode[torch]``
                      force one implementation;
* ``auto``          - ``attnkit.attention`` choosing by cost (the ``picks`` column says what);
* ``prefill``       - the common path beside it: causal prefill ``T = S = 2048`` (8/2 heads,
                      head dim 64, float32), ``auto`` against SDPA ``is_causal``.

Columns: ms per token (median), tokens/s, KV GB/s (K and V bytes over the time), ``x sdpa``
(sdpa's time over this row's) and ``% roof`` (the roof's time over this row's).
Every implementation is checked against the math spec before timing. Run with
``--threads 1 2`` (default) to get both thread counts in one process.

Usage::

    python benchmarks/bench_decode.py                     # depths 1k..64k, threads 1 and 2
    python benchmarks/bench_decode.py --quick             # seconds-long smoke test
    python benchmarks/bench_decode.py --depths 32768 --threads 1 --json decode.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import attnkit  # noqa: E402
from attnkit.backends import decode as dec  # noqa: E402
from attnkit.masks import MaskSpec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_inputs(S: int, dtype, H=32, Hkv=8, D=128, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def grouped(q, k, v):
    """Plain PyTorch: q viewed per kv head, two matmuls, float32 softmax."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, (H // Hkv) * T, D)  # (B, Hkv, G*T, D)
    s = (qg @ k.transpose(-1, -2)).float() * D ** -0.5  # (B, Hkv, G*T, S)
    p = torch.softmax(s, dim=-1)
    return (p.to(v.dtype) @ v).view(B, H, T, D)


def step_fns(q, k, v) -> dict:
    """The implementations of one decode step, by row name."""
    kw = {"causal": True, "causal_align": "bottom_right"}
    spec = MaskSpec(**kw)
    scale = q.shape[-1] ** -0.5
    fns = {
        "roof": lambda: (k.sum(), v.sum()),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "grouped": lambda: grouped(q, k, v),
        "decode": lambda: attnkit.attention(q, k, v, backend="decode", **kw),
        "auto": lambda: attnkit.attention(q, k, v, **kw),
    }
    if dec.kernel_built():
        for impl in ("cpp", "torch"):
            fns[f"decode[{impl}]"] = (lambda impl=impl: dec.decode_attention(
                q, k, v, spec, dropout_p=0.0, scale=scale, return_lse=False, impl=impl))
    return fns


def check(fns, q, k, v) -> None:
    """Every implementation equals the math spec (float64 reference; bf16 loosely)."""
    ref = attnkit.attention(q.double(), k.double(), v.double(), backend="math", causal=True,
                            causal_align="bottom_right")
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    for name, fn in fns.items():
        if name == "roof":
            continue
        err = (fn().double() - ref).abs().max().item()
        if not err <= tol:
            raise SystemExit(f"{name} differs from math by {err:.3g} (> {tol})")


def time_fns(fns: dict, warmup: int, reps: int) -> dict:
    with torch.no_grad():
        return _common.time_interleaved(fns, warmup=warmup, reps=reps)


def decode_rows(args) -> list[dict]:
    rows = []
    H, Hkv, D, B = 32, 8, 128, 1
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for S in args.depths:
                q, k, v = step_inputs(S, dtype)
                fns = step_fns(q, k, v)
                with torch.no_grad():
                    if S <= 4096:
                        check(fns, q, k, v)
                    picks = attnkit.explain(q, k, v, causal=True,
                                            causal_align="bottom_right").chosen
                times = time_fns(fns, args.warmup, args.reps)
                kv_bytes = (k.numel() + v.numel()) * k.element_size()
                flops = 4.0 * B * H * S * D
                med = {name: statistics.median(t) for name, t in times.items()}
                for name, t in times.items():
                    ms = med[name]
                    rows.append({
                        "group": f"decode S={S} {dname} threads={threads}", "impl": name,
                        "kind": "decode", "depth": S, "dtype": dname, "threads": threads,
                        "shape": f"B={B} H={H} Hkv={Hkv} T=1 S={S} D={D}",
                        "median_ms": ms, "min_ms": min(t), "times_ms": t, "reps": len(t),
                        "ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                        "kv_gb_s": kv_bytes / ms / 1e6,
                        "gflops": flops / ms / 1e6 if name != "roof" else None,
                        "x_sdpa": med["sdpa"] / ms if name != "roof" else None,
                        "pct_roof": 100.0 * med["roof"] / ms,
                        "picks": picks if name == "auto" else None, "peak_mib": None,
                        "load": os.getloadavg()[0]})
                print(f"  timed S={S} {dname} threads={threads}", file=sys.stderr, flush=True)
    return rows


def prefill_rows(args) -> list[dict]:
    rows = []
    T = 256 if args.quick else 2048
    H, Hkv, D = 8, 2, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, T, D, generator=g)
    k = torch.randn(1, Hkv, T, D, generator=g)
    v = torch.randn(1, Hkv, T, D, generator=g)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=True),
           "auto": lambda: attnkit.attention(q, k, v, causal=True)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.no_grad():
            picks = attnkit.explain(q, k, v, causal=True).chosen
        times = time_fns(fns, 1, max(3, args.reps // 2))
        med = {name: statistics.median(t) for name, t in times.items()}
        flops = 4.0 * H * T * T * D / 2  # causal: half the pairs
        for name, t in times.items():
            ms = med[name]
            rows.append({
                "group": f"prefill T=S={T} fp32 threads={threads}", "impl": name,
                "kind": "prefill", "depth": T, "dtype": "fp32", "threads": threads,
                "shape": f"B=1 H={H} Hkv={Hkv} T=S={T} D={D}",
                "median_ms": ms, "min_ms": min(t), "times_ms": t, "reps": len(t),
                "gflops": flops / ms / 1e6, "x_sdpa": med["sdpa"] / ms,
                "picks": picks if name == "auto" else None, "peak_mib": None,
                "load": os.getloadavg()[0]})
    return rows


DECODE_COLUMNS = [("depth", "depth", ""), ("dtype", "dtype", ""), ("thr", "threads", ""),
                  ("impl", "impl", ""), ("ms/token", "ms_per_token", ".2f"),
                  ("tokens/s", "tokens_per_s", ".1f"), ("KV GB/s", "kv_gb_s", ".1f"),
                  ("x sdpa", "x_sdpa", ".1f"), ("% roof", "pct_roof", ".0f"),
                  ("picks", "picks", "")]
PREFILL_COLUMNS = [("T=S", "depth", ""), ("thr", "threads", ""), ("impl", "impl", ""),
                   ("ms", "median_ms", ".1f"), ("GFLOP/s", "gflops", ".1f"),
                   ("x sdpa", "x_sdpa", ".2f"), ("picks", "picks", "")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small depths, few reps, 1 thread")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--reps", type=int, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2)")
    parser.add_argument("--depths", type=int, nargs="+",
                        help="KV cache depths (default 1024 4096 16384 32768 65536)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--no-prefill", action="store_true", help="skip the prefill row")
    args = parser.parse_args(argv)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.depths = args.depths or ([256, 1024] if args.quick
                                  else [1024, 4096, 16384, 32768, 65536])
    args.reps = args.reps or (3 if args.quick else 7)
    load_before = os.getloadavg()
    rows = decode_rows(args)
    if not args.no_prefill:
        rows += prefill_rows(args)
    env = _common.environment()
    env["threads"] = args.threads
    env["decode_kernel_built"] = dec.kernel_built()
    env["decode_implementation"] = {d: dec.implementation("cpu", DTYPES[d]) for d in args.dtypes}
    env["load_before"] = load_before
    env["load_after"] = os.getloadavg()
    print(_common.header_text(env) + f" | decode kernel built: {dec.kernel_built()}, default "
          f"implementation {env['decode_implementation']} | load "
          f"average {load_before[0]:.2f} before, {env['load_after'][0]:.2f} after "
          f"({os.cpu_count()} logical cores)")
    print(_common.format_table([r for r in rows if r["kind"] == "decode"], DECODE_COLUMNS))
    prefill = [r for r in rows if r["kind"] == "prefill"]
    if prefill:
        print()
        print(_common.format_table(prefill, PREFILL_COLUMNS))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
