"""attnkit.viz: figure sizing, tick-label thinning, labelled colour bars, and the
screenshot-free overlap check (text bounding boxes, no pixels compared)."""

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.transforms import IdentityTransform  # noqa: E402

from attnkit import viz  # noqa: E402
from figure_overlap import overlapping_texts  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def colour_bar_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def shown(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def causal_weights(layers: int, heads: int, T: int) -> torch.Tensor:
    torch.manual_seed(T)
    scores = torch.randn(layers, heads, T, T) * 3  # (L, H, T, T)
    blocked = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)


def test_overlapping_texts_reports_colliding_texts_only():
    fig, axes = viz.new_figure()
    ax = axes[0, 0]
    ax.set_title("a title")
    assert overlapping_texts(fig) == []
    ax.text(0.5, 0.5, "here", transform=ax.transAxes)
    ax.text(0.5, 0.5, "there", transform=ax.transAxes)
    pairs = overlapping_texts(fig)
    assert pairs == [("axes 0 text 'here'", "axes 0 text 'there'")]
    other = fig.axes[0].figure.add_axes((0.1, 0.1, 0.2, 0.2))  # a second Axes...
    fig.draw_without_rendering()
    title = ax.title.get_window_extent()
    other.text(title.x0, title.y0, "intruder", transform=IdentityTransform())  # ...over it
    assert ("axes 0 title 'a title'", "axes 1 text 'intruder'") in overlapping_texts(fig)


def test_kept_positions_keep_first_and_last():
    assert viz._kept(5, 1) == [0, 1, 2, 3, 4]
    assert viz._kept(200, 10) == [*range(0, 190, 10), 190, 199][:19] + [199]
    kept = viz._kept(200, 10)
    assert kept[0] == 0 and kept[-1] == 199 and min(b - a for a, b in zip(kept, kept[1:])) >= 9
    assert viz._kept(3, 5) == [0]  # no room for two labels


@pytest.mark.parametrize("T", [8, 40, 120, 200])
def test_head_grid_is_readable_at_any_length(T):
    """2 layers x 4 heads of T characters: no text collides, the colour bar says what it
    shows, the figure grows with T up to its cap, labels thin out with first and last kept."""
    text = ("def attention(q, k, v):\n    return softmax(q @ k.T) @ v  # " * 6)[:T]
    labels = [{" ": "\u2423", "\n": "\\n"}.get(c, c) for c in text]
    fig = viz.head_grid_figure(causal_weights(2, 4, T), labels, labels, annotate=False,
                               title="GPT attention, 2 layers x 4 heads (rows: queries, "
                                     "columns: keys) for a prompt of some length")
    assert overlapping_texts(fig) == []
    assert colour_bar_labels(fig) == ["attention weight"]
    width, height = fig.get_size_inches()
    assert width <= 24 + 1e-6 and height <= 24.5  # the cap (a wrapped title may add a line)
    assert fig.axes[0].get_title() == "layer 0, head 0"
    inner = fig.axes[1]  # the panels share their tokens: only the outer ones are labelled
    assert shown(inner.xaxis) == shown(inner.yaxis) == [] and inner.get_xlabel() == ""
    ax = fig.axes[4]  # bottom left: layer 1, head 0
    xs, ys = shown(ax.xaxis), shown(ax.yaxis)
    if T == 8:
        assert xs == labels and ys == labels and ax.get_xlabel() == "key"
    if T == 200:
        assert len(xs) < T and len(ys) < T
        assert xs[0] == f"0:{labels[0]}" and xs[-1] == f"199:{labels[-1]}"
        assert ys[0] == f"0:{labels[0]}" and ys[-1] == f"199:{labels[-1]}"
        assert "shown, as position:token" in ax.get_xlabel()


def test_figure_grows_with_the_sequence_then_caps():
    sizes = [viz.head_grid_figure(torch.rand(1, 2, T, T), annotate=False).get_size_inches()
             for T in (4, 16, 64, 256)]
    widths = [float(w) for w, _ in sizes]
    assert widths[0] < widths[1] < widths[2] and widths[3] <= 24.0


def test_wide_matrices_get_wide_panels():
    """A (10, 40) alignment is a wide, short panel: cells stay square."""
    fig = viz.grid_figure([[torch.rand(10, 40)]], annotate=False)
    fig.draw_without_rendering()
    box = fig.axes[0].get_window_extent()
    assert box.width / box.height == pytest.approx(4.0, rel=0.05)


def test_annotated_heatmap_has_no_collisions_and_a_labelled_bar(tmp_path):
    tokens = ["Your", "journey", "starts", "with", "one", "step"]
    fig = viz.heatmap_figure(torch.softmax(torch.randn(6, 6), -1), tokens, tokens,
                             "Self-attention weights (no trainable weights)")
    assert overlapping_texts(fig) == []
    assert colour_bar_labels(fig) == ["attention weight"]
    ax = fig.axes[0]
    assert shown(ax.xaxis) == tokens and len(ax.texts) == 36  # every cell annotated


def test_clipped_scale_is_said_on_the_colour_bar():
    fig = viz.grid_figure([[torch.eye(3)]], vmax=0.5)
    assert colour_bar_labels(fig) == ["attention weight (arrow: larger values, clipped)"]


def test_long_titles_are_wrapped():
    title = "a title far too long for one line of a figure this narrow " * 3
    fig = viz.grid_figure([[torch.eye(3)]], title=title)
    assert "\n" in fig.get_suptitle() and overlapping_texts(fig) == []


def test_savers_write_atomically(tmp_path):
    out = tmp_path / "deep" / "grid.png"
    assert viz.head_grid(torch.rand(2, 3, 3), path=out) == out
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary files
