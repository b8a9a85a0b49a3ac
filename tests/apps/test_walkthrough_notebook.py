"""`attnkit walkthrough --notebook`: the tutorial's steps as a notebook, written from the steps
the command line runs, and executed again in a real Jupyter kernel (nbclient).

One kernel (this venv's Python, registered in a temporary folder) serves the module.
"""

import base64
import contextlib
import io
import sys

import pytest

from attnkit import cli
from attnkit.apps import walkthrough, walkthrough_notebook, walkthrough_steps

from _kernel import started_kernel

EXTRA = "the notebook extra: pip install -e '.[notebook]'"
nbformat = pytest.importorskip("nbformat", reason=EXTRA)
nbclient = pytest.importorskip("nbclient", reason=EXTRA)
pytest.importorskip("ipykernel", reason=EXTRA)
pytest.importorskip("matplotlib", reason="the viz extra: pip install -e '.[viz]'")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MATCHES = {"en": "(matches the published values)", "zh": "(与教程给出的数值一致)"}
FIGURES = ["attention_weights.png", "causal_weights.png", "causal_weights_dropout.png",
           "multihead_weights.png"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Both languages' notebooks, written by the command line."""
    folder = tmp_path_factory.mktemp("notebooks")
    paths = {}
    for language in ("en", "zh"):
        paths[language] = folder / "sub" / f"walkthrough-{language}.ipynb"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert cli.main(["walkthrough", "--notebook", str(paths[language]),
                             "--lang", language]) == 0
        assert str(paths[language]) in printed.getvalue()
    return paths


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One started kernel of this venv's Python for the module."""
    with started_kernel(tmp_path_factory.mktemp("kernels")) as km:
        yield km


def _read(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o["output_type"] == "stream")


def _images(nb) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for c in nb.cells
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def _check_outputs(nb, language):
    """The published values, each checked, the four heatmaps and the exercises' answers."""
    text = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"] \
        == []
    for name, values in walkthrough.PUBLISHED.items():
        row = "[" + ", ".join(f"{v:.4f}" for v in values) + "]"
        assert f"{row}   {MATCHES[language]}" in text, name
    # every published value once, and the first exercise's V1 reproduces sa_v2's row
    assert text.count(MATCHES[language]) == len(walkthrough.PUBLISHED) + 1
    assert "DIFFERS" not in text and "不一致" not in text
    assert "2,360,064" in text and "head_dim 64" in text  # exercise 3.3
    assert "(2, 6, 2)" in text  # exercise 3.2
    images = _images(nb)
    assert len(images) == len(FIGURES)
    assert all(png.startswith(PNG_MAGIC) and len(png) > 10_000 for png in images)


@pytest.mark.parametrize("language", ["en", "zh"])
def test_written_notebook_has_the_steps_and_their_outputs(written, language):
    nb = _read(written[language])
    _check_outputs(nb, language)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # the prelude, one cell per step, then per exercise an empty cell and a solution
    assert len(code) == 1 + len(walkthrough_steps.STEPS) + 2 * len(walkthrough_steps.EXERCISES)
    for cell, step in zip(code[1:], walkthrough_steps.STEPS):
        assert cell.source == walkthrough_notebook.localize(step.code, language).rstrip("\n")
        assert "tr(" not in cell.source  # the learner reads plain Python
    titles = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "markdown"]
    tr = walkthrough.translator(language)
    for step in walkthrough_steps.STEPS[1:]:
        assert f"## {walkthrough.step_title(step, tr)}" in titles
    solutions = [c for c in code if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == 3
    for cell in solutions:  # folded away until the learner opens it
        assert cell.metadata["jupyter"] == {"source_hidden": True, "outputs_hidden": True}
        assert cell.outputs
    assert not list(written[language].parent.glob(".*.tmp"))  # written atomically
    if language == "zh":
        assert "## 3.6.1 叠加多个单头注意力层" in titles
        assert 'show.vector("attn_weights_2(softmax 归一化)", attn_weights_2, ' \
               'published="attn_weights_2")' in code[2].source


def test_notebook_prints_what_the_command_line_prints(written):
    """One source: the steps' outputs equal `attnkit walkthrough --no-plots`'s lines."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["walkthrough", "--no-plots", "--lang", "en"]) == 0
    cli_lines = [line for line in printed.getvalue().splitlines()
                 if line and not line.startswith("== ")]
    nb = _read(written["en"])
    step_cells = [c for c in nb.cells if c.get("id", "").startswith("step-")]
    nb_lines = [line for c in step_cells for line in _text(c).splitlines()]
    assert nb_lines == cli_lines


@pytest.mark.parametrize("language", ["en", "zh"])
def test_notebook_runs_in_a_real_kernel_with_the_published_numbers(written, kernel, language,
                                                                  tmp_path):
    nb = _read(written[language])
    recorded = [_text(c) for c in nb.cells if c.cell_type == "code"]
    for cell in nb.cells:  # run from scratch: no recorded output may survive
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, km=kernel, timeout=120, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    _check_outputs(nb, language)
    assert [_text(c) for c in nb.cells if c.cell_type == "code"] == recorded


def test_localize_writes_plain_python():
    code = ('show.line(tr("walkthrough.agree", ok=same, gap=gap))\n'
            'show.vector(tr("walkthrough.attn_scores_2", token="journey"), x)\n')
    assert walkthrough_notebook.localize(code, "en") == (
        'show.line(f"Both methods agree: {same} (max |difference| = {gap:.1e})")\n'
        "show.vector('attn_scores_2 (query \"journey\")', x)\n")
    same, gap = True, 3e-8
    localized = walkthrough_notebook.localize('tr("walkthrough.agree", ok=same, gap=gap)', "zh")
    assert eval(localized) == "两种方法结果一致:True(最大 |差值| = 3.0e-08)"
    with pytest.raises(ValueError, match="tr\\(\\) takes one literal key and named fields"):
        walkthrough_notebook.localize("tr(key)", "en")
    with pytest.raises(ValueError, match="a tr\\(\\) field must be a literal or an expression "
                                         "without quotes"):
        walkthrough_notebook.localize('tr("walkthrough.scaled", d_k=d["a"])', "en")
    with pytest.raises(KeyError, match="no text 'walkthrough.nope' in the 'en' catalogue"):
        walkthrough_notebook.localize('tr("walkthrough.nope")', "en")


def test_bad_notebook_paths_are_usage_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "out.txt"): "must end in .ipynb",
        str(tmp_path / "folder.ipynb"): "is a folder; give a file name ending in .ipynb",
        str(tmp_path / "file" / "nb.ipynb"): "is a file, not a folder",
    }
    (tmp_path / "folder.ipynb").mkdir()
    for path, message in cases.items():
        assert cli.main(["walkthrough", "--notebook", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attnkit walkthrough: error: --notebook") and message in err, err
    assert cli.main(["walkthrough", "--notebook", str(tmp_path / "a.ipynb"), "--no-plots"]) == 2
    assert "--notebook draws the heatmaps inline; drop --no-plots" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["walkthrough", "--notebook", str(tmp_path / "a.ipynb")]) == 2
    assert 'pip install "attnkit[viz]"' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.ipynb"]


@pytest.fixture
def no_figures(monkeypatch):
    """Skip drawing the heatmaps (the slow part) in tests about other things."""
    monkeypatch.setattr(walkthrough_notebook._RecordingShow, "figure",
                        lambda self, name, draw: None)


def test_unwritable_notebook_is_a_usage_error(tmp_path, capsys, monkeypatch, no_figures):
    target = tmp_path / "nb.ipynb"
    target.write_text("old")

    def refuse(path, write):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(walkthrough_notebook._atomic, "atomic_write", refuse)
    assert cli.main(["walkthrough", "--notebook", str(target)]) == 2
    assert "cannot write --notebook" in capsys.readouterr().err
    assert target.read_text() == "old"


def test_a_value_that_does_not_reproduce_fails_the_notebook_too(tmp_path, monkeypatch, capsys,
                                                                no_figures):
    monkeypatch.setitem(walkthrough.PUBLISHED, "ca row 0", (0.0, 0.0))
    target = tmp_path / "nb.ipynb"
    assert cli.main(["walkthrough", "--notebook", str(target), "--lang", "en"]) == 1
    assert "values differ from the tutorial: ['ca row 0']" in capsys.readouterr().err
    assert "(DIFFERS from the published [0.0000, 0.0000])" in target.read_text()
