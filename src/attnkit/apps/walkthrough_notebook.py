"""``attnkit walkthrough --notebook PATH``: the tutorial's steps as a Jupyter notebook.

The notebook is written from the same :data:`~attnkit.apps.walkthrough_steps.STEPS` the
command line runs: a markdown cell under each section title (the catalogue's title and note in
the chosen language), then the step's code, with every ``tr(...)`` call replaced by its text
(:func:`localize`), so a learner reads and edits plain Python. The outputs are recorded by
running the steps here, as a kernel would print and draw them: the published values with their
checks, and the heatmaps as inline PNGs. The chapter's exercises follow, each with an empty
cell for the learner and a solution cell whose code and output are collapsed (JupyterLab,
Notebook 7 and VS Code show a bar to click; Colab folds it as a form).

The file is nbformat 4.5 JSON, written atomically; no Jupyter package is needed to write it.
"""

from __future__ import annotations

import ast
import json
import string

from .. import _atomic, viz
from ._i18n import catalogue, translator
from .walkthrough import (Show, WalkthroughResult, figure_png, new_namespace, png_bundle,
                          run_step, step_title)
from .walkthrough_steps import EXERCISES, PRELUDE, STEPS

__all__ = ["localize", "notebook", "write_notebook"]


def _field_source(code: str, node: ast.expr) -> str:
    """The source of an f-string field: an expression without quotes or backslashes."""
    text = ast.get_source_segment(code, node)
    if text is None or any(c in text for c in "'\"\\#{}\n"):
        raise ValueError(f"a tr() field must be a literal or an expression without quotes, "
                         f"backslashes, braces or line breaks (it becomes an f-string "
                         f"field), got {text!r}")
    return text


def _literal(text: str) -> str:
    """A Python string literal of ``text``: double-quoted like the steps' own strings, unless
    the text holds a double quote (then ``repr``'s quotes)."""
    return repr(text) if '"' in text else json.dumps(text, ensure_ascii=False)


def _replacement(code: str, call: ast.Call, tr, texts: dict) -> str:
    """Python source for one ``tr(key, **fields)`` call: a str literal, or an f-string."""
    if len(call.args) != 1 or not isinstance(call.args[0], ast.Constant) or \
            not isinstance(call.args[0].value, str) or any(k.arg is None for k in call.keywords):
        raise ValueError(f"tr() takes one literal key and named fields, got "
                         f"{ast.get_source_segment(code, call)!r}")
    key = call.args[0].value
    tr(key)  # a missing key fails here, naming it
    values = {k.arg: k.value for k in call.keywords}
    if all(isinstance(v, ast.Constant) for v in values.values()):
        return _literal(tr(key, **{name: v.value for name, v in values.items()}))
    parts = []
    for literal, name, spec, _ in string.Formatter().parse(texts[key]):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        node = values[name]
        if isinstance(node, ast.Constant):
            parts.append(format(node.value, spec).replace("{", "{{").replace("}", "}}"))
        else:
            parts.append("{" + _field_source(code, node) + (":" + spec if spec else "") + "}")
    # _literal() quotes and escapes the text; the fields hold no quotes or backslashes.
    return "f" + _literal("".join(parts))


def localize(code: str, language: str) -> str:
    """``code`` with each ``tr("key", **fields)`` call replaced by its text in ``language``.

    Raises:
        ValueError: a ``tr`` call whose key is not a literal, or a field that cannot be an
            f-string field.
        KeyError: a key missing from the catalogue.
    """
    tr, texts = translator(language), catalogue(language)
    lines = code.splitlines(keepends=True)
    starts = [0]
    for line in lines:  # character offset of each line (the steps' code is ASCII)
        starts.append(starts[-1] + len(line))
    edits = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "tr":
            edits.append((starts[node.lineno - 1] + node.col_offset,
                          starts[node.end_lineno - 1] + node.end_col_offset,
                          _replacement(code, node, tr, texts)))
    for begin, end, text in sorted(edits, reverse=True):
        code = code[:begin] + text + code[end:]
    return code


class _RecordingShow(Show):
    """``show`` for the notebook writer: records each cell's outputs as a kernel would."""

    def __init__(self, language: str):
        super().__init__(language)
        self.outputs: list[dict] = []

    def emit(self, text: str) -> None:
        last = self.outputs[-1] if self.outputs else None
        if last is not None and last["output_type"] == "stream":
            last["text"] += text + "\n"
        else:
            self.outputs.append({"output_type": "stream", "name": "stdout", "text": text + "\n"})

    def figure(self, name: str, draw) -> None:
        self.outputs.append({"output_type": "display_data", "metadata": {},
                             "data": png_bundle(figure_png(draw()), name)})

    def take(self) -> list[dict]:
        outputs, self.outputs = self.outputs, []
        for output in outputs:  # nbformat stores multi-line text as a list of lines
            if output["output_type"] == "stream":
                output["text"] = output["text"].splitlines(keepends=True)
        return outputs


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def _markdown(cell_id: str, text: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": _lines(text)}


def _code(cell_id: str, source: str, outputs=(), count=None, metadata=None) -> dict:
    return {"cell_type": "code", "id": cell_id, "metadata": metadata or {},
            "execution_count": count, "outputs": list(outputs),
            "source": _lines(source.rstrip("\n"))}


# Collapsed code and output: JupyterLab, Notebook 7 and VS Code (jupyter.*), the classic
# notebook (collapsed), Colab (a form whose "@title" line shows instead of the code).
_SOLUTION = {"jupyter": {"source_hidden": True, "outputs_hidden": True}, "collapsed": True,
             "cellView": "form", "tags": ["solution"]}


def notebook(language: str = "en") -> tuple[dict, list[str]]:
    """The walkthrough notebook as nbformat 4.5 JSON data, with its outputs recorded.

    Returns:
        ``(notebook, mismatches)``: the names of published values that did not reproduce
        (the notebook's outputs say so too).

    Raises:
        ImportError: matplotlib is missing (the heatmaps are drawn inline).
        TypeError, ValueError: an unknown ``language``.
    """
    tr = translator(language)
    viz.require_matplotlib()
    show = _RecordingShow(language)
    namespace = new_namespace(show)
    setup = f'{PRELUDE}\nshow = Show(language="{language}")  # {tr("walkthrough.nb.show")}\n'
    cells = [_markdown("title", f"# {tr('walkthrough.nb.title')}\n\n{tr('walkthrough.nb.intro')}"),
             _code("setup", setup, count=1)]
    count = 1
    for number, step in enumerate(STEPS):
        title = step_title(step, tr)
        slug = "inputs" if step.section is None else step.section.rsplit("section.", 1)[1]
        heading = f"## {title}\n\n" if title else ""
        cells.append(_markdown(f"note-{slug}".replace(".", "-"), heading + tr(step.note)))
        run_step(step.code, namespace, f"step {number}")
        count += 1
        cells.append(_code(f"step-{slug}".replace(".", "-"), localize(step.code, language),
                           show.take(), count))
    cells.append(_markdown("exercises", f"## {tr('walkthrough.nb.exercises')}\n\n"
                                        f"{tr('walkthrough.nb.exercises_intro')}"))
    for number, exercise in enumerate(EXERCISES, 1):
        cells.append(_markdown(f"exercise-{number}",
                               f"### {tr(exercise.title)}\n\n{tr(exercise.task)}"))
        cells.append(_code(f"exercise-{number}-answer", f"# {tr('walkthrough.nb.your_turn')}\n"))
        run_step(exercise.solution, namespace, f"exercise {number}")
        count += 1
        source = f"# @title {tr('walkthrough.nb.solution')}\n" + localize(exercise.solution,
                                                                          language)
        cells.append(_code(f"exercise-{number}-solution", source, show.take(), count,
                           metadata=dict(_SOLUTION)))
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"},
                         "language_info": {"name": "python"},
                         "attnkit": {"generator": "attnkit walkthrough --notebook",
                                     "language": language}}}, show.mismatches


def write_notebook(path, language: str = "en") -> WalkthroughResult:
    """Write :func:`notebook` to ``path`` atomically (a reader never sees half a file).

    Returns:
        ``files`` is ``[path]``; ``mismatches`` names the published values that did not
        reproduce.

    Raises:
        ImportError: matplotlib is missing.
        TypeError, ValueError: an unknown ``language``.
        OSError: the file cannot be written (an existing file is left as it was).
    """
    data, mismatches = notebook(language)
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    path = _atomic.atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return WalkthroughResult(files=[path], mismatches=mismatches)
