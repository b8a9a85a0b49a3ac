"""Mask patterns side by side: attnkit ``auto`` vs SDPA (dense mask or ``is_causal``) vs
FlexAttention, in one process, one thread by default.

Groups (B=1, H=4, D=64, float32, T=16384; ``--quick``: T=512):

* ``window``: sliding window of 512 keys (quick: 64). Peers: SDPA with the dense mask,
  ``flex_attention`` (compiled; forward only on CPU, where it has no backward).
* ``documents``: 16 packed documents of random lengths, causal within each. Peers: SDPA
  with the dense block-diagonal mask, flex. The max |auto - SDPA| is reported.
* ``causal``: plain causal attention. Peer: SDPA ``is_causal``.
* ``causal_mod``: the same spelled ``mask_mod=masks.causal()``: the lowering makes it
  SDPA's ``is_causal`` too, so it must cost what ``causal`` costs.

``auto`` is ``attnkit.attention(backend="auto")``; the row says which backend it picked
(``explain``). ``chunked`` is shown for reference (``peer=False``). Flex's first call
compiles; that time is reported in its own column, not in the median. FLOPs count the
visible query-key pairs (4·D per pair forward, 3.5x that forward+backward). ``--quick``
(a smoke test) leaves flex out, since its compile alone takes tens of seconds.

    python benchmarks/bench_masks.py --quick
    python benchmarks/bench_masks.py --json out/masks.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks as M  # noqa: E402

B, H, D = 1, 4, 64


def _doc_lengths(T: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(T - 1, generator=g)[:n - 1].add(1).sort().values.tolist()
    return [0, *cuts, T]


def patterns(T: int, window: int, docs: int) -> dict:
    """name -> (attention kwargs, dense bool mask builder or 'causal', visible pairs)."""
    cu = _doc_lengths(T, docs)
    doc_pairs = sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu[:-1], cu[1:]))
    w = min(window, T)
    return {
        "window": ({"window": window},
                   lambda: M.sliding_window_mask(T, T, window),
                   w * (w + 1) // 2 + (T - w) * w),
        "documents": ({"mask_mod": M.documents(cu_seqlens=cu)},
                      lambda: M.MaskSpec(mask_mod=M.documents(cu_seqlens=cu)).dense(T, T)[0, 0],
                      doc_pairs),
        "causal": ({"causal": True}, "causal", T * (T + 1) // 2),
        # The same mask spelled as a description: the lowering must make it cost the same.
        "causal_mod": ({"mask_mod": M.causal()}, "causal", T * (T + 1) // 2),
    }


def _inputs(T, grad):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(grad) for _ in range(3)]


def make(impl: str, kwargs, dense, mode: str, T: int, info: dict):
    def setup():
        grad = mode == "fwd+bwd"
        q, k, v = _inputs(T, grad)
        if impl == "sdpa":
            mask = None if dense == "causal" else dense()
            causal = dense == "causal"

            def call():
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal)
        elif impl == "flex":
            def call():
                return attnkit.attention(q, k, v, backend="flex", **kwargs)
            with torch.no_grad():
                start = time.perf_counter()
                call()
                info["compile_s"] = time.perf_counter() - start
        else:
            backend = impl

            def call():
                return attnkit.attention(q, k, v, backend=backend, **kwargs)
            if impl == "auto":
                with torch.set_grad_enabled(grad):
                    info["auto_picks"] = attnkit.explain(q, k, v, **kwargs).chosen
        if grad:
            g = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))

            def step():
                for t in (q, k, v):
                    t.grad = None
                call().backward(g)
            return step

        def step():
            with torch.no_grad():
                return call()
        return step
    return setup


def cases(args) -> list[_common.Case]:
    T = args.length or (512 if args.quick else 16384)
    window = 64 if args.quick else 512
    docs = 4 if args.quick else 16
    # --quick leaves flex out: its compile alone takes tens of seconds.
    flex_ok = attnkit.backends.flex._unavailable("cpu") is None and not args.quick
    out = []
    for name, (kwargs, dense, pairs) in patterns(T, window, docs).items():
        if args.patterns and name not in args.patterns:
            continue
        for mode in args.modes:
            impls = ["auto", "sdpa"]
            if name != "causal":
                impls.append("chunked")
                if flex_ok and mode == "fwd":
                    impls.insert(0, "flex")  # first: compiled before auto's choice is made
            for impl in impls:
                info = {"pattern": name, "mode": mode, "T": T, "H": H, "D": D,
                        "dtype": "float32"}
                flops = 4.0 * D * H * B * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
                out.append(_common.Case(f"{name} {mode}", impl,
                                        make(impl, kwargs, dense, mode, T, info), flops=flops,
                                        info=info, peer=impl != "chunked"))
    return out


COLUMNS = [("pattern", "pattern", ""), ("mode", "mode", ""), ("T", "T", ""),
           ("impl", "impl", ""), ("auto picks", "auto_picks", ""),
           ("median ms", "median_ms", ".1f"), ("x fastest", "ratio", ".2f"),
           ("min ms", "min_ms", ".1f"), ("x (paired)", "ratio_paired", ".2f"),
           ("GFLOP/s", "gflops", ".1f"),
           ("peak MiB", "peak_mib", ".0f"), ("compile s", "compile_s", ".1f")]


def summary(rows: list[dict]) -> list[str]:
    """auto's speed-up over each peer in its group (median and minimum times)."""
    lines = []
    by = {(r["group"], r["impl"]): r for r in rows}
    for group in dict.fromkeys(r["group"] for r in rows):
        auto = by.get((group, "auto"))
        if not auto:
            continue
        for peer in ("sdpa", "flex", "chunked"):
            if (group, peer) in by:
                p = by[(group, peer)]
                paired = p["ratio_paired"] / auto["ratio_paired"]
                lines.append(f"{group}: {peer} / auto = {p['median_ms'] / auto['median_ms']:.2f}x"
                             f" (median), {p['min_ms'] / auto['min_ms']:.2f}x (min), "
                             f"{paired:.2f}x (paired)")
    return lines


def _equal_outputs(T: int, window: int, docs: int) -> list[str]:
    lines = []
    for name, (kwargs, dense, _) in patterns(T, window, docs).items():
        q, k, v = _inputs(T, False)
        with torch.no_grad():
            a = attnkit.attention(q, k, v, **kwargs)
            mask = None if dense == "causal" else dense()
            b = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=dense == "causal")
        lines.append(f"{name}: max |auto - sdpa| = {(a - b).abs().max().item():.2e}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--length", type=int, help="T (default 16384; quick 512)")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--patterns", nargs="+",
                        choices=["window", "documents", "causal", "causal_mod"])
    args = parser.parse_args(argv)
    if not args.threads:
        args.threads = 1
    rows = _common.run_cases(cases(args), args, warmup=1, reps=2 if args.quick else 3)
    if rows is None:
        return
    env = _common.environment()
    print(_common.header_text(env))
    print(_common.format_table(rows, COLUMNS))
    print("\n".join(summary(rows)))
    T = args.length or (512 if args.quick else 16384)
    print("\n".join(_equal_outputs(T, 64 if args.quick else 512, 4 if args.quick else 16)))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
