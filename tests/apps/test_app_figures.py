"""The apps' figures, checked without screenshots: no two texts overlap (matplotlib text
boxes), colour bars say what they show, long inputs thin their labels. Random weights or
untrained models only: no training here."""

import io

import pytest
import torch

pytest.importorskip("matplotlib")

from attnkit import viz  # noqa: E402
from figure_overlap import overlapping_texts  # noqa: E402
from attnkit.apps import walkthrough  # noqa: E402
from attnkit.apps.gpt.figures import attention_figure, plot_losses  # noqa: E402
from attnkit.apps.gpt.train import TrainResult  # noqa: E402
from attnkit.apps.translate.figures import plot_alignment  # noqa: E402
from attnkit.apps.translate.model import SOURCE_VOCAB, TARGET_VOCAB  # noqa: E402
from attnkit.apps.translate.model import TransformerConfig, TransformerSeq2Seq  # noqa: E402
from attnkit.apps.why_attention.figures import comparison_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def colour_bar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def heatmap_axes(fig):
    return [ax for ax in fig.axes if hasattr(ax, "_attnkit_ticks")]


@pytest.fixture
def captured(monkeypatch):
    """The figures the apps save, kept for inspection; the files are still written unless
    the test sets ``captured.write = False`` (rendering PNGs is the slow part)."""

    class Figures(list):
        write = True

    figures = Figures()
    save = viz.save_figure

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path) if figures.write else path

    monkeypatch.setattr(viz, "save_figure", keep)
    return figures


@pytest.mark.parametrize("prompt_len", [120])  # lengths 8-200: tests/attnkit/test_viz.py
def test_gpt_attention_figure(prompt_len):
    prompt = ("the cat sat on the mat.\n" * 10)[:prompt_len]
    torch.manual_seed(0)
    scores = torch.randn(2, 4, prompt_len, prompt_len).masked_fill(
        torch.ones(prompt_len, prompt_len, dtype=torch.bool).triu(1), float("-inf"))
    fig = attention_figure(torch.softmax(scores, -1), prompt)  # (L, H, T, T) = (2, 4, T, T)
    assert overlapping_texts(fig) == []
    assert f"prompt of {prompt_len} characters, 2 layers x 4 heads" in fig.get_suptitle()
    assert colour_bar_labels(fig)[0].startswith("attention weight")
    labels = [t.get_text() for t in heatmap_axes(fig)[0].get_yticklabels()]
    if prompt_len == 8:
        assert labels == ["t", "h", "e", "\u2423", "c", "a", "t", "\u2423"]
    else:
        assert len(labels) < prompt_len and labels[0] == "0:t" and labels[-1] == "119:\\n"


def test_gpt_loss_curve(tmp_path, captured):
    result = TrainResult(model=None, tokenizer=None, history=[(100, 2.5, 2.6), (200, 2.0, 2.1)],
                         val_loss=2.1, unigram_loss=3.25)
    path = plot_losses(result, tmp_path / "loss.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
    assert overlapping_texts(captured[0]) == []


@pytest.fixture(scope="module")
def translator():
    torch.manual_seed(0)
    config = TransformerConfig(len(SOURCE_VOCAB), len(TARGET_VOCAB), embed_dim=32, num_heads=2,
                               num_encoder_layers=1, num_decoder_layers=2, ff_dim=64)
    return TransformerSeq2Seq(config).eval()  # untrained: the layout is what is tested


@pytest.mark.parametrize("source", ["25/06/2009", "thursday, the twenty fifth of june 2009"])
def test_translator_alignment_sized_to_the_text(translator, source, tmp_path, captured):
    assert len(source) in (10, 39)
    captured.write = len(source) == 10  # one PNG is enough to check the writing
    path = plot_alignment(translator, source, tmp_path / "a.png")
    if captured.write:
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # written atomically
    fig = captured[0]
    assert overlapping_texts(fig) == []
    assert colour_bar_labels(fig) == ["attention weight"]
    panels = heatmap_axes(fig)
    assert len(panels) == 2 * (2 + 1)  # decoder layers x (heads + average)
    box = panels[0].get_window_extent()
    assert box.width / box.height == pytest.approx(len(source) / 10, rel=0.05)  # square cells
    assert len(panels[0].get_yticklabels()) == 10  # one label per output step
    titles = {ax.get_title().replace("\n", " ") for ax in panels}
    assert {"decoder layer 0, head 0", "decoder layer 1, head average"} <= titles


def _results(lengths):
    by_length = {n: {"char_accuracy": max(0.0, 1 - n / 50), "exact_match": 0.0} for n in lengths}
    return {"config": {"steps": 1200},
            "without_attention": {"parameters": 92202, "by_length": by_length},
            "with_attention": {"parameters": 91212, "by_length": {
                n: {"char_accuracy": 0.99, "exact_match": 0.9} for n in lengths}}}


@pytest.mark.parametrize("n", [8, 40])
def test_why_attention_figure_explains_the_anti_diagonal(n):
    torch.manual_seed(n)
    weights = torch.softmax(torch.randn(n, n) + 5 * torch.eye(n).flip(1), -1)  # (n, n)
    digits = "".join(str(int(d)) for d in torch.randint(0, 10, (n,)))
    fig = comparison_figure(_results(range(5, n + 1)), weights, digits, digits[::-1])
    assert overlapping_texts(fig) == []
    heat = heatmap_axes(fig)[0]
    title = heat.get_title().replace("\n", " ")
    assert f"output position i reads source position n-1-i (here n = {n})" in title
    assert "anti-diagonal, top right to bottom left" in title
    assert heat.get_xlabel().startswith("source digit")
    assert heat.get_ylabel().startswith("output digit")
    assert colour_bar_labels(fig) == ["attention weight (mean of heads)"]


def test_walkthrough_figures(tmp_path, captured):
    captured.write = False  # test_walkthrough.py checks the files
    result = walkthrough.run(tmp_path, stream=io.StringIO())
    assert len(captured) == len(result.files) == 4
    for fig in captured:
        assert overlapping_texts(fig) == []
        assert colour_bar_labels(fig)[0].startswith("attention weight")
        bottom = heatmap_axes(fig)[-1]  # grids label their outer panels; 6 tokens: all shown
        assert [t.get_text() for t in bottom.get_xticklabels()] == list(walkthrough.TOKENS)
    assert colour_bar_labels(captured[2]) == ["attention weight after dropout (survivors x 2)"]
