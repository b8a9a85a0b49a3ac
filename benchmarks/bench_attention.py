"""Attention engine benchmark: math vs SDPA vs chunked vs auto, each config in its own process.

Every configuration runs in a fresh subprocess so its peak RSS (``ru_maxrss``) belongs to it
alone. Shapes follow issue 3: B=1, H=12, D=64, T from 1k up, causal and sliding-window
(w=1024) masks, forward and forward+backward, float32 and bfloat16.

Implementations:
    math        the spec (materialises T x S scores)
    sdpa        F.scaled_dot_product_attention with is_causal (causal) or the dense window
                mask a user would otherwise have to pass
    sdpa_dense  SDPA with a dense causal mask (what nn.MultiheadAttention users often pass)
    chunked     attnkit's O(T)-memory online-softmax backend
    auto        attnkit.attention(backend="auto")

A configuration is skipped (and shown as such) when its estimated memory exceeds --max-gib.

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --lengths 1024 4096 16384 --json out/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("math", "sdpa", "sdpa_dense", "chunked", "auto")
B, H, D = 1, 12, 64


def visible_pairs(T: int, mask: str, window: int) -> int:
    """Query-key pairs that a causal or windowed mask leaves visible (for GFLOP/s)."""
    if mask == "causal":
        return T * (T + 1) // 2
    w = min(window, T)
    return w * (w + 1) // 2 + (T - w) * w


def estimate_gib(cfg: dict) -> float:
    """Rough peak memory of one configuration, to skip what would not fit."""
    T, elt = cfg["T"], 4 if cfg["dtype"] == "float32" else 2
    inputs = 3 * B * H * T * D * elt * (3 if cfg["mode"] == "fwd+bwd" else 1)
    if cfg["impl"] == "math":  # scores, weights (and their grads) in float32
        quad = B * H * T * T * 4 * (2 if cfg["mode"] == "fwd" else 4)
    elif cfg["impl"] in ("sdpa_dense",) or (cfg["impl"] == "sdpa" and cfg["mask"] == "window"):
        quad = T * T * (1 + elt)  # the bool mask and SDPA's float copy of it
    else:
        quad = 0
    return (inputs + quad) / 2**30 + 0.4  # + the interpreter and torch itself


def run_one(cfg: dict) -> dict:
    """Time one configuration in this process; returns the measured row."""
    import torch

    import attnkit

    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    T, grad = cfg["T"], cfg["mode"] == "fwd+bwd"
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=grad) for _ in range(3))
    window = cfg["window"] if cfg["mask"] == "window" else None
    if cfg["impl"] in ("math", "chunked", "auto"):
        kwargs = {"causal": True, "window": window, "backend": cfg["impl"]}
        fn = lambda: attnkit.attention(q, k, v, **kwargs)  # noqa: E731
    else:
        from attnkit.masks import causal_mask, sliding_window_mask
        import torch.nn.functional as F

        dense = cfg["impl"] == "sdpa_dense" or window is not None
        mask = None
        if dense:
            mask = sliding_window_mask(T, T, window) if window else causal_mask(T)
        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask, is_causal=not dense)

    def step():
        out = fn()
        if grad:
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None

    times, deadline = [], time.perf_counter() + cfg["budget_s"]
    for _ in range(cfg.get("warmup", 1)):
        step()
    for _ in range(cfg["reps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    ms = statistics.median(times) * 1e3
    flops = 4 * B * H * D * visible_pairs(T, cfg["mask"], cfg["window"]) * (3.5 if grad else 1)
    return {**cfg, "ms": ms, "gflops": flops / (ms * 1e-3) / 1e9, "reps_run": len(times),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def measure(cfg: dict, max_gib: float, isolate: bool = True) -> dict:
    """Run ``cfg`` in a subprocess (fresh peak RSS), or mark it skipped.

    ``isolate=False`` runs it in this process (seconds faster; peak MiB is then the process's
    running maximum, not the configuration's own).
    """
    if estimate_gib(cfg) > max_gib:
        return {**cfg, "skipped": f"needs ~{estimate_gib(cfg):.0f} GiB > {max_gib:g}"}
    if not isolate:
        return run_one(cfg)
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {**cfg, "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_row(r: dict, best_sdpa: dict) -> None:
    head = f"{r['T']:>6} {r['mask']:>6} {r['mode']:>7} {r['dtype']:>8} {r['impl']:>10}"
    if "skipped" in r:
        print(f"{head}   {'-':>10} {'-':>8} {'-':>9} {'-':>7}  skipped: {r['skipped']}")
        return
    ref = best_sdpa.get((r["T"], r["mask"], r["mode"], r["dtype"]))
    ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
    print(f"{head}   {r['ms']:>10.1f} {r['gflops']:>8.1f} {r['peak_mib']:>9.0f} {ratio:>7}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384,
                                                               32768, 65536])
    p.add_argument("--masks", nargs="+", default=["causal", "window"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=60.0, help="time cap per config")
    p.add_argument("--max-gib", type=float, default=16.0)
    p.add_argument("--json", help="also write all rows to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return 0
    if a.quick:  # in-process, one small length: a smoke test of every code path
        a.lengths, a.window, a.reps, a.dtypes = [256], 64, 1, ["float32"]

    import torch

    threads = a.threads or torch.get_num_threads()
    print(f"# torch {torch.__version__}, device cpu ({platform.processor() or platform.machine()}),"
          f" {threads} threads, B={B} H={H} D={D}, window={a.window}")
    print(f"{'T':>6} {'mask':>6} {'mode':>7} {'dtype':>8} {'impl':>10}   {'median ms':>10} "
          f"{'GFLOP/s':>8} {'peak MiB':>9} {'vs sdpa':>7}"
          + ("   (quick: in-process, peak MiB is cumulative)" if a.quick else ""))
    rows, best_sdpa = [], {}
    for dtype in a.dtypes:
        for mask in a.masks:
            for mode in a.modes:
                for T in a.lengths:
                    for impl in a.impls:
                        cfg = {"T": T, "mask": mask, "mode": mode, "dtype": dtype,
                               "impl": impl, "window": a.window, "reps": a.reps,
                               "budget_s": a.budget_s, "warmup": a.warmup,
                               "threads": a.threads}
                        r = measure(cfg, a.max_gib, isolate=not a.quick)
                        if impl == "sdpa" and "ms" in r:
                            best_sdpa[(T, mask, mode, dtype)] = r["ms"]
                        print_row(r, best_sdpa)
                        sys.stdout.flush()
                        rows.append(r)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        tmp = a.json + ".tmp"
        env = {"torch": torch.__version__, "threads": threads,
               "device": f"cpu ({platform.processor() or platform.machine()})"}
        results = [dict(r, median_ms=r.get("ms"), gflops=r.get("gflops"),
                        peak_mib=r.get("peak_mib")) for r in rows]  # the shared JSON columns
        with open(tmp, "w") as f:
            json.dump({"environment": env, "config": vars(a), "results": results}, f, indent=1)
        os.replace(tmp, a.json)  # atomic: an interrupted run never leaves half a file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
