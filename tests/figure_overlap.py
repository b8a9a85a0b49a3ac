"""The screenshot-free figure check (a test oracle, not library code): which visible texts of
a matplotlib figure overlap once it is laid out.

Moved here from ``attnkit.viz``, which only the library's users need; the apps' and viz's
figure tests import :func:`overlapping_texts` from here.
"""

from attnkit.viz import fit_tick_labels

__all__ = ["overlapping_texts"]


def _visible_texts(fig) -> list[tuple[str, object]]:
    """Every drawn, non-empty Text of ``fig`` with a name saying where it is."""
    found, seen = [], set()

    def add(where: str, text) -> None:
        if text is None or id(text) in seen or not text.get_visible():
            return
        if not text.get_text().strip():
            return
        seen.add(id(text))
        found.append((f"{where} {text.get_text()!r}", text))

    for text in fig.texts:
        add("figure text", text)
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"axes {i}"
        for text in (ax.title, ax._left_title, ax._right_title):
            add(f"{name} title", text)
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if not axis.get_visible():
                continue
            add(f"{name} {which} name", axis.label)
            add(f"{name} {which} offset", axis.offsetText)
            for tick in axis._update_ticks():  # the ticks inside the view, as drawn
                if tick.get_visible():
                    add(f"{name} {which} tick", tick.label1)
                    add(f"{name} {which} tick", tick.label2)
        for text in ax.texts:
            add(f"{name} text", text)
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            add(f"{name} legend", legend.get_title())
            for text in legend.get_texts():
                add(f"{name} legend", text)
    for legend in fig.legends:
        for text in legend.get_texts():
            add("figure legend", text)
    return found


def overlapping_texts(fig, *, tolerance: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of visible texts of ``fig`` whose drawn boxes overlap: the screenshot-free check.

    The figure is laid out (and its heatmap tick labels fitted, as :func:`save_figure` would)
    and every visible, non-empty text measured with ``get_window_extent``: the suptitle,
    panel titles, axis names, tick labels, colour-bar labels, cell values and legend entries,
    within one Axes and across Axes.

    Args:
        fig: a matplotlib Figure.
        tolerance: pixels two boxes may share in each direction before they count.

    Returns:
        ``[(where and text of one, where and text of the other), ...]``; empty when nothing
        collides.
    """
    if fit_tick_labels(fig) or not getattr(fig, "_attnkit_fitted", None):
        fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    import numpy as np

    texts = _visible_texts(fig)
    if not texts:
        return []
    boxes = np.array([text.get_window_extent(renderer).extents for _, text in texts])
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))  # (N,) each, pixels
    wide = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]) > tolerance
    tall = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]) > tolerance
    first, second = np.nonzero(np.triu(wide & tall, k=1))  # each pair once, not with itself
    return [(texts[i][0], texts[j][0]) for i, j in zip(first.tolist(), second.tolist())]
