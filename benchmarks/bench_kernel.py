"""attnkit's fused C++ attention kernel side by side with the machine's roof and its peers, in
one process.

Groups (B=1, H=4, D=64, as bench_flex.py; ``--quick``: T=256, window 64, 4 documents):

* ``causal`` at T=4096 and T=16384: the kernel vs SDPA ``is_causal`` (and compiled
  FlexAttention, forward);
* ``window`` 512 and ``documents`` (16 packed documents of random lengths, causal inside)
  at T=16384: the kernel vs ``torch.compile(flex_attention, dynamic=False)``, warmed (its
  compile time is reported apart); CPU FlexAttention has no backward in torch 2.13, so its
  forward+backward rows stay empty;

each forward and forward+backward, float32 and bfloat16, at every ``--threads`` count. Every
group also times a same-run ``torch.mm`` roof (float32 2048^3, and for bfloat16 groups a
bfloat16 256^3: without native bf16 it runs at well under 1 GFLOP/s),
interleaved with the attention calls so load from other processes falls on all alike, and
each row shows its visible-work GFLOP/s as a share of the float32 roof (FLOPs: 4·D per
visible query-key pair and head forward, 3.5x that forward+backward).

``--busy`` adds groups timed while another process spins on one core: 1 and 2 threads
interleaved in one group, so the table says whether 2 threads are ever slower than 1 on a
shared machine. The load average is printed with the table.

    python benchmarks/bench_kernel.py --quick
    python benchmarks/bench_kernel.py --threads 1 2 --busy --json out/kernel.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402
from attnkit.backends import chunked  # noqa: E402

B, H, D = 1, 4, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The roofs' matmul sizes: float32 2048^3 (256^3 with --quick); bfloat16 256^3, since a CPU
# without native bf16 runs torch.mm in bf16 at well under 1 GFLOP/s (an AVX2 EPYC: 0.3).
ROOF_N = {"mm fp32": 2048, "mm bf16": 256}


def _cuts(T: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=g)[:n - 1].add(1).sort().values.tolist()
    return [0, *cuts, T]


def patterns(quick: bool, causal_lengths=(4096, 16384)) -> list[tuple]:
    """``(kind, label, T, attnkit kwargs, flex mask_mod, visible pairs)``."""
    out = []
    for T in ((256,) if quick else causal_lengths):
        out.append(("causal", "causal", T, {"causal": True}, lambda b, h, q, k: q >= k,
                    T * (T + 1) // 2))
    T = 256 if quick else 16384
    w = 64 if quick else 512
    out.append(("window", f"window {w}", T, {"window": w},
                lambda b, h, q, k: (q >= k) & (q - k < w), w * (w + 1) // 2 + (T - w) * w))
    cu = _cuts(T, 4 if quick else 16)
    ids = torch.searchsorted(torch.tensor(cu[1:]), torch.arange(T), right=True)
    pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu[:-1], cu[1:]))
    out.append(("documents", f"{len(cu) - 1} documents", T,
                {"mask_mod": M.documents(cu_seqlens=cu)},
                lambda b, h, q, k: (ids[q] == ids[k]) & (q >= k), pairs))
    return out


def _roof_n(impl: str, T: int) -> int:
    return 256 if T <= 256 else ROOF_N[impl]


def _inputs(T, dtype, grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_(grad)
            for _ in range(3)]


def _step(call, grad, T, dtype, threads):
    g = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)

    def step():
        torch.set_num_threads(threads)
        if grad:
            call().backward(g)
            return None
        with torch.no_grad():
            return call()
    return step


def make(impl, T, kwargs, mod, dtype, mode, threads, info):
    def setup():
        grad = mode == "fwd+bwd"
        torch.set_num_threads(threads)
        if impl.startswith("mm"):
            dt = torch.float32 if impl == "mm fp32" else dtype
            n = _roof_n(impl, T)
            a, b = (torch.randn(n, n).to(dt) for _ in range(2))
            return _step(lambda: a @ b, False, T, dtype, threads)
        q, k, v = _inputs(T, dtype, grad)
        if impl == "sdpa":
            def call():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                        is_causal=True)
        elif impl == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            compiled = torch.compile(flex_attention, dynamic=False)
            block = create_block_mask(mod, None, None, T, T, device="cpu")

            def call():
                return compiled(q, k, v, block_mask=block)
            start = time.perf_counter()
            with torch.no_grad():
                call()
            info["compile_s"] = round(time.perf_counter() - start, 1)
        else:
            which = "torch" if impl == "attnkit torch" else "kernel"

            def call():
                with chunked.use_implementation(which):
                    return attnkit.attention(q, k, v, backend="chunked", **kwargs)
            with chunked.use_implementation(which):
                info["runs"] = chunked.implementation(q, k, v, attnkit.MaskSpec.from_args(
                    **kwargs))[0]
        return _step(call, grad, T, dtype, threads)
    return setup


def cases(args) -> list[_common.Case]:
    flex_ok = not args.quick and not args.no_flex and \
        attnkit.backends.flex._unavailable("cpu") is None
    out = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for kind, name, T, kwargs, mod, pairs in patterns(args.quick, args.causal_lengths):
            if args.patterns and kind not in args.patterns:
                continue
            for mode in args.modes:
                for threads in args.threads:
                    impls = ["attnkit"] + (["attnkit torch"] if args.fallback else [])
                    impls += ["sdpa"] if name == "causal" else []
                    impls += ["flex"] if flex_ok and mode == "fwd" else []
                    impls += ["mm fp32"] + (["mm bf16"] if dname == "bf16" else [])
                    group = f"{name} T={T} {mode} {dname} {threads}T"
                    for impl in impls:
                        info = {"pattern": name, "T": T, "mode": mode, "dtype": dname,
                                "threads": threads}
                        roof = impl.startswith("mm")
                        flops = 2.0 * _roof_n(impl, T) ** 3 if roof else \
                            4.0 * D * H * B * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                        out.append(_common.Case(group, impl, make(impl, T, kwargs, mod, dtype,
                                                                  mode, threads, info),
                                                flops=flops, info=info, peer=not roof))
    return out


def busy_cases(args) -> list[_common.Case]:
    """1 and 2 threads interleaved in one group (run while a spinner holds a core)."""
    out = []
    busy = [p for p in patterns(args.quick, args.causal_lengths[:1])
            if p[0] in ("causal", "documents")]
    for kind, name, T, kwargs, mod, pairs in busy:
        for mode in args.modes:
            group = f"busy: {name} T={T} {mode} fp32"
            for threads in (1, 2):
                for impl in ["attnkit"] + (["sdpa"] if name == "causal" else []):
                    info = {"pattern": name, "T": T, "mode": mode, "dtype": "fp32",
                            "threads": threads, "busy": True}
                    flops = 4.0 * D * H * B * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                    out.append(_common.Case(group, f"{impl} {threads}T",
                                            make(impl, T, kwargs, mod, torch.float32, mode,
                                                 threads, info), flops=flops, info=info))
    return out


def _annotate(rows):
    """Each row's share of its group's float32 roof."""
    for group in {r["group"] for r in rows}:
        members = [r for r in rows if r["group"] == group]
        roof = next((r["gflops"] for r in members if r["impl"] == "mm fp32"), None)
        for r in members:
            r["roof_pct"] = 100.0 * r["gflops"] / roof if roof and r["gflops"] else None


COLUMNS = [("group", "group", ""), ("impl", "impl", ""), ("runs", "runs", ""),
           ("median ms", "median_ms", ".1f"), ("GFLOP/s", "gflops", ".1f"),
           ("% fp32 roof", "roof_pct", ".0f"), ("vs fastest", "ratio", ".2f"),
           ("paired", "ratio_paired", ".2f"), ("compile s", "compile_s", ""),
           ("peak MiB", "peak_mib", ".0f")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     conflict_handler="resolve")
    _common.add_common_args(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to time (default 1 2; --quick: 1)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--busy", action="store_true",
                        help="also time 1 vs 2 threads while another process spins on a core")
    parser.add_argument("--patterns", nargs="+", choices=["causal", "window", "documents"],
                        help="only these patterns (default: all)")
    parser.add_argument("--causal-lengths", type=int, nargs="+", default=[4096, 16384],
                        help="T of the causal groups")
    parser.add_argument("--no-flex", action="store_true", help="leave compiled flex out")
    parser.add_argument("--fallback", action="store_true",
                        help="also time chunked's PyTorch implementation")
    args = parser.parse_args(argv)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    threads, args.threads = args.threads, None  # run_cases must not set them: each case does
    args_cases = argparse.Namespace(**{**vars(args), "threads": threads})
    todo = cases(args_cases)
    reps = 2 if args.quick else 5
    rows = _common.run_cases(todo, args, warmup=1, reps=reps)
    if rows is None:  # the memory worker
        return
    if args.busy and not args.memory_worker:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy_args = argparse.Namespace(**{**vars(args), "no_memory": True})
            rows += _common.run_cases(busy_cases(args_cases), busy_args, warmup=1, reps=reps)
        finally:
            spinner.kill()
            spinner.wait()
    _annotate(rows)
    env = _common.environment()
    env["threads"] = threads
    env["load_average"] = os.getloadavg()
    env["kernel"] = chunked._kernel.status().describe()
    print(f"{_common.header_text(env)} | load {env['load_average'][0]:.1f} | "
          f"kernel: {env['kernel']}")
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, {"B": B, "H": H, "D": D, "quick": args.quick},
                           rows)


if __name__ == "__main__":
    main()
