"""``attnkit walkthrough``: every step of the tutorial, printed with its numbers.

On the tutorial's sentence "Your journey starts with one step" (3-d embeddings) it prints
each step in the tutorial's order, under the tutorial's section titles and variable names,
checks the values the tutorial publishes, and (unless ``--no-plots``) writes PNG heatmaps:
the 6x6 attention weights, the causal weights, the causal weights after dropout, and one
panel per head of the multi-head weights. ``make demo`` runs it. :func:`run` is the same
walkthrough as a function. The steps' code is in :mod:`attnkit.apps.walkthrough_steps`, run here
as written; ``--notebook PATH.ipynb`` writes the same steps as a Jupyter notebook
(:mod:`attnkit.apps.walkthrough_notebook`), where :class:`Show` prints and draws inline.

``--lang zh`` prints it in Chinese, with the section titles and terms of the tutorial attnkit
grew from (default: the terminal's language); every printed text is in the catalogues of
:mod:`attnkit.apps._i18n`. Numbers, variable names and figure titles stay as in the code.
"""

from __future__ import annotations

import base64
import io
import linecache
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import viz
from ._cli import HelpFormatter, UsageError, add_common_options, check_out_dir, check_plotting
from ._i18n import LANGUAGES, terminal_language, translator
from .walkthrough_steps import (EMBEDDINGS, PRELUDE, PUBLISHED, SENTENCE, STEPS, TOKENS,
                                TOLERANCE, Step)

__all__ = ["SENTENCE", "TOKENS", "EMBEDDINGS", "PUBLISHED", "WalkthroughResult", "Show", "run",
           "run_step", "add_parser"]


@dataclass
class WalkthroughResult:
    """What a run produced: the figures written and any published value that differed."""

    files: list[Path] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.4f}" if value != float("-inf") else "-inf"


def _vector(t: Tensor) -> str:
    return "[" + ", ".join(_fmt(v) for v in t.tolist()) + "]"


def _pad(text: str, width: int) -> str:
    """``text`` padded to ``width`` terminal columns (a CJK character takes two)."""
    columns = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(0, width - columns)


class Show:
    """What the steps call ``show``: labelled numbers (published values checked as they go
    by) and heatmaps.

    This class is the notebook's: it prints, and draws each heatmap inline (a PNG shown by
    IPython). The command line prints to a stream and writes the heatmaps as PNG files; the
    notebook writer records both as the cells' outputs (subclasses override :meth:`emit`
    and :meth:`figure`).

    Args:
        language: ``"en"`` or ``"zh"``, for the words :class:`Show` adds itself.

    Attributes:
        mismatches: names of published values that did not reproduce.

    Raises:
        TypeError, ValueError: an unknown ``language``.
    """

    def __init__(self, language: str = "en"):
        self.language, self.tr = language, translator(language)
        self.mismatches: list[str] = []

    # -- the outputs: one line of text, one figure -------------------------------------------
    def emit(self, text: str) -> None:
        """Output one line of text."""
        print(text)

    def figure(self, name: str, draw) -> None:
        """Output the figure ``draw()`` returns (a matplotlib Figure) under file ``name``."""
        png = figure_png(draw())
        try:
            from IPython.display import display
        except ImportError:  # not in IPython: nowhere to draw inline
            self.emit(f"[{name}: {len(png)} bytes of PNG; run in Jupyter to see it]")
            return
        display(png_bundle(png, name), raw=True)

    # -- what the steps call ------------------------------------------------------------------
    def line(self, text: str = "") -> None:
        """Print ``text``."""
        self.emit(text)

    def vector(self, label: str, t: Tensor, published: str | None = None) -> None:
        """Print a labelled vector; with ``published``, say whether it matches that entry of
        :data:`PUBLISHED` (to 4 decimals)."""
        t = t.detach()
        note = ""
        if published is not None:
            expected = torch.tensor(PUBLISHED[published], dtype=t.dtype)
            ok = t.shape == expected.shape and torch.allclose(t, expected, atol=TOLERANCE,
                                                              rtol=0)
            note = "   " + (self.tr("walkthrough.matches") if ok else
                             self.tr("walkthrough.differs", values=_vector(expected)))
            if not ok:
                self.mismatches.append(published)
        self.emit(f"{_pad(label, 38)} {_vector(t)}{note}")

    def number(self, label: str, value) -> None:
        """Print a labelled number (a float or a one-element tensor), 4 decimals."""
        self.emit(f"{_pad(label, 38)} {_fmt(float(value))}")

    def rows(self, label: str, matrix: Tensor) -> None:
        """Print a small matrix on one line, row after row."""
        self.emit(f"{label:<8} " + "  ".join(_vector(row) for row in matrix.detach()))

    def table(self, label: str, t: Tensor, rows=None, columns=None) -> None:
        """Print a matrix, one line per row: ``rows`` label the lines, ``columns`` the
        columns (both optional)."""
        t = t.detach()
        self.emit(self.tr("walkthrough.shape", label=label, shape=tuple(t.shape)))
        if columns is not None:
            self.emit(" " * 9 + "".join(f"{c:>9}" for c in columns))
        names = list(rows) if rows is not None else [str(i) for i in range(t.shape[0])]
        for name, row in zip(names, t.tolist()):
            self.emit(f"  {name:<7}" + "".join(f"{_fmt(v):>9}" for v in row))

    def heatmap(self, name: str, weights: Tensor, x_labels=None, y_labels=None, title=None,
                **kwargs) -> None:
        """One heatmap (:func:`attnkit.viz.heatmap_figure`'s arguments), saved as ``name``."""
        self.figure(name, lambda: viz.heatmap_figure(weights, x_labels, y_labels, title,
                                                     **kwargs))

    def head_grid(self, name: str, weights: Tensor, x_labels=None, y_labels=None,
                  **kwargs) -> None:
        """One panel per head (:func:`attnkit.viz.head_grid_figure`), saved as ``name``."""
        self.figure(name, lambda: viz.head_grid_figure(weights, x_labels, y_labels, **kwargs))


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes, with tick labels thinned as :func:`attnkit.viz.save_figure` does."""
    viz.fit_tick_labels(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=viz.DPI)
    return buffer.getvalue()


def png_bundle(png: bytes, name: str) -> dict:
    """A notebook output's data for a PNG: ``{"image/png": base64, "text/plain": ...}``."""
    return {"image/png": base64.b64encode(png).decode("ascii"),
            "text/plain": f"<figure {name}>"}


class _TerminalShow(Show):
    """The command line's ``show``: lines to ``stream``, figures to PNG files in ``out_dir``
    (none when ``out_dir`` is None)."""

    def __init__(self, language: str, stream, out_dir: Path | None):
        super().__init__(language)
        self.stream, self.out_dir, self.files = stream, out_dir, []

    def emit(self, text: str) -> None:
        print(text, file=self.stream)

    def figure(self, name: str, draw) -> None:
        if self.out_dir is not None:
            self.files.append(viz.save_figure(draw(), self.out_dir / name))


def new_namespace(show: Show) -> dict:
    """The namespace the steps run in: :data:`PRELUDE`'s imports, ``show`` and ``tr``."""
    namespace = {"__name__": "__attnkit_walkthrough__"}
    run_step(PRELUDE, namespace, "prelude")
    namespace.update(show=show, tr=show.tr)
    return namespace


def run_step(code: str, namespace: dict, name: str) -> None:
    """Run one step's ``code`` in ``namespace``; a traceback shows its lines as
    ``<attnkit walkthrough NAME>``."""
    filename = f"<attnkit walkthrough {name}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102 - the package's own steps


def step_title(step: Step, tr) -> str | None:
    """The step's section title in ``tr``'s language (None for the opening step)."""
    return None if step.section is None else tr(step.section, **dict(step.title_fields))


def run(out_dir=None, *, plots: bool = True, stream=None,
        language: str = "en") -> WalkthroughResult:
    """Print the tutorial step by step and write its heatmaps.

    Args:
        out_dir: directory for the PNGs (created if missing); required when ``plots``.
        plots: write the heatmaps.
        stream: where to print; defaults to ``sys.stdout``.
        language: ``"en"`` or ``"zh"`` (:data:`attnkit.apps._i18n.LANGUAGES`).

    Returns:
        The figures written and the names of published values that did not reproduce.

    Raises:
        ImportError: ``plots`` is set and matplotlib is missing (checked before printing).
        ValueError: ``plots`` is set and ``out_dir`` is None, or ``language`` has no
            catalogue.
        TypeError: ``language`` is not a str.
    """
    tr = translator(language)  # checks the language before anything is printed
    if plots:
        viz.require_matplotlib()
        if out_dir is None:
            raise ValueError("out_dir is required when plots=True (or pass plots=False)")
        out_dir = Path(out_dir)
    show = _TerminalShow(language, stream or sys.stdout, out_dir if plots else None)
    namespace = new_namespace(show)
    for number, step in enumerate(STEPS):
        title = step_title(step, tr)
        if title is not None:
            show.emit(f"\n== {title} ==")
        run_step(step.code, namespace, step.section or f"step {number}")
    if show.files:
        show.emit(f"\n== {tr('walkthrough.section.figures')} ==")
        for path in show.files:
            show.emit(tr("walkthrough.wrote", path=path))
    return WalkthroughResult(files=show.files, mismatches=show.mismatches)


def _notebook_path(text: str) -> Path:
    """Check ``--notebook PATH`` before any work: a ``.ipynb`` file in a usable folder.

    Raises:
        UsageError: another suffix, a folder, or a parent that is a file.
    """
    path = Path(text)
    if path.suffix != ".ipynb":
        raise UsageError(f"--notebook {text!r} must end in .ipynb (a Jupyter notebook file)")
    if path.is_dir():
        raise UsageError(f"--notebook {text!r} is a folder; give a file name ending in .ipynb")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise UsageError(f"--notebook {text!r}: {str(parent)!r} is a file, not a folder")
    return path


def _write_notebook(args, language: str) -> WalkthroughResult:
    path = _notebook_path(args.notebook)
    if args.no_plots:
        raise UsageError("--notebook draws the heatmaps inline; drop --no-plots")
    try:
        viz.require_matplotlib()
    except ImportError as err:
        raise UsageError(str(err)) from None
    from .walkthrough_notebook import write_notebook

    try:
        result = write_notebook(path, language)
    except OSError as err:
        raise UsageError(f"cannot write --notebook {args.notebook!r} "
                         f"({err.strerror or err}); choose a writable place") from None
    print(translator(language)("walkthrough.wrote", path=path))
    return result


def _command(args) -> int:
    language = args.lang or terminal_language()
    if args.notebook is not None:
        result = _write_notebook(args, language)
    else:
        if not args.no_plots:
            check_out_dir(args.out)
            check_plotting(True)
        result = run(args.out, plots=not args.no_plots, language=language)
    if result.mismatches:
        message = translator(language)("walkthrough.mismatch", names=result.mismatches)
        print(f"attnkit walkthrough: {message}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnkit walkthrough`` (see :mod:`attnkit.cli`)."""
    parser = subparsers.add_parser(
        "walkthrough", help="print every step of the attention tutorial with its numbers",
        formatter_class=HelpFormatter,
        description='Print every step of the attention tutorial on "Your journey starts with\n'
                    'one step", under the tutorial\'s section titles and variable names, check\n'
                    'the values it publishes, and write PNG heatmaps of the attention weights.')
    add_common_options(parser, out="out/walkthrough", seed=False, quiet=False, plots=True)
    parser.add_argument("--lang", choices=LANGUAGES,
                        help="language of the printed steps: en, or zh (Chinese, with the "
                             "seed tutorial's section titles and terms); default: the "
                             "terminal's language (LC_ALL, LC_MESSAGES, LANG, LANGUAGE)")
    parser.add_argument("--notebook", metavar="PATH.ipynb",
                        help="write the steps as a Jupyter notebook instead of printing them: "
                             "the same code in cells you can edit, the numbers and heatmaps "
                             "as outputs, and the chapter's exercises with hidden solutions")
    parser.set_defaults(func=_command)
