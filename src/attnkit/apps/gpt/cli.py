"""``attnkit gpt``: train a character-level GPT, generate text with it, draw its heads.

* ``attnkit gpt train`` - :func:`attnkit.apps.gpt.train.train` with the shared options, checked
  before the first step; ``--resume`` and ``--force``.
* ``attnkit gpt generate --prompt ...`` - streams sampled text, with the KV cache or
  (``--no-cache``) recomputing the context every step; ``--prompt`` repeated generates for
  every prompt at once through one paged KV cache (:mod:`.many`).
* ``attnkit gpt attention --prompt ... --out FILE`` - a layer x head grid of attention maps.

User mistakes (unknown prompt characters, a prompt longer than the context, no checkpoint, an
option out of range) print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ... import viz
from .._cli import (HelpFormatter, UsageError, add_common_options, apply_threads,
                    check_out_dir, check_plotting, finite_float, non_negative_int, positive_int)
from .._training import ResumeError, RunOptions
from .._vocab import CharVocab
from .data import encode_prompt, load_text
from .figures import attention_figure
from .train import CHECKPOINT_NAME, DEFAULT_OUT, TrainConfig, train
from .many import generate_many
from .model import GPT, PRESETS, load_checkpoint

__all__ = ["add_parser"]


def _load(args) -> tuple[GPT, CharVocab]:
    path = Path(args.checkpoint)
    try:
        model, metadata = load_checkpoint(path)
    except FileNotFoundError:
        raise UsageError(f"no checkpoint at {str(path)!r}; train one first with: attnkit gpt "
                         f"train --out {path.parent}") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as err:  # corrupt, foreign, stale
        raise UsageError(f"cannot load {str(path)!r} as a GPT checkpoint: {err}") from None
    return model, CharVocab(metadata["chars"])


def _encode_prompt(prompt: str, model: GPT, tokenizer: CharVocab) -> torch.Tensor:
    try:
        return encode_prompt(prompt, model, tokenizer)
    except ValueError as err:  # on the command line, a usage error
        raise UsageError(str(err).replace("the prompt is empty", "--prompt is empty")) from None


def _train_command(args) -> int:
    out = check_out_dir(args.out)
    check_plotting(not args.no_plots)
    try:
        text = load_text(args.text)
    except ValueError as err:
        raise UsageError(str(err)) from None
    overrides = {} if args.context is None else {"max_seq_len": args.context}
    apply_threads(args)
    run = RunOptions(out=out, progress=not args.quiet, figures=not args.no_plots,
                     resume=args.resume, force=args.force,
                     checkpoint_every=args.checkpoint_every, log=print)
    try:
        train(TrainConfig(text, preset=args.preset, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          eval_every=args.eval_every, overrides=overrides, run=run))
    except (ValueError, ResumeError) as err:  # checked before the first step
        raise UsageError(str(err)) from None
    return 0


def _generate_command(args) -> int:
    model, tokenizer = _load(args)
    prompts = [_encode_prompt(p, model, tokenizer) for p in args.prompt]
    apply_threads(args)
    if len(prompts) > 1:
        return _generate_many(args, model, tokenizer, prompts)
    generator = torch.Generator().manual_seed(args.seed)
    sys.stdout.write(args.prompt[0])
    started = time.perf_counter()
    for token in model.generate_stream(prompts[0], args.tokens, temperature=args.temperature,
                                       top_k=args.top_k, generator=generator,
                                       use_cache=not args.no_cache):
        sys.stdout.write(tokenizer.decode([token]))
        sys.stdout.flush()  # stream: each character appears as soon as it is sampled
    seconds = time.perf_counter() - started
    print()
    print(f"[{args.tokens} tokens in {seconds:.2f} s, {args.tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s, KV cache {'off' if args.no_cache else 'on'}]", file=sys.stderr)
    return 0


def _generate_many(args, model, tokenizer, prompts) -> int:
    """Several ``--prompt``: one paged cache, each continuation as if generated alone."""
    if args.no_cache:
        raise UsageError("--no-cache works with one --prompt; several prompts share a paged "
                         "KV cache")
    started = time.perf_counter()
    new = generate_many(model, prompts, args.tokens, temperature=args.temperature,
                        top_k=args.top_k,
                        generators=[torch.Generator().manual_seed(args.seed) for _ in prompts])
    seconds = time.perf_counter() - started
    for text, tokens in zip(args.prompt, new):
        print(text + tokenizer.decode(tokens))
    total = args.tokens * len(prompts)
    print(f"[{len(prompts)} prompts x {args.tokens} tokens in {seconds:.2f} s, "
          f"{total / max(seconds, 1e-9):.0f} tokens/s, paged KV cache]", file=sys.stderr)
    return 0


def _attention_command(args) -> int:
    model, tokenizer = _load(args)
    prompt = _encode_prompt(args.prompt, model, tokenizer)
    check_plotting(True)
    apply_threads(args)
    with torch.no_grad():
        _, weights = model(prompt[None], need_weights=True)  # L tensors (1, H, T, T)
    grid = torch.stack([w[0] for w in weights])  # (L, H, T, T)
    print(f"wrote {viz.save_figure(attention_figure(grid, args.prompt), args.out)}")
    return 0


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def add_parser(subparsers) -> None:
    """Register ``attnkit gpt {train,generate,attention}`` (see :mod:`attnkit.cli`)."""
    parser = subparsers.add_parser(
        "gpt", help="train a character-level GPT, generate text, draw its attention heads",
        description="A small decoder-only GPT built from attnkit.MultiHeadAttention.",
        formatter_class=HelpFormatter)
    commands = parser.add_subparsers(title="commands", dest="gpt_command", metavar="COMMAND",
                                     required=True)
    checkpoint = Path(DEFAULT_OUT) / CHECKPOINT_NAME

    tr = commands.add_parser("train", help="train on the Python help text or --text FILE",
                             formatter_class=HelpFormatter)
    add_common_options(tr, out=str(DEFAULT_OUT), plots=True)
    tr.add_argument("--text", type=Path, metavar="FILE",
                    help="UTF-8 text to train on (default: the Python help topics, "
                         "pydoc_data.topics, about 465k characters)")
    tr.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size")
    tr.add_argument("--steps", type=positive_int, default=1500, help="training steps")
    tr.add_argument("--batch-size", type=positive_int, default=12,
                    help="windows of --context characters per step")
    tr.add_argument("--context", type=positive_int, metavar="T",
                    help="context length (default: the preset's)")
    tr.add_argument("--lr", type=finite_float, default=1e-3, help="peak learning rate")
    tr.add_argument("--eval-every", type=positive_int, default=100, metavar="STEPS",
                    help="steps between validation estimates")
    tr.add_argument("--checkpoint-every", type=positive_int, metavar="STEPS",
                    help="steps between saves of the training state (default: --eval-every)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the interrupted run saved in --out")
    tr.add_argument("--force", action="store_true",
                    help="replace an existing model even if its validation loss is lower")
    tr.set_defaults(func=_train_command, prog_name="gpt train")

    for name, help_text, func in (
            ("generate", "stream text continuing --prompt", _generate_command),
            ("attention", "write a layer x head grid of attention maps for --prompt",
             _attention_command)):
        sub = commands.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        if name == "generate":  # repeat it to generate for several prompts at once
            sub.add_argument("--prompt", required=True, action="append",
                             help="the text to start from (repeat for several prompts, "
                                  "generated together through a paged KV cache)")
        else:
            sub.add_argument("--prompt", required=True, help="the text to start from")
        add_common_options(sub, seed=name == "generate", quiet=False)
        sub.add_argument("--checkpoint", type=Path, default=checkpoint, metavar="FILE",
                         help="a model from attnkit gpt train")
        sub.set_defaults(func=func, prog_name=f"gpt {name}")
        if name == "generate":
            sub.add_argument("--tokens", type=non_negative_int, default=300, metavar="N",
                             help="characters to generate")
            sub.add_argument("--temperature", type=_non_negative_float, default=0.8,
                             help="sampling temperature; 0 is greedy")
            sub.add_argument("--top-k", type=positive_int, metavar="K",
                             help="sample only from the K most likely characters")
            sub.add_argument("--no-cache", action="store_true",
                             help="recompute the whole context every step (for comparison)")
        else:
            sub.add_argument("--out", type=Path, required=True, metavar="FILE",
                             help="PNG to write")
