"""Token-by-token decoding: a KV cache against recomputing the whole prefix.

One causal ``attnkit.MultiHeadAttention`` layer (E=768, H=12, B=1, float32, ``eval()`` +
``inference_mode``) has already seen a context of ``C`` tokens and produces the next ones:

* ``cache``       - keys/values of the context sit in a :class:`attnkit.KVCache`; each step
                    projects one token and attends over the ``C + i`` cached positions
                    (O(C) work per token).
* ``cache GQA``   - the same with ``num_kv_heads=4``: a 3x smaller cache to read.
* ``recompute``   - no cache: each step runs the layer over the whole prefix and keeps the
                    last position (O(C^2) attention plus O(C) projections per token).

Each timed call decodes a fixed number of tokens (fewer for ``recompute`` at long contexts;
the cache is rewound to ``C`` between calls, which is valid because slots past ``pos`` are
never read). Tokens/s is tokens per call over the median call time. Before timing, the
script checks that both paths give the same outputs.

Usage::

    python benchmarks/bench_cache.py                 # contexts 256, 1024, 4096
    python benchmarks/bench_cache.py --quick         # seconds-long smoke test
    python benchmarks/bench_cache.py --contexts 1024 --json decode.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from attnkit.multihead import MultiHeadAttention  # noqa: E402

METHODS = ("cache", "cache GQA", "recompute")


def build(method: str, E: int, H: int) -> MultiHeadAttention:
    torch.manual_seed(0)
    kv_heads = H // 3 if method == "cache GQA" else H
    return MultiHeadAttention(E, H, num_kv_heads=kv_heads, causal=True).eval()


def make_decode(method: str, context: int, tokens: int, E: int, H: int, B: int):
    """A ``setup`` for :class:`_common.Case`: one call decodes ``tokens`` after ``context``."""

    def setup():
        mha = build(method, E, H)
        x = torch.randn(B, context + tokens, E, generator=torch.Generator().manual_seed(1))
        if method == "recompute":
            def decode():
                with torch.inference_mode():
                    for i in range(context, context + tokens):
                        mha(x[:, :i + 1])[:, -1]  # the whole prefix, keep the last position
            return decode

        with torch.inference_mode():  # the cache must be an inference tensor to be written there
            cache = mha.init_cache(B, context + tokens)
            mha(x[:, :context], cache=cache)  # prefill: not timed

        def decode():
            cache.pos = context  # rewind: later slots are overwritten before they are read
            with torch.inference_mode():
                for i in range(context, context + tokens):
                    mha(x[:, i:i + 1], cache=cache)
        return decode

    return setup


def check_same_output(E: int, H: int, context: int) -> float:
    """Max |cached - recomputed| over 4 decoded tokens (float32 round-off expected)."""
    mha = build("cache", E, H)
    x = torch.randn(1, context + 4, E, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = mha.init_cache(1, context + 4)
        mha(x[:, :context], cache=cache)
        steps = [mha(x[:, i:i + 1], cache=cache) for i in range(context, context + 4)]
        cached = torch.cat(steps, dim=1)  # (1, 4, E)
        full = mha(x)[:, context:]
    return (cached - full).abs().max().item()


def cases(args) -> list[_common.Case]:
    B, E, H = (1, 48, 6) if args.quick else (1, 768, 12)
    contexts = args.contexts or ([16, 64] if args.quick else [256, 1024, 4096])
    cached_tokens = 8 if args.quick else 64
    out = []
    for context in contexts:
        for method in METHODS:
            tokens = cached_tokens if method != "recompute" else (
                4 if args.quick else max(2, 4096 // context))
            kv_heads = H // 3 if method == "cache GQA" else H
            cache_mib = 2 * B * kv_heads * (context + tokens) * (E // H) * 4 / 2**20
            out.append(_common.Case(
                f"context={context}", method, make_decode(method, context, tokens, E, H, B),
                info={"context": context, "tokens": tokens, "E": E, "H": H, "B": B,
                      "cache_mib": cache_mib if method != "recompute" else None}))
    return out


COLUMNS = [("context", "context", ""), ("method", "impl", ""), ("tokens/call", "tokens", ""),
           ("ms/token", "ms_per_token", ".3f"), ("tokens/s", "tokens_per_s", ".1f"),
           ("x recompute", "speedup", ".1f"), ("peak MiB", "peak_mib", ".1f"),
           ("cache MiB", "cache_mib", ".1f")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--contexts", nargs="+", type=int, help="default 256 1024 4096")
    args = parser.parse_args(argv)
    _common.set_threads(args)
    all_cases = cases(args)
    if not args.memory_worker:
        for context in dict.fromkeys(c.info["context"] for c in all_cases):
            E, H = all_cases[0].info["E"], all_cases[0].info["H"]
            print(f"context={context}: max |cached - recomputed| = "
                  f"{check_same_output(E, H, context):.2e}", file=sys.stderr)
    rows = _common.run_cases(all_cases, args, warmup=1, reps=1 if args.quick else 3)
    if rows is None:  # the peak-memory worker already printed its results
        return
    for row in rows:
        row["ms_per_token"] = row["median_ms"] / row["tokens"]
        row["tokens_per_s"] = 1000.0 / row["ms_per_token"]
    for row in rows:
        slow = next(r for r in rows if r["group"] == row["group"] and r["impl"] == "recompute")
        row["speedup"] = row["tokens_per_s"] / slow["tokens_per_s"]
    env = _common.environment()
    print(_common.header_text(env))
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
