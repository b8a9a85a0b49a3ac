"""Every Python block of README.md and docs/*.md, run as a test; printed samples checked.

The root ``conftest.py`` hands pytest this module's ``pytest_collect_file``, so each Python
block of a page is one test item (``docs/engine.md::line:120,column:1``), run in page order in
one namespace per page, the way a reader runs them top to bottom. Sybil does the Markdown
lexing, the skips and the doctests; this module adds printed samples.

What a page can say (every directive is an HTML comment, invisible when the page is rendered):

* A ````python`` block (or ````py``) runs. If the next fenced block is a ````text`` block, with nothing but
  blank lines or directives between them, it is that block's **printed sample**: what the
  block prints must equal it. Lines are compared with trailing spaces stripped; ``...`` in
  the sample matches anything (doctest's ELLIPSIS). A mismatch fails with a diff;
  ``make docs-samples`` (``python tools/regen_docs.py``) rewrites the samples in place.
* ``<!-- output: numbers vary -->`` between a block and its sample: numbers are compared by
  position only (timings, machine-measured rates, cost estimates). The words and the layout
  must still match, and ``make docs-samples`` leaves the sample's numbers alone while they do.
* ``<!-- invisible-code-block: python ... -->``: set-up code the reader does not need to see
  (small random tensors for a snippet that says ``q, k, v``); it runs like a block.
* ``<!-- skip: next "reason" -->``: the next block cannot run in the suite (a GPU, torchrun,
  minutes of training); the reason shows in pytest's summary. Conditional:
  ``<!-- skip: next if(missing("transformers"), reason="needs the hf extra") -->``.
* A ````python`` block whose first line starts with ``>>>`` is a doctest (ELLIPSIS on).

Each page starts from ``torch.manual_seed(0)``, so random samples are reproducible.
"""

from __future__ import annotations

import contextlib
import difflib
import doctest
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sybil import Document, Example, Region, Sybil
from sybil.evaluators.doctest import OutputChecker
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.abstract.doctest import DocTestStringParser
from sybil.evaluators.doctest import DocTestEvaluator
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer
from sybil.parsers.markdown.skip import SkipParser

ROOT = Path(__file__).resolve().parents[1]
#: The pages whose Python blocks run: README.md and every docs/*.md (also pages added later).
PATTERNS = ("README.md", "docs/*.md")
REGEN_COMMAND = "make docs-samples"
#: Fence languages that run (```python, ```py, ```python3); ```text after one is its sample.
PYTHON_LANGUAGES = ("python", "py", "python3")

_FENCE_INFO = re.compile(r"(?P<language>[^\n]*)$\n", re.MULTILINE)
_BETWEEN = re.compile(r"(?:\s|<!--.*?-->)*", re.S)  # blank lines and directives
_NUMBERS_VARY = "<!-- output: numbers vary -->"
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass
class Sample:
    """A printed sample: the text of a ```text block and where it sits in its page."""

    text: str
    start: int  # offset of the sample's first character in the page
    end: int  # offset of the closing fence's line
    prefix: str  # the fence's indentation (a sample inside a list item)
    numbers_vary: bool


@dataclass
class Block:
    """A Python block and its printed sample (None when it has none)."""

    source: Any  # a sybil Lexeme: the code, with its line offset
    sample: Sample | None


def normalise(text: str, numbers_vary: bool = False) -> str:
    """What a sample is compared as: trailing spaces and blank end lines gone.

    Args:
        text: printed or documented output.
        numbers_vary: replace every number with ``<n>`` so that only words and layout count.

    Returns:
        The normalised text, ending with one newline (or empty).
    """
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    out = "\n".join(lines) + ("\n" if lines else "")
    return _NUMBER.sub("<n>", out) if numbers_vary else out


def sample_matches(expected: str, got: str, numbers_vary: bool = False) -> bool:
    """Whether printed output ``got`` matches the documented sample ``expected``.

    Args:
        expected: the sample (``...`` matches anything).
        got: what the block printed.
        numbers_vary: compare numbers by position only.

    Returns:
        True when they match.
    """
    want, have = normalise(expected, numbers_vary), normalise(got, numbers_vary)
    return OutputChecker().check_output(want, have, doctest.ELLIPSIS)


class BlockEvaluator:
    """Runs a Python block, capturing what it prints when it has a sample to compare.

    With ``record`` set (a dict), it stores ``record[(path, sample.start)] = (sample, printed)``
    for every sample that does not match instead of failing: ``tools/regen_docs.py`` uses it.
    """

    def __init__(self) -> None:
        self.python = PythonEvaluator()
        self.record: dict | None = None

    def __call__(self, example: Example) -> str | None:
        block: Block = example.parsed
        if block.sample is None and self.record is None:
            return self.python(_Plain(example, block.source))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            self.python(_Plain(example, block.source))
        got, sample = printed.getvalue(), block.sample
        if sample is None or sample_matches(sample.text, got, sample.numbers_vary):
            return None
        if self.record is not None:
            self.record[(example.path, sample.start)] = (sample, got)
            return None
        diff = "".join(difflib.unified_diff(
            normalise(sample.text).splitlines(True), normalise(got).splitlines(True),
            "documented", "printed"))
        return (f"the printed sample after the block at {Path(example.path).name} line "
                f"{example.line} differs from what the block prints"
                f"{' (numbers ignored)' if sample.numbers_vary else ''}:\n{diff}\n"
                f"If the new output is right, run `{REGEN_COMMAND}` to rewrite the samples.")


class _Plain:
    """The slice of a sybil Example that PythonEvaluator reads."""

    def __init__(self, example: Example, source: Any) -> None:
        self.parsed, self.line, self.path = source, example.line, example.path
        self.namespace = example.namespace


class PythonBlockParser:
    """Finds ```python blocks (and invisible ones), each with its sample if one follows."""

    def __init__(self, evaluator: BlockEvaluator) -> None:
        self.evaluator = evaluator
        self.fences = RawFencedCodeBlockLexer(
            info_pattern=_FENCE_INFO, mapping={"language": "language", "source": "source"})
        self.invisible = DirectiveInHTMLCommentLexer(
            directive=r"invisible-code(-block)?", arguments="python")
        self.doctest = DocTestStringParser(DocTestEvaluator(doctest.ELLIPSIS))

    def __call__(self, document: Document) -> Iterable[Region]:
        fenced = sorted(self.fences(document), key=lambda region: region.start)
        for i, region in enumerate(fenced):
            if region.lexemes["language"].strip() not in PYTHON_LANGUAGES:
                continue
            source = region.lexemes["source"]
            if source.startswith(">>>"):
                for doctest_region in self.doctest(source, document.path):
                    doctest_region.adjust(region, source)
                    yield doctest_region
                continue
            sample = None
            if i + 1 < len(fenced) and fenced[i + 1].lexemes["language"].strip() == "text":
                following = fenced[i + 1]
                between = document.text[region.end:following.start]
                if _BETWEEN.fullmatch(between):
                    text = following.lexemes["source"]
                    start = following.start + text.offset
                    end = document.text.rfind("\n", start, following.end) + 1
                    prefix = _continuation_prefix(document.text, following.start)
                    sample = Sample(str(text), start, max(start, end), prefix,
                                    _NUMBERS_VARY in between)
            yield Region(region.start, region.end, Block(source, sample), self.evaluator)
        for region in self.invisible(document):
            yield Region(region.start, region.end, Block(region.lexemes["source"], None),
                         self.evaluator)


def _continuation_prefix(text: str, fence_start: int) -> str:
    """What starts each line of a fenced block whose fence line starts at ``fence_start``:
    its indentation, a list item's width in spaces, or a blockquote's ``>``."""
    line = text[fence_start:text.find("\n", fence_start)]
    raw = line[:len(line) - len(line.lstrip(" \t>-*+0123456789.)"))]
    return re.sub(r"[^>\s]", " ", raw)


def missing(module: str) -> bool:
    """For skip conditions in pages: whether ``module`` cannot be imported here."""
    return importlib.util.find_spec(module) is None


_SAVED_ENV: dict[str, str | None] = {}


def one_rank_group() -> None:
    """For pages' hidden set-up: what torchrun gives one process, for a group of one rank.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (127.0.0.1) and MASTER_PORT (a free port),
    so a block's own ``dist.init_process_group("gloo")`` runs; the page's teardown destroys
    the group and restores the environment.
    """
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for key, value in env.items():
        _SAVED_ENV.setdefault(key, os.environ.get(key))
        os.environ[key] = value


def _setup(namespace: dict) -> None:
    import torch

    torch.manual_seed(0)
    namespace["missing"] = missing
    namespace["one_rank_group"] = one_rank_group


def _teardown(namespace: dict) -> None:
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_ENV.clear()


def make_sybil(evaluator: BlockEvaluator | None = None) -> Sybil:
    """The Sybil that reads README.md and docs/*.md (paths relative to the repository)."""
    return Sybil(parsers=[PythonBlockParser(evaluator or BlockEvaluator()), SkipParser()],
                 patterns=list(PATTERNS), path=str(ROOT), setup=_setup,
                 teardown=_teardown)


def pages() -> list[Path]:
    """Every page whose blocks run, in a stable order."""
    return sorted({p for pattern in PATTERNS for p in ROOT.glob(pattern)})


pytest_collect_file = make_sybil().pytest()
