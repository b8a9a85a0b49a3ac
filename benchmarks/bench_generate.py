"""GPT generation with and without the KV cache, and GPT training throughput.

The model is the ``small`` preset of :mod:`attnkit.apps.gpt.model` (4 layers, 4 heads, 128
dims, about 0.8 M parameters, float32, character vocabulary of 103) with its context set to
``prompt + tokens`` so no run restarts its context. Weights are random: speed does not depend
on them, and no checkpoint is needed.

Generation (greedy, batch 1, ``GPT.generate``): for each prompt length ``P``

* ``cache``    - one prefill of the ``P`` prompt tokens, then one token per step against the
                 per-layer :class:`attnkit.KVCache` (O(P + i) attention per token);
* ``no cache`` - every step runs the whole model over the ``P + i`` tokens so far.

Tokens/s counts the generated tokens over the whole call (prefill included). Both paths are
timed interleaved (one call of each per round) so load from other processes hits both, and
they are first checked to produce the same tokens.

Training: tokens/s of AdamW steps of the same model at batch 12 x context 128 (the
``attnkit gpt train`` default).

Usage::

    python benchmarks/bench_generate.py                       # prompts 64, 256, 1024
    python benchmarks/bench_generate.py --quick               # seconds-long smoke test
    python benchmarks/bench_generate.py --prompts 1024 --json out/bench_generate.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from attnkit.apps.gpt.model import GPT, GPTConfig  # noqa: E402

VOCAB = 103  # the default corpus's character vocabulary


def build(preset: str, context: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset(preset, VOCAB, max_seq_len=context)).eval()


def generation_rows(preset: str, prompts: list[int], tokens: int, reps: int) -> list[dict]:
    """Time cached and uncached greedy generation for each prompt length."""
    rows = []
    for length in prompts:
        model = build(preset, length + tokens)
        prompt = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(1))
        check = min(tokens, 32)
        same = torch.equal(model.generate(prompt, check, temperature=0),
                           model.generate(prompt, check, temperature=0, use_cache=False))
        if not same:
            raise SystemExit(f"cached and uncached generation differ at prompt {length}")
        fns = {name: (lambda cache=cache: model.generate(prompt, tokens, temperature=0,
                                                         use_cache=cache))
               for name, cache in (("cache", True), ("no cache", False))}
        times = _common.time_interleaved(fns, warmup=0, reps=reps)  # ms per call
        medians = {name: statistics.median(ms) for name, ms in times.items()}
        # FLOPs of generation, the usual estimate: 2 per parameter per token processed (the
        # cache processes each new token once; without it every step reprocesses the context).
        params = sum(p.numel() for p in model.parameters())
        processed = {"cache": length + tokens,
                     "no cache": sum(min(length + t, model.config.max_seq_len)
                                     for t in range(1, tokens + 1))}
        for name, ms in medians.items():
            rows.append({"prompt": length, "tokens": tokens, "impl": name, "median_ms": ms,
                         "gflops": 2 * params * processed[name] / (ms * 1e-3) / 1e9,
                         "peak_mib": _common.peak_memory_mib(fns[name]),
                         "tokens_per_s": tokens / ms * 1e3,
                         "speedup": medians["no cache"] / ms})
        print(f"  timed prompt {length}", file=sys.stderr, flush=True)
    return rows


def training_row(preset: str, batch_size: int, context: int, steps: int) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW)."""
    model = build(preset, context).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, VOCAB, (batch_size, context))  # (B, T)
    times = []
    for step in range(steps + 2):  # the first two steps warm up allocator and optimizer state
        start = time.perf_counter()
        loss = model.loss(x, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {"batch_size": batch_size, "context": context, "steps": steps,
            "median_ms": seconds * 1e3, "tokens_per_s": batch_size * context / seconds,
            # forward + backward: about 6 FLOPs per parameter per token
            "gflops": 6 * params * batch_size * context / seconds / 1e9, "peak_mib": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(parser)
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths")
    parser.add_argument("--tokens", type=int, help="tokens generated per call (default 512)")
    args = parser.parse_args(argv)
    _common.set_threads(args)
    if args.memory_worker:  # no memory pass here: generation allocates little
        return
    if args.quick:
        preset, prompts, tokens, reps, train_shape = "tiny", [32, 256], 64, 1, (12, 32, 5)
    else:
        preset, prompts, tokens, reps, train_shape = "small", [64, 256, 1024], 512, 1, (12, 128, 10)
    prompts = args.prompts or prompts
    tokens = args.tokens or tokens
    reps = args.reps or reps
    env = _common.environment()
    print(_common.header_text(env))
    print(f"GPT preset {preset!r}, greedy, batch 1, {tokens} new tokens per call, "
          f"median of {reps}\n")
    rows = generation_rows(preset, prompts, tokens, reps)
    print(_common.format_table(rows, [("prompt", "prompt", ""), ("impl", "impl", ""),
                                      ("ms/call", "median_ms", ".0f"),
                                      ("GFLOP/s", "gflops", ".2f"),
                                      ("peak MiB", "peak_mib", ".1f"),
                                      ("tokens/s", "tokens_per_s", ".1f"),
                                      ("speed-up vs no cache", "speedup", ".1f")]))
    train = training_row(preset, *train_shape)
    print(f"\ntraining: batch {train['batch_size']} x context {train['context']}: "
          f"{train['median_ms']:.0f} ms/step, {train['tokens_per_s']:,.0f} tokens/s "
          f"(median of {train['steps']} steps)")
    if args.json:
        config = {"preset": preset, "prompts": prompts, "tokens": tokens, "reps": reps}
        _common.write_json(args.json, env, config, rows + [{"impl": "training", **train}])


if __name__ == "__main__":
    main()
