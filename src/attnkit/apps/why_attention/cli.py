"""``attnkit why-attention``: the command line of the comparison (:mod:`.train`)."""

from __future__ import annotations

import dataclasses

from .._cli import (HelpFormatter, UsageError, add_common_options, apply_threads,
                    check_out_dir, check_plotting, positive_int)
from .._training import ResumeError, RunOptions
from .train import WhyConfig, format_table, train

__all__ = ["add_parser"]


def _run(args) -> int:
    try:
        config = WhyConfig(steps=args.steps, seed=args.seed, hidden_size=args.hidden_size,
                           max_len=args.max_len, eval_per_length=args.eval_per_length)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = check_out_dir(args.out)
    check_plotting(not args.no_plots)
    apply_threads(args)
    run = RunOptions(out=out, progress=not args.quiet, figures=not args.no_plots,
                     resume=args.resume, checkpoint_every=args.checkpoint_every, log=print)
    try:
        results = train(dataclasses.replace(config, run=run))
    except ResumeError as err:
        raise UsageError(str(err)) from None
    print(format_table(results))
    written = "why_attention.png and results.json" if not args.no_plots else "results.json"
    print(f"wrote {written} in {out}")
    return 0


def add_parser(subparsers) -> None:
    """Add ``why-attention`` to the CLI."""
    parser = subparsers.add_parser(
        "why-attention", help="GRU encoder-decoder with vs without attention on long inputs",
        formatter_class=HelpFormatter,
        description="Two GRU encoder-decoders of equal size learn to reverse digit strings of\n"
                    "5 to --max-len digits, one with attention and one without; the table and\n"
                    "figure show accuracy against input length, and the attention model's\n"
                    "alignment (reversal reads the source back to front: an anti-diagonal).")
    add_common_options(parser, out="out/why_attention", plots=True)
    parser.add_argument("--steps", type=positive_int, default=WhyConfig.steps,
                        help="training steps (both models train on the same batches)")
    parser.add_argument("--hidden-size", type=positive_int, default=WhyConfig.hidden_size,
                        help="GRU width of the attention model")
    parser.add_argument("--max-len", type=positive_int, default=WhyConfig.max_len,
                        help="longest input (inputs are 5 to this many digits)")
    parser.add_argument("--eval-per-length", type=positive_int,
                        default=WhyConfig.eval_per_length,
                        help="held-out strings per input length")
    parser.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="STEPS",
                        help="steps between saves of the training state")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run saved in --out")
    parser.set_defaults(func=_run)
