"""Rewrite the printed samples of README.md and docs/*.md with what their blocks print now.

    python tools/regen_docs.py            # every page (also: make docs-samples)
    python tools/regen_docs.py docs/engine.md
    python tools/regen_docs.py --check    # list the stale samples, change nothing (exit 1)

Each page's blocks run top to bottom in one namespace, as in the suite
(tools/doc_examples.py); a ```text block right after a ```python block is that block's
printed sample. Only samples that no longer match are rewritten, so a sample that matches
through ``...`` or ``<!-- output: numbers vary -->`` keeps its text. A block that raises
stops its page with the error (nothing of that page is written); skipped blocks stay as they
are. Files are replaced atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from unittest import SkipTest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_examples  # noqa: E402  (tools/ is not a package)


def stale_samples(path: Path) -> list[tuple[doc_examples.Sample, str]]:
    """Run one page's blocks; return each stale sample with what its block printed.

    Raises:
        Exception: whatever a block raised (its page cannot be regenerated until it runs).
    """
    evaluator = doc_examples.BlockEvaluator()
    evaluator.record = {}
    sybil = doc_examples.make_sybil(evaluator)
    document = sybil.parse(path)
    sybil.setup(document.namespace)
    try:
        for example in document:
            try:
                example.evaluate()
            except SkipTest:
                pass
    finally:
        sybil.teardown(document.namespace)
    return [evaluator.record[key] for key in sorted(evaluator.record)]


def rewrite(text: str, stale: list[tuple[doc_examples.Sample, str]]) -> str:
    """The page ``text`` with each stale sample replaced by its block's output."""
    for sample, printed in sorted(stale, key=lambda pair: -pair[0].start):
        body = doc_examples.normalise(printed)
        body = "".join(sample.prefix + line if line.strip() else line
                       for line in body.splitlines(True))
        text = text[:sample.start] + body + text[sample.end:]
    return text


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pages", nargs="*", type=Path,
                        help="pages to regenerate (default: README.md and docs/*.md)")
    parser.add_argument("--check", action="store_true",
                        help="only list the stale samples; exit 1 if there are any")
    args = parser.parse_args(argv)
    pages = [p.resolve() for p in args.pages] or doc_examples.pages()
    failed = stale_count = 0
    for path in pages:
        name = path.relative_to(doc_examples.ROOT) if path.is_relative_to(
            doc_examples.ROOT) else path
        try:
            stale = stale_samples(path)
        except Exception as error:  # report and go on with the other pages
            print(f"{name}: a block failed, page left unchanged: "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
            failed += 1
            continue
        stale_count += len(stale)
        text = path.read_text(encoding="utf-8")
        for sample, _ in stale:
            line = text.count("\n", 0, sample.start) + 1
            print(f"{name}:{line}: sample {'is stale' if args.check else 'rewritten'}")
        if stale and not args.check:
            write_atomically(path, rewrite(text, stale))
    if failed:
        return 2
    return 1 if args.check and stale_count else 0


if __name__ == "__main__":
    sys.exit(main())
