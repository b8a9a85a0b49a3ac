"""The pages' runner (tools/doc_examples.py), its sample regenerator (tools/regen_docs.py),
and what every page must hold: the README's two commands first, Python blocks that compile
(skipped ones too), skips that give a reason.

The pages' blocks themselves run as their own test items (README.md::line:N, docs/*.md::...).
"""

import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import doc_examples  # noqa: E402
import regen_docs  # noqa: E402

PAGE = '''# A page

```python
x = 41
print(x + 1)
```
<!-- output: numbers vary -->
```text
7
```

```python
print("alpha")
print("beta 3")
```

```text
alpha
beta ...
```

Prose between, so the next text block is not a sample:

```python
y = x + 1
```

Some prose.

```text
not a sample
```

* in a list:

  ```python
  print("indented", y)
  ```
  ```text
  indented 0
  ```
'''


def _run(path, evaluator=None):
    """Evaluate every example of a page; return (passed, failures) with failure messages."""
    sybil = doc_examples.make_sybil(evaluator)
    document = sybil.parse(path)
    sybil.setup(document.namespace)
    failures, passed = [], 0
    for example in document:
        try:
            example.evaluate()
            passed += 1
        except Exception as error:  # noqa: BLE001 - collected for the asserts
            failures.append((example.line, error))
    sybil.teardown(document.namespace)
    return passed, failures


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert first_block.split("\n")[0].startswith("make demo")
    assert first_block.split("\n")[1].startswith("make test")


def test_every_page_is_collected():
    names = {p.relative_to(ROOT).as_posix() for p in doc_examples.pages()}
    assert "README.md" in names
    assert {"docs/engine.md", "docs/serving.md", "docs/multihead.md"} <= names
    assert names == {p.relative_to(ROOT).as_posix()
                     for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


@pytest.mark.parametrize("page", doc_examples.pages(), ids=lambda p: p.name)
def test_every_python_block_compiles_and_every_skip_has_a_reason(page):
    """Skipped blocks cannot drift into syntax errors either; a skip says why."""
    text = page.read_text()
    languages = "|".join(doc_examples.PYTHON_LANGUAGES)
    for match in re.finditer(rf"^[ \t]*```(?:{languages})\n(.*?)^[ \t]*```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        source = textwrap.dedent(match.group(1))
        if source.startswith(">>>"):
            continue  # a doctest: its examples are compiled when they run
        compile("\n" * (line - 1) + source, str(page), "exec")
    for match in re.finditer(r"<!--\s*skip:\s*(\w+)(.*?)-->", text, re.S):
        action, rest = match.group(1), match.group(2).strip()
        if action in ("next", "start"):
            assert re.search(r"""["'].+["']""", rest), (
                f"{page.name}: '<!-- skip: {action} -->' needs a reason, e.g. "
                f"'<!-- skip: next \"needs a GPU\" -->'")


def test_samples_are_paired_and_compared(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    document = doc_examples.make_sybil().parse(page)
    blocks = [r.parsed for _, r in document.regions if isinstance(r.parsed, doc_examples.Block)]
    assert [b.sample.text if b.sample else None for b in blocks] == [
        "7\n", "alpha\nbeta ...\n", None, "indented 0\n"]
    assert [b.sample.numbers_vary if b.sample else None for b in blocks] == [
        True, False, None, False]
    assert blocks[3].sample.prefix == "  "
    passed, failures = _run(page)
    # 42 vs 7 passes (numbers vary), "beta 3" matches "beta ...", y = 42 prints "indented 42"
    assert passed == 3
    assert len(failures) == 1
    line, error = failures[0]
    assert PAGE.splitlines()[line - 1].strip() == "```python"
    assert "-indented 0" in str(error) and "+indented 42" in str(error)
    assert "make docs-samples" in str(error)


def test_a_block_that_raises_fails_its_item(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nraise ValueError('the doc is wrong')\n```\n")
    passed, failures = _run(page)
    assert passed == 0
    assert isinstance(failures[0][1], ValueError)


def test_skip_and_invisible_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('<!-- invisible-code-block: python\nhidden = 5\n-->\n\n'
                    '<!-- skip: next "needs a GPU" -->\n\n'
                    '```python\nraise RuntimeError("never runs")\n```\n\n'
                    '<!-- skip: next if(missing("no_such_module_xyz"), reason="needs xyz") -->\n'
                    '\n```python\nraise RuntimeError("never runs either")\n```\n\n'
                    '```python\nprint(hidden * 2)\n```\n```text\n10\n```\n')
    passed, failures = _run(page)
    skips = [str(e) for _, e in failures if type(e).__name__ == "SkipTest"]
    assert skips == ["needs a GPU", "needs xyz"]
    assert len(failures) == 2
    assert passed == 4  # the invisible block, two skip directives, the compared block


@pytest.mark.parametrize("expected,got,numbers_vary,ok", [
    ("a 1.5 ms\n", "a 1.5 ms   \n\n", False, True),
    ("a 1.5 ms\n", "a 1.6 ms\n", False, False),
    ("a 1.5 ms\n", "a 17 ms\n", True, True),
    ("a 1.5 ms\n", "b 1.5 ms\n", True, False),
    ("a 1.5 ms\n", "a 1.5 ms\nmore\n", True, False),
    ("cost (...)\n", "cost (3e+04 ms)\n", False, True),
])
def test_sample_matches(expected, got, numbers_vary, ok):
    assert doc_examples.sample_matches(expected, got, numbers_vary) is ok


def test_regen_rewrites_only_stale_samples(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert regen_docs.main(["--check", str(page)]) == 1
    assert page.read_text() == PAGE
    assert "page.md:40: sample is stale" in capsys.readouterr().out
    assert regen_docs.main([str(page)]) == 0
    new = page.read_text()
    # only the indented sample changed, with its indentation; the matching ones kept their text
    assert new == PAGE.replace("  indented 0\n", "  indented 42\n")
    assert regen_docs.main(["--check", str(page)]) == 0
    _, failures = _run(page)
    assert failures == []


def test_regen_leaves_a_failing_page_alone(tmp_path, capsys):
    page = tmp_path / "page.md"
    text = "```python\nprint(1)\n```\n```text\n2\n```\n\n```python\nboom()\n```\n"
    page.write_text(text)
    assert regen_docs.main([str(page)]) == 2
    assert page.read_text() == text
    assert "NameError" in capsys.readouterr().err


def _resolve(dotted):
    """Import the longest importable prefix of ``dotted`` and getattr the rest."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as error:
            if error.name and not error.name.startswith("attnkit"):
                pytest.skip(f"{dotted} needs {error.name}")
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("page", doc_examples.pages(), ids=lambda p: p.name)
def test_every_name_and_path_a_page_mentions_exists(page):
    """`attnkit.x.y` in backticks resolves; tests/..., benchmarks/..., src/... paths exist,
    and a `path.py::test_name` names a test that is there."""
    text = page.read_text()
    missing = []
    for code in re.findall(r"`[^`\n]+`", text):
        for name in re.findall(r"(?<![\w./])attnkit(?:\.\w+)+", code):
            try:
                _resolve(name)
            except (ImportError, AttributeError) as error:
                missing.append(f"{name} ({type(error).__name__}: {error})")
    for match in re.finditer(r"(?<![\w/.-])((?:tests|benchmarks|examples|src|tools)/[\w/.-]+"
                             r"\.(?:py|cpp|md|json))(?:::(\w+))?", text):
        if re.search(r"\w's\s*`$", text[max(0, match.start() - 40):match.start()]):
            continue  # another project's file: "flash-attn's `tests/test_flash_attn.py`"
        path = ROOT / match.group(1)
        if not path.exists():
            missing.append(match.group(1))
        elif match.group(2) and not re.search(rf"def {match.group(2)}\b", path.read_text()):
            missing.append(match.group(0))
    for match in re.finditer(r"(?<![\w/.-])(attnkit/[\w/.-]+\.(?:py|cpp))", text):
        if not (ROOT / "src" / match.group(1)).exists():
            missing.append(match.group(1))
    assert not missing, f"{page.name} mentions what is not there: {missing}"


def test_the_name_check_finds_a_renamed_function(tmp_path):
    with pytest.raises(AttributeError):
        _resolve("attnkit.functional.no_such_function")
    assert _resolve("attnkit.functional.merge_partial_attention") is not None


def _cli_lines(text):
    """Command lines a page shows: `attnkit ...` lines of its shell/usage blocks and spans."""
    lines = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if match.group(1) in ("python", "text"):
            continue
        for line in match.group(2).splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("attnkit "):
                lines.append(line.split(" #")[0])
    lines += re.findall(r"`(attnkit [^`\n]+)`", text)
    return lines


def _unknown_flags(line):
    """The --flags of ``line`` that its (sub)command's parser does not define."""
    import argparse

    from attnkit.cli import build_parser

    parser = build_parser()
    for word in line.split()[1:]:
        if word.startswith("-"):
            break
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    known = {option for action in parser._actions for option in action.option_strings}
    return [flag for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)
            if flag not in known]


def test_every_command_line_a_page_shows_uses_real_options():
    """`attnkit translate train --steps 600`: each --flag exists on that subcommand."""
    checked, unknown = 0, []
    for page in doc_examples.pages():
        for line in _cli_lines(page.read_text()):
            checked += 1
            unknown += [f"{page.name}: {line!r}: {flag}" for flag in _unknown_flags(line)]
    assert checked > 20
    assert not unknown, unknown


def test_the_option_check_finds_a_renamed_flag():
    assert _unknown_flags("attnkit translate train --steps 600 --stepz 3") == ["--stepz"]
    assert _unknown_flags("attnkit gpt generate --prompt A --no-cache") == []
