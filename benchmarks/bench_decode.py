"""Decode steps and verify blocks over long KV caches, and small calls: attnkit against SDPA and
the machine's read roof, measured side by side in one process.

**Decode.** One new token (``T = 1``) or a speculative verify block (``T = 4``, causal
bottom-right) attends over ``S`` cached positions: GQA with 32 query heads and 8 key/value
heads, head dim 128, batch 1. Its arithmetic is small; its time is the time to read K and V.
Per cache depth, dtype and thread setting, one interleaved group of rows:

* ``roof``            a plain ``sum`` over the same K and V bytes (bfloat16 caches summed as
                      the float32 words of the same bytes): one pass over the cache, here, now;
* ``sdpa``            ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (the verify
                      block with its bottom-right causal mask as a bool tensor);
* ``decode``          ``attnkit.attention(..., backend="decode")``, its default implementation
                      (the C++ kernel when built); ``decode[torch]`` its PyTorch fallback (what
                      ``pip install`` without a build runs);
* ``auto``            ``attnkit.attention`` choosing by cost (``picks`` says what);
* ``verify ...``      the same for the ``T = 4`` block.

Thread settings: 1 and 2 threads, and 2 threads while another process spins on one core
(``2+spin``: a shared machine). Columns: ms, KV GB/s (K and V bytes over the time), ``x sdpa``
(SDPA's time over this row's, same T), ``% roof`` (the roof's time over this row's), and for
verify rows ``/ step`` (this row's time over the same implementation's decode step).

**Small calls** (``--small``, default on): ``attnkit.attention(q, k, v, causal=True)`` on a
small model's layer (B = 1 and 4, H = 8, D = 64, T = 32 and 128, float32, one thread),
against ``F.scaled_dot_product_attention(is_causal=True)``: what the Python path from
``attention()`` to the kernel costs on a repeated call.

Every implementation is checked against the math spec before timing. The machine is shared:
the load average is printed before and after, and ratios come from calls interleaved in
one process.

Usage::

    python benchmarks/bench_decode.py                     # depths 1k..64k, full table
    python benchmarks/bench_decode.py --quick             # seconds-long smoke test
    python benchmarks/bench_decode.py --depths 32768 --threads 1 --json decode.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import attnkit  # noqa: E402
from attnkit.backends import _decode_ext  # noqa: E402
from attnkit.backends import decode as dec  # noqa: E402
from attnkit.masks import MaskSpec  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H, HKV, D, VERIFY = 32, 8, 128, 4


def cache(S: int, dtype, T: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=g).to(dtype)
    k = torch.randn(1, HKV, S, D, generator=g).to(dtype)
    v = torch.randn(1, HKV, S, D, generator=g).to(dtype)
    return q, k, v


def group_fns(S: int, dtype) -> tuple[dict, dict]:
    """The implementations of a decode step and a verify block over one cache, by row name,
    and the inputs each row's check uses."""
    q1, k, v = cache(S, dtype, 1)
    q4 = torch.randn(1, H, VERIFY, D).to(dtype)
    kw = {"causal": True, "causal_align": "bottom_right"}
    scale = D ** -0.5
    visible = torch.ones(VERIFY, S, dtype=torch.bool).tril(S - VERIFY)  # bottom-right causal
    words = (k.view(torch.float32), v.view(torch.float32)) if dtype != torch.float32 else (k, v)
    fns, inputs = {"roof": lambda: (words[0].sum(), words[1].sum())}, {}
    for tag, q in (("", q1), ("verify ", q4)):
        mask = None if q.shape[2] == 1 else visible
        spec = MaskSpec.from_args(**kw)
        fns[tag + "sdpa"] = (lambda q=q, mask=mask: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True))
        fns[tag + "decode"] = lambda q=q: attnkit.attention(q, k, v, backend="decode", **kw)
        fns[tag + "decode[torch]"] = (lambda q=q, spec=spec: dec.decode_attention(
            q, k, v, spec, dropout_p=0.0, scale=scale, return_lse=False, impl="torch"))
        fns[tag + "auto"] = lambda q=q: attnkit.attention(q, k, v, **kw)
        inputs[tag] = q
    return fns, {"k": k, "v": v, **inputs}


def check(fns: dict, inputs: dict) -> None:
    """Every implementation equals the math spec (float64 reference; bf16 loosely)."""
    k, v = inputs["k"].double(), inputs["v"].double()
    refs = {tag: attnkit.attention(inputs[tag].double(), k, v, backend="math", causal=True,
                                   causal_align="bottom_right") for tag in ("", "verify ")}
    tol = 1e-4 if inputs[""].dtype == torch.float32 else 3e-2
    for name, fn in fns.items():
        if name != "roof":
            ref = refs["verify " if name.startswith("verify ") else ""]
            err = (fn().double() - ref).abs().max().item()
            if not err <= tol:
                raise SystemExit(f"{name} differs from math by {err:.3g} (> {tol})")


class Spinner:
    """Another process spinning on one core while the block runs (a shared machine)."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def decode_rows(args) -> list[dict]:
    rows = []
    settings = [(t, False) for t in args.threads] + ([(2, True)] if args.spin else [])
    for threads, spin in settings:
        torch.set_num_threads(threads)
        label = f"{threads}+spin" if spin else str(threads)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for S in args.depths:
                fns, inputs = group_fns(S, dtype)
                with torch.no_grad():
                    if S <= 4096 and not spin:
                        check(fns, inputs)
                    picks = {tag: attnkit.explain(inputs[tag], inputs["k"], inputs["v"],
                                                  causal=True, causal_align="bottom_right")
                             .chosen for tag in ("", "verify ")}
                    load = os.getloadavg()[0]
                    if spin:
                        with Spinner():
                            times = _common.time_interleaved(fns, warmup=args.warmup,
                                                             reps=args.reps)
                    else:
                        times = _common.time_interleaved(fns, warmup=args.warmup,
                                                         reps=args.reps)
                rows += _decode_group(times, S, dname, label, picks, load, inputs)
                print(f"  timed S={S} {dname} threads={label}", file=sys.stderr, flush=True)
    return rows


def _decode_group(times, S, dname, label, picks, load, inputs) -> list[dict]:
    k = inputs["k"]
    kv_bytes = 2 * k.numel() * k.element_size()
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, t in times.items():
        ms = med[name]
        verify = name.startswith("verify ")
        T = VERIFY if verify else 1
        sdpa = med["verify sdpa" if verify else "sdpa"]
        step = med.get(name[len("verify "):]) if verify else None
        rows.append({
            "group": f"decode S={S} {dname} threads={label}", "impl": name,
            "kind": "verify" if verify else ("roof" if name == "roof" else "decode"),
            "depth": S, "dtype": dname, "threads": label,
            "shape": f"B=1 H={H} Hkv={HKV} T={T} S={S} D={D}",
            "median_ms": ms, "min_ms": min(t), "times_ms": t, "reps": len(t),
            "kv_gb_s": kv_bytes / ms / 1e6,
            "gflops": 4.0 * H * T * S * D / ms / 1e6 if name != "roof" else None,
            "x_sdpa": sdpa / ms if name != "roof" else None,
            "pct_roof": 100.0 * med["roof"] / ms,
            "per_step": ms / step if step else None,
            "picks": picks["verify " if verify else ""] if name.endswith("auto") else None,
            "peak_mib": None, "load": load})
    return rows


def small_rows(args) -> list[dict]:
    """attention(causal=True) on small shapes against SDPA, one thread, interleaved."""
    torch.set_num_threads(1)
    rows = []
    shapes = [(1, 8, 32, 64), (4, 8, 32, 64), (1, 8, 128, 64), (4, 8, 128, 64)]
    if args.quick:
        shapes = shapes[:1]
    for B, Hs, T, Ds in shapes:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, Hs, T, Ds, generator=g) for _ in range(3))
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "attention": lambda: attnkit.attention(q, k, v, causal=True),
               "attention[sdpa]": lambda: attnkit.attention(q, k, v, causal=True,
                                                            backend="sdpa")}
        with torch.no_grad():
            torch.testing.assert_close(fns["attention"](), fns["sdpa"](), atol=1e-5, rtol=1e-5)
            picks = attnkit.explain(q, k, v, causal=True).chosen
            load = os.getloadavg()[0]
            times = _common.time_interleaved(fns, warmup=20, reps=args.small_reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        for name, t in times.items():
            rows.append({
                "group": f"small B={B} T={T}", "impl": name, "kind": "small",
                "shape": f"B={B} H={Hs} T=S={T} D={Ds}", "dtype": "fp32", "threads": "1",
                "median_ms": med[name], "min_ms": best[name], "times_ms": t, "reps": len(t),
                "median_us": med[name] * 1e3, "min_us": best[name] * 1e3,
                "x_sdpa": med[name] / med["sdpa"], "x_sdpa_min": best[name] / best["sdpa"],
                "gflops": 2.0 * B * Hs * T * T * Ds / med[name] / 1e6,  # causal: half of 4
                "picks": picks if name == "attention" else None, "peak_mib": None,
                "load": load})
    return rows


DECODE_COLUMNS = [("depth", "depth", ""), ("dtype", "dtype", ""), ("thr", "threads", ""),
                  ("impl", "impl", ""), ("ms", "median_ms", ".2f"),
                  ("KV GB/s", "kv_gb_s", ".1f"), ("x sdpa", "x_sdpa", ".1f"),
                  ("% roof", "pct_roof", ".0f"), ("/ step", "per_step", ".2f"),
                  ("picks", "picks", ""), ("load", "load", ".1f")]
SMALL_COLUMNS = [("shape", "shape", ""), ("impl", "impl", ""), ("median us", "median_us", ".1f"),
                 ("min us", "min_us", ".1f"), ("x sdpa", "x_sdpa", ".2f"),
                 ("x sdpa (min)", "x_sdpa_min", ".2f"), ("picks", "picks", ""),
                 ("load", "load", ".1f")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small depths, few reps")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--reps", type=int, help="timed calls per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default 1 2)")
    parser.add_argument("--depths", type=int, nargs="+",
                        help="KV cache depths (default 1024 4096 16384 32768 65536)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="skip the run with another process spinning on a core")
    parser.add_argument("--no-small", action="store_true", help="skip the small-call section")
    parser.add_argument("--small-reps", type=int, help="timed calls per small-call row")
    args = parser.parse_args(argv)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.depths = args.depths or ([1024] if args.quick else [1024, 4096, 16384, 32768, 65536])
    args.reps = args.reps or (3 if args.quick else 7)
    args.small_reps = args.small_reps or (20 if args.quick else 400)
    load_before = os.getloadavg()
    rows = decode_rows(args)
    if not args.no_small:
        rows += small_rows(args)
    env = _common.environment()
    env["threads"] = args.threads
    env["decode_implementation"] = _decode_ext.implementation()
    env["load_before"] = load_before
    env["load_after"] = os.getloadavg()
    print(_common.header_text(env) + f" | decode: {env['decode_implementation']} | load "
          f"average {load_before[0]:.2f} before, {env['load_after'][0]:.2f} after "
          f"({os.cpu_count()} logical cores)")
    print(_common.format_table([r for r in rows if r["kind"] != "small"], DECODE_COLUMNS))
    small = [r for r in rows if r["kind"] == "small"]
    if small:
        print()
        print(_common.format_table(small, SMALL_COLUMNS))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
