"""Prefill of a tiny Mistral-like transformers model on each attention implementation.

Model (random weights from a config, no download): hidden 256, 4 heads of 64 (4 key/value
heads), 2 layers, intermediate 512, vocabulary 128, sliding window 512, float32, batch 1.
One forward over T tokens (``T`` = 8192, 16384, 32768; ``--quick``: 512 with window
64) with ``attn_implementation`` = ``eager``, ``sdpa``, ``flex_attention`` and ``attnkit``
(``attnkit.integrations.transformers.register()``, backend ``auto``).

Each implementation runs in **its own process** (``--worker``), so one's memory and
compile caches do not leak into another's numbers. A worker builds the model, calls it once
(flex compiles here: that call's time is the ``first s`` column), then times ``--reps``
calls. Peak MiB is the resident high-water mark of the first call above what the process
held before it (flex's includes its compile); ``rss MiB`` is the process' whole peak
resident set. ``GFLOP/s`` counts the attention FLOPs of the visible query-key pairs
(4·D per pair per head per layer) over the whole forward's time. ``max |Δ|`` compares the
logits with sdpa's (eager's where sdpa is absent). ``eager`` materialises ``H x T x T``
float32 scores per layer (16 GiB at 32k) and is skipped above ``--eager-max`` (8192).

    python benchmarks/bench_transformers.py --threads 1 --lengths 8192 16384 --json out/hf.json
    python benchmarks/bench_transformers.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

IMPLS = ["eager", "sdpa", "flex_attention", "attnkit"]
HIDDEN, HEADS, LAYERS, VOCAB = 256, 4, 2, 128
COLUMNS = [("T", "T", ""), ("implementation", "impl", ""), ("median ms", "median_ms", ".1f"),
           ("first s", "first_s", ".1f"), ("GFLOP/s", "gflops", ".1f"),
           ("peak MiB", "peak_mib", ".0f"), ("rss MiB", "rss_mib", ".0f"),
           ("vs sdpa", "vs_sdpa", ".2f"), ("max |Δ|", "max_diff", ".1e"),
           ("torch", "torch", ""), ("device", "device", "")]


def _model(impl: str, window: int):
    from transformers import AutoModelForCausalLM, MistralConfig

    if impl == "attnkit":
        from attnkit.integrations.transformers import register
        register()
    config = MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=HEADS, sliding_window=window,
                           max_position_embeddings=1 << 17)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def _visible_pairs(T: int, w: int) -> int:
    w = min(w, T)
    return w * (w + 1) // 2 + (T - w) * w


def worker(impl: str, T: int, window: int, reps: int, out: str) -> dict:
    """Run one implementation at one length in this process; logits go to ``out``."""
    model = _model(impl, window)
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    start = time.perf_counter()
    logits = None

    def first():
        nonlocal logits
        logits = call()

    peak = _common.peak_memory_mib(first)
    first_s = time.perf_counter() - start
    torch.save(logits[0].float(), out)
    del logits
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    flops = 4 * 64 * HEADS * LAYERS * _visible_pairs(T, window)
    return {"T": T, "impl": impl, "median_ms": ms, "times_ms": times, "first_s": first_s,
            "gflops": flops / ms / 1e6, "peak_mib": peak,
            "rss_mib": _common._status_mib("VmHWM:"), "window": window}


def _run_worker(impl, T, window, reps, threads, out) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--lengths", str(T),
           "--window", str(window), "--reps", str(reps), "--logits", out]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{impl} at T={T} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return {"T": T, "impl": impl, "median_ms": None, "gflops": None, "peak_mib": None,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths T")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations to run")
    parser.add_argument("--window", type=int, help="sliding window (default 512; quick 64)")
    parser.add_argument("--eager-max", type=int, default=8192,
                        help="skip eager above this T (it builds H x T x T scores)")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--logits", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _common.set_threads(args)
    window = args.window or (64 if args.quick else 512)
    if args.worker:
        row = worker(args.worker, args.lengths[0], window, args.reps, args.logits)
        print(json.dumps(row))
        return
    lengths = args.lengths or ([512] if args.quick else [8192, 16384, 32768])
    # --quick leaves flex out: its compile alone takes tens of seconds
    impls = args.impls or ([i for i in IMPLS if i != "flex_attention"] if args.quick else IMPLS)
    reps = args.reps or (2 if args.quick else 3)
    env = _common.environment()
    env["threads"] = args.threads or (1 if args.quick else torch.get_num_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for T in lengths:
            logits = {}
            for impl in impls:
                if impl == "eager" and T > args.eager_max:
                    print(f"  skip eager at T={T} (> --eager-max {args.eager_max})",
                          file=sys.stderr)
                    continue
                out = os.path.join(tmp, f"{impl}-{T}.pt")
                row = _run_worker(impl, T, window, reps, args.threads or
                                  (1 if args.quick else None), out)
                row.update(torch=env["torch"], device=env["device"])
                if os.path.exists(out):
                    logits[impl] = torch.load(out)
                rows.append(row)
                print(f"  {impl} T={T}: {row.get('median_ms')} ms", file=sys.stderr,
                      flush=True)
            ref_name = "sdpa" if "sdpa" in logits else next(iter(logits), None)
            ref = [r for r in rows if r["T"] == T and r["impl"] == "sdpa"]
            for row in rows:
                if row["T"] != T:
                    continue
                if ref_name and row["impl"] in logits:
                    row["max_diff"] = (logits[row["impl"]] - logits[ref_name]).abs().max().item()
                if ref and ref[0].get("median_ms") and row.get("median_ms"):
                    row["vs_sdpa"] = ref[0]["median_ms"] / row["median_ms"]
    print(_common.header_text(env))
    print(f"Mistral-like prefill: hidden {HIDDEN}, {HEADS} heads x 64, {LAYERS} layers, "
          f"window {window}, float32, batch 1; vs sdpa = sdpa's time / this time")
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, {**vars(args), "window": window, "reps": reps},
                           rows)


if __name__ == "__main__":
    main()
