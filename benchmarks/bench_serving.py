"""Serving and packed training on CPU: continuous batching, mask/plan building, packed steps.

Three measurements, each against transformers' own CPU paths:

1. ``generate_batch`` (continuous batching) of a tiny Llama (random weights from a config:
   hidden 128, 4 heads x 32, 2 key/value heads, 2 layers, vocabulary 256, float32) for
   ``--requests`` prompts of ``--min-len`` .. ``--max-len`` tokens (uniform, seeded) and
   ``--new`` new tokens each, greedy, with ``sdpa``, ``paged|eager`` and ``attnkit_flash``
   (:mod:`attnkit.integrations.transformers_varlen`). Each implementation runs in **its own
   process** (peak RSS is that process' high-water mark; ``--quick`` runs all in one). Reported: tokens/s (new tokens over
   the wall time), time to first token (median over requests, from submission), peak RSS and
   whether the tokens equal ``paged|eager``'s (``sdpa``'s when paged|eager is not run).
2. Mask / plan building against the number of requests (8, 32, 128; decode batches: one query
   per request over 64..4096 cached keys): transformers' ``build_attention_mask`` (the dense
   float ``total_q x total_k`` mask sdpa and paged|eager use) against attnkit's
   ``masks.varlen`` description, its block summary and ``plan_groups``.
3. One packed training step (forward + backward) of 8 sequences of 64..2048 tokens packed into
   one row (``DataCollatorWithFlattening``) on attnkit_flash, against ``sdpa`` on the same
   sequences as a right-padded batch; median ms and peak MiB (resident high-water mark in a
   fresh process, see ``_common``).

    python benchmarks/bench_serving.py --threads 1 --json out/serving.json
    python benchmarks/bench_serving.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

CB_IMPLS = ["sdpa", "paged|eager", "attnkit_flash"]
PAGE = 64
COLUMNS = [("part", "group", ""), ("implementation", "impl", ""), ("size", "size", ""),
           ("median ms", "median_ms", ".1f"), ("tokens/s", "tokens_per_s", ".1f"),
           ("TTFT s", "ttft_s", ".2f"), ("peak MiB", "peak_mib", ".0f"),
           ("vs best peer", "speedup", ".2f"), ("same tokens", "same_tokens", "")]


def _config(max_len: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max(max_len * 2, 256))


def _quiet():
    import transformers
    transformers.logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)


def _model(impl: str, max_len: int, dtype=torch.float32):
    from transformers import LlamaForCausalLM
    if impl == "attnkit_flash":
        from attnkit.integrations.transformers_varlen import register
        register()
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(_config(max_len), attn_implementation=impl,
                                          dtype=dtype)
    model.generation_config.eos_token_id = None
    return model


def _lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cb_worker(impl: str, args) -> dict:
    """One continuous-batching run in this process."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    _quiet()
    lens = _lengths(args.requests, args.min_len, args.max_len, 0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in lens]
    model = _model(impl, args.max_len).eval()
    gen = GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    pages = sum((n + args.new) // PAGE + 2 for n in lens)  # explicit sizes: F4 in the docs
    cb = ContinuousBatchingConfig(num_blocks=pages, page_size=PAGE,
                                  max_batch_tokens=args.batch_tokens)
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                               record_timestamps=True, progress_bar=False, warmup=False)
    wall = time.perf_counter() - start
    order = sorted(out, key=lambda r: int(r.split("_")[-1]))
    ttft = [out[r].timestamps[0] - out[r].created_time for r in order if out[r].timestamps]
    return {"impl": impl, "median_ms": wall * 1e3, "tokens_per_s": args.requests * args.new / wall,
            "ttft_s": statistics.median(ttft) if ttft else None,
            "peak_mib": _common._status_mib("VmHWM:"),
            "tokens": [out[r].generated_tokens for r in order],
            "size": f"{args.requests} req {args.min_len}-{args.max_len}+{args.new}"}


def packed_worker(impl: str, args) -> dict:
    """One packed (attnkit) or padded (sdpa) training step, timed, in this process."""
    from transformers import DataCollatorWithFlattening
    _quiet()
    lens = _lengths(args.seqs, args.min_seq, args.max_seq, 2)
    g = torch.Generator().manual_seed(3)
    feats = [{"input_ids": torch.randint(1, 256, (n,), generator=g).tolist()} for n in lens]
    model = _model(impl, args.max_seq).train()
    if impl == "attnkit_flash":
        batch = DataCollatorWithFlattening()(feats)
    else:  # right-padded batch with a padding mask
        width = max(lens)
        ids = torch.zeros(len(lens), width, dtype=torch.long)
        mask = torch.zeros(len(lens), width, dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, :lens[i]] = torch.tensor(f["input_ids"])
            mask[i, :lens[i]] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": ids.masked_fill(mask == 0, -100)}

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()

    peak = _common.peak_memory_mib(step)
    times = _common.time_interleaved({"s": step}, warmup=0, reps=args.reps)["s"]
    return {"impl": impl, "median_ms": statistics.median(times), "peak_mib": peak,
            "size": f"{args.seqs} seqs {args.min_seq}-{args.max_seq} ({sum(lens)} tokens)"}


def _run(kind: str, impl: str, argv: list[str], args) -> dict:
    if args.quick:  # a smoke test: in this process (peak MiB is then the process' so far)
        return (cb_worker if kind == "cb" else packed_worker)(impl, args)
    env = {**os.environ, **_common._MEMORY_ENV}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker",
                           kind, impl], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(f"{kind} {impl} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
        return {"impl": impl, "median_ms": None, "error": proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mask_rows(counts: list[int], max_len: int, reps: int) -> list[dict]:
    """Dense transformers mask against attnkit's description + plan, decode batches."""
    from transformers.generation.continuous_batching.utils import build_attention_mask

    from attnkit.masks import varlen
    from attnkit.varlen import plan_groups
    rows = []
    for n in counts:
        lk = _lengths(n, 64, max_len, 4)
        cu_q, cu_k = list(range(n + 1)), [0]
        for x in lk:
            cu_k.append(cu_k[-1] + x)

        def dense(n=n, cu_q=cu_q, cu_k=cu_k):
            m = torch.full((1, 1, n, cu_k[-1]), torch.finfo(torch.float32).min)
            build_attention_mask(m, cu_q, cu_k)

        def ours(n=n, cu_q=cu_q, cu_k=cu_k, lk=lk):
            mod = varlen(torch.tensor(cu_q), torch.tensor(cu_k))
            mod.summary(n, cu_k[-1], 256, 64)
            plan_groups([1] * n, lk, 4.0 * 4 * 32)

        times = _common.time_interleaved({"dense": dense, "ours": ours}, warmup=1, reps=reps)
        for impl, fn_name in (("transformers build_attention_mask", "dense"),
                              ("attnkit masks.varlen + summary + plan", "ours")):
            rows.append({"group": "mask build", "impl": impl, "size": f"{n} requests",
                         "requests": n, "total_k": cu_k[-1],
                         "median_ms": statistics.median(times[fn_name]), "peak_mib": None})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    for name, full, quick in (("requests", 32, 4), ("min-len", 64, 16), ("max-len", 4096, 96),
                              ("new", 64, 4), ("batch-tokens", 512, 64), ("seqs", 8, 4),
                              ("min-seq", 64, 16), ("max-seq", 2048, 64)):
        parser.add_argument(f"--{name}", type=int, help=f"default {full} (--quick {quick})")
    parser.add_argument("--parts", nargs="+", default=["cb", "mask", "packed"],
                        choices=["cb", "mask", "packed"])
    parser.add_argument("--impls", nargs="+", default=CB_IMPLS, choices=CB_IMPLS,
                        help="continuous-batching implementations to run")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, full, quick in (("requests", 32, 4), ("min_len", 64, 16), ("max_len", 4096, 96),
                              ("new", 64, 4), ("batch_tokens", 512, 64), ("seqs", 8, 4),
                              ("min_seq", 64, 16), ("max_seq", 2048, 64)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.reps = args.reps or (1 if args.quick else 3)
    _common.set_threads(args)
    if args.worker:
        kind, impl = args.worker
        print(json.dumps((cb_worker if kind == "cb" else packed_worker)(impl, args)))
        return
    env = _common.environment()
    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        forward = [a for a in forward if a != args.json]
    if not args.threads:
        forward += ["--threads", str(env["threads"] if not args.quick else 1)]
    rows = []
    if "cb" in args.parts:
        cb = [dict(_run("cb", impl, forward, args), group="generate_batch")
              for impl in args.impls]
        ref = next((r.get("tokens") for name in ("paged|eager", "sdpa") for r in cb
                    if r["impl"] == name and r.get("tokens")), None)  # paged|eager's, else sdpa's
        peers = [r["tokens_per_s"] for r in cb if r["impl"] != "attnkit_flash"
                 and r.get("tokens_per_s")]
        for r in cb:
            r["same_tokens"] = None if ref is None or "tokens" not in r else r["tokens"] == ref
            if peers and r.get("tokens_per_s"):
                r["speedup"] = r["tokens_per_s"] / max(peers)
            r.pop("tokens", None)
            print(f"  generate_batch {r['impl']}: {r.get('median_ms')} ms", file=sys.stderr)
        rows += cb
    if "mask" in args.parts:
        rows += mask_rows([8, 32] if args.quick else [8, 32, 128], args.max_len, 3 if
                          args.quick else 5)
    if "packed" in args.parts:
        packed = [dict(_run("packed", impl, forward, args), group="packed train step")
                  for impl in ("sdpa", "attnkit_flash")]
        if all(r.get("median_ms") for r in packed):
            packed[1]["speedup"] = packed[0]["median_ms"] / packed[1]["median_ms"]
        rows += packed
    for r in rows:
        r.setdefault("gflops", None)
        r.setdefault("peak_mib", None)
        r.update(torch=env["torch"], device=env["device"])
    print(_common.header_text(env))
    print("tiny Llama (hidden 128, 4 heads x 32, 2 kv heads, 2 layers), float32, greedy; "
          "vs best peer = tokens/s over the best of sdpa and paged|eager (packed: sdpa ms / ms)")
    print(_common.format_table(rows, COLUMNS))
    if args.json:
        _common.write_json(args.json, env, vars(args), rows)


if __name__ == "__main__":
    main()
