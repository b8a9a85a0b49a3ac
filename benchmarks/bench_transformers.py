"""transformers models on attnkit against transformers' own attention implementations.

Two parts (``--parts``, both by default):

``llama``: the path most people run, a tiny Llama without a window with Llama-3's attention
geometry (hidden 256, 8 query heads of dimension 128 on 2 key/value heads, 2 layers,
intermediate 512, vocabulary 128, float32, batch 1), ``sdpa`` and ``attnkit`` side by side in this process with the same weights, timed in
paired rounds (one call of each per round, the order alternating) and compared by the
median of the per-round ratios (``time / sdpa``: below 1 is faster):

* ``prefill``: one forward over T tokens (T = 4096, 8192; ``--quick``: 256), causal, no
  padding; ``max |Δ|`` against sdpa's logits;
* ``decode static``: a ``StaticCache`` of 32768 positions with 1024 filled by a prefill, then
  16 greedy single-token steps (ms per token, prefill not timed); tokens must be identical;
* ``decode dynamic``: the same over a ``DynamicCache`` holding 8192 tokens.

``window``: prefill of a tiny Mistral-like model, each implementation in its own process.

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

    python benchmarks/bench_transformers.py --threads 1 --parts llama --json out/hf_llama.json
    python benchmarks/bench_transformers.py --threads 1 --parts window --lengths 8192 16384
    python benchmarks/bench_transformers.py --quick
"""

from __future__ import annotations

import argparse
import copy
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


# Llama-3's attention geometry (head dim 128, 4 query heads per key/value head) on a tiny
# model: decode reads a realistic KV layout, the rest of the model stays small.
LLAMA_HEADS, LLAMA_KV_HEADS, LLAMA_D = 8, 2, 128
LLAMA = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
             num_hidden_layers=LAYERS, num_attention_heads=LLAMA_HEADS,
             num_key_value_heads=LLAMA_KV_HEADS, head_dim=LLAMA_D,
             max_position_embeddings=1 << 17)
LLAMA_COLUMNS = [("case", "case", ""), ("T", "T", ""), ("cache", "S", ""),
                 ("implementation", "impl", ""), ("median ms", "median_ms", ".2f"),
                 ("per", "per", ""), ("time / sdpa", "time_vs_sdpa", ".2f"),
                 ("GFLOP/s", "gflops", ".2f"), ("peak MiB", "peak_mib", ".0f"),
                 ("check", "check", ""), ("torch", "torch", "")]


def _llama_pair() -> dict:
    """``{"sdpa": model, "attnkit": model}``, tiny Llamas with the same random weights."""
    import attnkit.integrations.transformers  # noqa: F401  (registers "attnkit")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                            attn_implementation="sdpa").eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                            attn_implementation="attnkit").eval()
    ours.load_state_dict(sdpa.state_dict())
    return {"sdpa": sdpa, "attnkit": ours}


def _decode(model, kind: str, context: int, filled: int, steps: int):
    """Prefill ``filled`` tokens into a cache (untimed), then ``steps`` greedy steps:
    ``(ms per token, tokens)``."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(0, VOCAB, (1, filled), generator=torch.Generator().manual_seed(2))
    cache = StaticCache(config=model.config, max_cache_len=context) if kind == "static" \
        else DynamicCache(config=model.config)
    tokens = []
    with torch.no_grad():
        token = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
        ms = (time.perf_counter() - start) * 1e3 / steps
    return ms, torch.cat(tokens, 1)


def _paired(fns: dict, reps: int) -> dict:
    """Per implementation, the results of ``reps`` rounds of one call each (order
    alternating round to round, so drift in the machine's load falls on both)."""
    out = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(fns[name]())
    return out


def _ratio_rows(case, T, S, per, times, flops, peaks, check, env) -> list[dict]:
    ratios = [a / b for a, b in zip(times["attnkit"], times["sdpa"])]
    rows = []
    for name, ms in times.items():
        median = statistics.median(ms)
        rows.append({"case": case, "T": T, "S": S, "impl": name, "median_ms": median,
                     "times_ms": ms, "per": per, "gflops": flops / median / 1e6,
                     "time_vs_sdpa": statistics.median(ratios) if name == "attnkit" else 1.0,
                     "peak_mib": peaks.get(name), "check": check, "torch": env["torch"],
                     "device": env["device"]})
    return rows


def llama_rows(quick: bool, reps: int | None, env: dict) -> list[dict]:
    """Prefill and decode of the tiny Llama, sdpa and attnkit paired in this process."""
    models = _llama_pair()
    D, H, L = LLAMA_D, LLAMA_HEADS, LAYERS
    rows = []
    lengths = [256] if quick else [4096, 8192]
    reps_prefill = reps or (2 if quick else 5)
    for T in lengths:
        ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))

        def prefill(model):
            with torch.no_grad():
                return model(ids, use_cache=False).logits

        logits = {name: prefill(m) for name, m in models.items()}  # warm-up and check
        diff = (logits["attnkit"] - logits["sdpa"]).abs().max().item()
        del logits
        peaks = {name: _common.peak_memory_mib(lambda m=m: prefill(m))
                 for name, m in models.items()}

        def timed(model):
            start = time.perf_counter()
            prefill(model)
            return (time.perf_counter() - start) * 1e3

        times = _paired({name: (lambda m=m: timed(m)) for name, m in models.items()},
                        reps_prefill)
        flops = 4 * D * H * L * T * (T + 1) // 2
        rows += _ratio_rows("prefill", T, T, "call", times, flops, peaks,
                            f"max |Δ| {diff:.1e}", env)
        print(f"  llama prefill T={T} done", file=sys.stderr, flush=True)
    decodes = [("static", 1024, 64, 4), ("dynamic", None, 256, 4)] if quick else \
        [("static", 32768, 1024, 16), ("dynamic", None, 8192, 16)]
    reps_decode = reps or (2 if quick else 5)
    for kind, context, filled, steps in decodes:
        runs = {name: (lambda m=m: _decode(m, kind, context, filled, steps))
                for name, m in models.items()}
        first = {name: fn() for name, fn in runs.items()}  # warm-up and the token check
        same = torch.equal(first["attnkit"][1], first["sdpa"][1])
        peaks = {name: _common.peak_memory_mib(fn) for name, fn in runs.items()}
        results = _paired(runs, reps_decode if kind == "static" else max(2, reps_decode - 2))
        times = {name: [ms for ms, _ in res] for name, res in results.items()}
        same = same and all(torch.equal(a[1], b[1]) for a, b in
                            zip(results["attnkit"], results["sdpa"]))
        flops = 4 * D * H * L * (filled + steps / 2)  # attention FLOPs of one step
        rows += _ratio_rows(f"decode {kind}", 1, context or filled, "token", times, flops,
                            peaks, "same tokens" if same else "TOKENS DIFFER", env)
        print(f"  llama decode {kind} done", file=sys.stderr, flush=True)
    return rows


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


def window_rows(args, window: int, env: dict) -> list[dict]:
    """The Mistral-like prefill, each implementation in its own process."""
    lengths = args.lengths or ([512] if args.quick else [8192, 16384, 32768])
    # --quick leaves flex out: its compile alone takes tens of seconds
    impls = args.impls or ([i for i in IMPLS if i != "flex_attention"] if args.quick else IMPLS)
    reps = args.reps or (2 if args.quick else 3)
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
                row.update(case="window prefill", torch=env["torch"], device=env["device"])
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
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--parts", nargs="+", choices=["llama", "window"],
                        help="which tables (default both)")
    parser.add_argument("--lengths", type=int, nargs="+", help="window part: lengths T")
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        help="window part: implementations to run")
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
    parts = args.parts or ["llama", "window"]
    env = _common.environment()
    env["threads"] = args.threads or (1 if args.quick else torch.get_num_threads())
    rows = []
    print(_common.header_text(env))
    if "llama" in parts:
        llama = llama_rows(args.quick, args.reps, env)
        rows += llama
        print(f"Tiny Llama: hidden {HIDDEN}, {LLAMA_HEADS} query heads x {LLAMA_D} on "
              f"{LLAMA_KV_HEADS} key/value heads, {LAYERS} layers, float32, batch 1; sdpa "
              f"and attnkit paired in one process; "
              f"time / sdpa = median of the per-round ratios (below 1: attnkit faster)")
        print(_common.format_table(llama, LLAMA_COLUMNS))
    if "window" in parts:
        windowed = window_rows(args, window, env)
        rows += windowed
        print(f"Mistral-like prefill: hidden {HIDDEN}, {HEADS} heads x 64, {LAYERS} layers, "
              f"window {window}, float32, batch 1; vs sdpa = sdpa's time / this time")
        print(_common.format_table(windowed, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, {**vars(args), "window": window}, rows)


if __name__ == "__main__":
    main()
