"""The ``attnkit`` command (also ``python -m attnkit``).

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``: it adds
its parser and binds the function to run with ``set_defaults(func=...)``. That function takes
the parsed arguments and returns an exit code, or raises
:class:`attnkit.apps._cli.UsageError` (printed as one line, exit 2). A new feature adds a subcommand by appending
its module to :data:`SUBCOMMAND_MODULES`; this file does not otherwise change.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main"]

SUBCOMMAND_MODULES = [
    "attnkit.apps.walkthrough",
    "attnkit.apps.gpt.cli",
    "attnkit.apps.translate.cli",
    "attnkit.apps.why_attention.cli",
    "attnkit.apps.explore.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand in :data:`SUBCOMMAND_MODULES`."""
    from . import __version__

    from .apps._cli import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="attnkit", formatter_class=HelpFormatter,
        description="Attention mechanisms explained step by step and implemented for real "
                    "training.")
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    subparsers = parser.add_subparsers(title="subcommands", dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    ``--help``, ``--version`` and usage errors return argparse's codes (0, 0, 2) instead of
    exiting, so callers and tests can embed the CLI.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse exits for --help, --version and bad usage
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    from .apps._cli import Interrupted, UsageError

    try:
        return int(args.func(args) or 0)  # a subcommand that returns None succeeded
    except UsageError as err:  # a mistake the user can fix: one line, exit 2
        print(f"attnkit {getattr(args, 'prog_name', args.command)}: error: {err}",
              file=sys.stderr)
        return 2
    except Interrupted as err:  # Ctrl-C during a long run: one line saying what was kept
        print(f"attnkit {getattr(args, 'prog_name', args.command)}: {err}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `attnkit walkthrough | head`: the reader left, nothing to say
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
