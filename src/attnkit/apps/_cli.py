"""One command-line style for every app.

* :class:`UsageError` - the one error type for a mistake the user can fix (bad option, missing
  checkpoint, unwritable folder, input the app cannot answer). :func:`attnkit.cli.main`
  prints it as one line, ``attnkit COMMAND: error: ...``, and exits with code 2.
* :class:`Interrupted` - Ctrl-C during a long run, raised with what was kept; printed as one
  line, exit code 130.
* :func:`add_common_options` - ``--threads``, ``--seed``, ``--out``, ``--quiet``,
  ``--no-plots`` with the same names, types and help everywhere.
* Checks to run *before* a long job: :func:`check_out_dir`, :func:`check_plotting`.
* argparse types: :func:`positive_int`, :func:`non_negative_int`, :func:`finite_float`.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
from pathlib import Path

__all__ = ["UsageError", "Interrupted", "HelpFormatter", "add_common_options",
           "apply_threads", "check_out_dir", "check_plotting", "positive_int",
           "non_negative_int", "finite_float"]


class UsageError(Exception):
    """A mistake the user can fix: one line on stderr, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what was kept and how to continue (exit 130)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (when it has one) and keeps the description's
    line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS)
        if "%(default)" not in text and action.option_strings and shown:  # 0 is shown
            text += " (default: %(default)s)"
        return text


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_common_options(parser: argparse.ArgumentParser, *, out: str | None = None,
                       seed: bool = True, plots: bool = False, quiet: bool = True) -> None:
    """Add the options every app spells the same way.

    Args:
        out: default of ``--out DIR`` (None: no ``--out``).
        seed: add ``--seed``.
        plots: add ``--no-plots``.
        quiet: add ``--quiet``.
    """
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch threads (default: torch's choice; on a machine busy with "
                             "other work 1 thread can be several times faster than 2)")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed")
    if out is not None:
        parser.add_argument("--out", type=Path, default=Path(out), metavar="DIR",
                            help="output folder")
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bar or progress lines")
    if plots:
        parser.add_argument("--no-plots", action="store_true",
                            help="write no figures (no matplotlib needed)")


def apply_threads(args) -> None:
    """Set torch's thread count from ``--threads`` (this process only)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def check_out_dir(path) -> Path:
    """Create ``path`` if needed and prove it writable, before any long work starts.

    Raises:
        UsageError: ``path`` is a file, cannot be created, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".attnkit-write-test-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to --out {str(path)!r} ({err.strerror or err}); "
                         f"choose a writable folder") from None
    return path


def check_plotting(enabled: bool) -> None:
    """Fail now, not after training, when figures are wanted but matplotlib is missing.

    Raises:
        UsageError: ``enabled`` and matplotlib cannot be imported.
    """
    if not enabled:
        return
    from ..viz import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as err:
        raise UsageError(f"{err} (or pass --no-plots)") from None
