"""`attnkit walkthrough` through cli.main, the CLI's plug-in contract, and the viz helpers."""

import contextlib
import io
import sys
import types

import pytest
import torch

from attnkit import cli, viz
from attnkit.apps import walkthrough

FIGURES = {"attention_weights.png", "causal_weights.png", "causal_weights_dropout.png",
           "multihead_weights.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """One full run with figures (matplotlib is the slow part), shared by the tests below."""
    out = tmp_path_factory.mktemp("walkthrough") / "nested" / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # capsys is per test; this fixture is shared
        code = cli.main(["walkthrough", "--out", str(out)])
    return code, printed.getvalue(), out


def test_walkthrough_prints_published_values(plotted):
    code, text, _ = plotted
    assert code == 0
    assert ("attn_weights_2 (softmax)               [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, "
            "0.1581]   (matches the published values)") in text
    assert "context_vec_2 = z(2)                   [0.4419, 0.6515, 0.5683]   (matches" in text
    for row in ("[0.2996, 0.8053]", "[-0.0739, 0.0713]", "[-0.4519, 0.2216]",
                "[-0.4519, 0.2216, 0.4772, 0.1063]", "[0.3190, 0.4858]"):
        assert f"{row}   (matches the published values)" in text
    assert text.count("(matches the published values)") == len(walkthrough.PUBLISHED)
    assert "Both methods agree: True" in text
    assert "  starts    0.7599   0.6194   0.6206   0.0000   0.0000   0.0000" in text  # dropout


def test_walkthrough_steps_in_tutorial_order(plotted):
    _, text, _ = plotted
    sections = ["3.3.1", "3.3.2", "3.4.1", "3.4.2", "3.5.1", "3.5.2", "3.5.3", "3.6.1", "3.6.2"]
    positions = [text.index(f"== {s} ") for s in sections]
    assert positions == sorted(positions)
    for label in ("attn_scores_2", "attn_weights_2_tmp", "attn_score_22", "mask_simple",
                  "masked_simple_norm", "all_context_vecs", "head_dim 2"):
        assert label in text


def test_walkthrough_writes_pngs_atomically(plotted):
    _, text, out = plotted
    assert {p.name for p in out.iterdir()} == FIGURES  # no temporary files left behind
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert f"wrote {out / name}" in text


def test_no_plots_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["walkthrough", "--out", str(out), "--no-plots"]) == 0
    assert not out.exists()
    text = capsys.readouterr().out
    assert "[0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]" in text and "wrote" not in text


def test_a_value_that_does_not_reproduce_fails_the_command(monkeypatch, capsys):
    monkeypatch.setitem(walkthrough.PUBLISHED, "context_vec_2", (0.4419, 0.6515, 0.5684))
    assert cli.main(["walkthrough", "--no-plots"]) == 1
    captured = capsys.readouterr()
    assert "(DIFFERS from the published [0.4419, 0.6515, 0.5684])" in captured.out
    assert "values differ from the tutorial: ['context_vec_2']" in captured.err


def test_missing_matplotlib_names_the_pip_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert cli.main(["walkthrough", "--out", str(tmp_path / "o")]) == 2  # a usage error
    err = capsys.readouterr().err
    assert 'pip install "attnkit[viz]"' in err and "--no-plots" in err
    with pytest.raises(ImportError, match=r'install it with: pip install "attnkit\[viz\]"'):
        viz.heatmap(torch.eye(2), path=tmp_path / "x.png")
    assert cli.main(["walkthrough", "--no-plots"]) == 0


# --- the CLI ------------------------------------------------------------------------------

def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    assert "walkthrough" in capsys.readouterr().out
    assert cli.main([]) == 2  # no subcommand: help, usage error code
    assert cli.main(["walkthrough", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_module_adds_a_subcommand(monkeypatch, capsys):
    plugin = types.ModuleType("fake_feature")

    def add_parser(subparsers):
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("--name", default="world")
        parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)

    plugin.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_feature", plugin)
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", [*cli.SUBCOMMAND_MODULES, "fake_feature"])
    assert cli.main(["hello", "--name", "attnkit"]) == 3
    assert capsys.readouterr().out == "hello attnkit\n"
    cli.main(["--help"])
    assert "say hello" in capsys.readouterr().out


# --- viz helpers --------------------------------------------------------------------------

def test_viz_rejects_bad_shapes_and_labels(tmp_path):
    with pytest.raises(ValueError, match=r"x_labels must have one label per column \(3\), got 2"):
        viz.heatmap(torch.ones(2, 3), ["a", "b"], None, path=tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"matrix must be 2-D \(rows, cols\), got shape \(4,\)"):
        viz.heatmap(torch.ones(4), path=tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"weights must be \(H, T, S\) or \(L, H, T, S\)"):
        viz.head_grid(torch.ones(2, 2), path=tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"equally long rows, got row lengths \[2, 1\]"):
        viz.panel_grid([[torch.eye(2), torch.eye(2)], [torch.eye(2)]], path=tmp_path / "d.png")
    assert not list(tmp_path.iterdir())


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    fig, _ = viz.new_figure()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        viz.save_figure(fig, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
