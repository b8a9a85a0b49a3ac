"""``attnkit translate``: translate dates to ISO, or train the translator.

Usage::

    attnkit translate "june 25 2009"               # a date with spaces needs quotes
    attnkit translate "june 25 2009" 2009-06-26    # each argument is one date: one line each
    printf '25/06/2009\\n6/25/09\\n' | attnkit translate -    # one date per line on stdin
    attnkit translate train [--steps N] [--resume] [--force] [--if-missing]

Every answer is checked before it is printed (:func:`attnkit.apps.translate.answer.translate_many`):
an input that is not one real date in 1900-2099, or a model answer that is not that date,
is a one-line error and exit code 2, never a made-up date. With several dates each refused
one gets its own ``input N:`` line on stderr, the others are still translated, and the exit
code is 2 if any was refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint import CheckpointError
from .._cli import (UsageError, add_common_options, apply_threads, check_out_dir,
                    check_plotting, positive_int)
from .._training import ResumeError, RunOptions
from . import dates
from .answer import translate_many
from .figures import plot_alignment
from .train import CHECKPOINT_NAME, TrainConfig, existing_score, load_translator, train

__all__ = ["add_parser", "split_inputs"]

FORMATS_HELP = "\n".join(f"  {example:<28} {f.template}" for example, f in
                         zip(dates.supported_examples(), dates.FORMATS))


def split_inputs(words: list[str], stdin=None) -> list[str]:
    """The dates a command line asks for: each argument is one date (quote dates with
    spaces), or with no arguments or ``-`` one date per non-empty line of ``stdin``.

    Raises:
        UsageError: no words and ``stdin`` is a terminal (nothing to read).
    """
    if not words or words == ["-"]:
        stdin = sys.stdin if stdin is None else stdin
        if stdin is None or stdin.isatty():
            raise UsageError('give a date, e.g. attnkit translate "june 25, 2009", or pipe '
                             'one date per line into attnkit translate -')
        return [line.strip() for line in stdin if line.strip()]
    return list(words)


def _quote_hint(words: list[str]) -> str | None:
    """When every argument was refused but together they are one date, how to quote it."""
    joined = " ".join(words)
    try:
        dates.parse_date(joined)
    except ValueError:
        return None
    return f'each argument is one date; quote a date with spaces: attnkit translate "{joined}"'

def _train(args) -> int:
    if args.plot or args.words[1:]:
        raise UsageError("translate train takes no dates and no --plot")
    out = check_out_dir(args.out)
    check_plotting(not args.no_plots)
    checkpoint = out / CHECKPOINT_NAME
    if args.if_missing and checkpoint.is_file():
        try:
            load_translator(out)
            print(f"{checkpoint} exists and loads; not training (drop --if-missing to retrain)")
            return 0
        except CheckpointError as err:
            print(f"{checkpoint} does not load ({err}); training a new one")
            args.force = True
    score = existing_score(out)
    if score is not None and not args.force and not args.quiet:
        print(f"{checkpoint} exists (held-out exact match {score:.2%}); this run replaces it "
              f"only if it does at least as well (--force replaces it anyway)")
    apply_threads(args)
    run = RunOptions(out=out, progress=not args.quiet, figures=not args.no_plots,
                     resume=args.resume, force=args.force,
                     checkpoint_every=args.checkpoint_every, log=print)
    try:
        metrics = train(TrainConfig(steps=args.steps, seed=args.seed, run=run))
    except ResumeError as err:
        raise UsageError(str(err)) from None
    print(f"held-out exact match {metrics['exact_match']:.2%}, char accuracy "
          f"{metrics['char_accuracy']:.2%} on {metrics['num_examples']} dates; "
          f"{metrics['train_seconds']:.0f} s training"
          + (f"; wrote {out}" if metrics["saved"] else ""))
    return 0


def _translate(args) -> int:
    for name in ("resume", "force", "if_missing", "no_plots"):
        if getattr(args, name):
            raise UsageError(f"--{name.replace('_', '-')} applies to 'translate train' only")
    texts = split_inputs(args.words)
    if args.plot and len(texts) != 1:
        raise UsageError(f"--plot draws one date, got {len(texts)}")
    if args.plot:
        check_plotting(True)
    try:
        model = load_translator(args.out)
    except FileNotFoundError:
        raise UsageError(f"no trained translator in {str(args.out)!r}; train one with: "
                         f"attnkit translate train --out {args.out}") from None
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    apply_threads(args)
    results = translate_many(model, texts)
    if len(texts) == 1:
        if isinstance(results[0], ValueError):
            raise UsageError(str(results[0]))
        print(results[0])
        if args.plot:
            print(f"wrote {plot_alignment(model, texts[0], args.plot)}", file=sys.stderr)
        return 0
    failed = 0
    for number, (text, result) in enumerate(zip(texts, results), 1):
        if isinstance(result, ValueError):
            failed += 1
            print(f"attnkit translate: error: input {number}: {result}", file=sys.stderr)
        else:
            print(f"{text}\t{result}")
    hint = _quote_hint(args.words) if failed == len(texts) and args.words != ["-"] else None
    if hint:
        print(f"attnkit translate: hint: {hint}", file=sys.stderr)
    return 2 if failed else 0


def _run(args) -> int:
    return _train(args) if args.words[:1] == ["train"] else _translate(args)


def add_parser(subparsers) -> None:
    """Add ``translate`` (``translate DATE...`` and ``translate train``) to the CLI."""
    from .._cli import HelpFormatter

    parser = subparsers.add_parser(
        "translate", help="translate dates to ISO (checked), or train the translator",
        formatter_class=HelpFormatter,
        description="Translate human-written dates to ISO 8601 (YYYY-MM-DD) with a small\n"
                    "Transformer, or train it first with 'attnkit translate train'.\n\n"
                    "Every answer is checked with datetime before it is printed: input that\n"
                    "is not one real date in 1900-2099, or a wrong model answer, is an error\n"
                    "(exit code 2), never a made-up date.\n\n"
                    "Supported formats (any case, extra spaces allowed), shown for 2009-06-25:\n"
                    + FORMATS_HELP + "\n\nNumeric dates with slashes are read month first or "
                    "day first; when both\nreadings are real dates (06/05/2009) the input is "
                    "ambiguous and refused.")
    parser.add_argument("words", nargs="*", metavar="DATE",
                        help="dates, one per argument (quote a date with spaces), '-' to read "
                             "one per line from stdin, or 'train'")
    add_common_options(parser, out="out/translate", plots=True)
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="save this date's cross-attention figure (PNG)")
    train_opts = parser.add_argument_group("training (attnkit translate train)")
    train_opts.add_argument("--steps", type=positive_int, default=TrainConfig.steps,
                            help="training steps")
    train_opts.add_argument("--checkpoint-every", type=positive_int, default=100,
                            metavar="STEPS", help="steps between saves of the training state")
    train_opts.add_argument("--resume", action="store_true",
                            help="continue the interrupted run saved in --out")
    train_opts.add_argument("--force", action="store_true",
                            help="replace an existing model even if it scores better")
    train_opts.add_argument("--if-missing", action="store_true",
                            help="train only when --out has no checkpoint that loads")
    parser.set_defaults(func=_run)
