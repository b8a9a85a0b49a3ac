"""Attention figures: readable heatmaps and grids of them, written atomically.

matplotlib is an optional extra, imported only when a figure is drawn (``import attnkit``
never needs it). Figures are plain ``matplotlib.figure.Figure`` objects on an Agg canvas:
no pyplot, no global backend switch, no GUI, so drawing works headless and never changes a
user's own matplotlib set-up.

Layers, so later figures reuse the pieces:

* :func:`draw_heatmap` draws one matrix on a given Axes (tokens on both axes, values written
  in the cells when they fit). Translator alignment plots call it with ``x_name="source"``.
* :func:`grid_figure` lays rows of matrices out as a grid on one shared, labelled colour
  scale, sized from the matrices: square cells, the figure growing with the sequence up to a
  cap; :func:`head_grid_figure` is the common case of ``(H, T, S)`` heads or ``(L, H, T, S)``
  layers by heads. :func:`panel_grid`, :func:`head_grid` and :func:`heatmap` draw and save.
* :func:`fit_tick_labels` thins tick labels after layout, so they never collide: every k-th
  label, k from the measured label size and tick spacing, first and last kept, the axis name
  saying so. :func:`save_figure` calls it, then writes to a temporary file beside the target
  and renames it, so a reader never sees a half-written PNG.
* The screenshot-free check that no two texts overlap is a test oracle and lives with the
  tests (``tests/figure_overlap.py``).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from ._atomic import atomic_write

__all__ = ["require_matplotlib", "new_figure", "draw_heatmap", "fit_tick_labels",
           "save_figure", "heatmap_figure", "heatmap", "grid_figure", "panel_grid",
           "head_grid_figure", "head_grid", "wrap", "INSTALL_HINT",
           "COLORBAR_LABEL"]

INSTALL_HINT = 'pip install "attnkit[viz]"'
COLORBAR_LABEL = "attention weight"
DPI = 120
# Above this many cells the numbers no longer fit in them.
_ANNOTATE_MAX_CELLS = 256
# Tick font sizes (points): shrink with the cell size down to the floor, then thin labels.
_TICK_FONT_MAX, _TICK_FONT_MIN = 9.0, 6.0
# Cell sizes (inches): annotated cells hold "0.23"; plain cells stay modest for short inputs.
_CELL_ANNOTATED, _CELL_PLAIN, _CELL_MIN = 0.5, 0.3, 0.02
# The figure grows with the sequence up to this size (inches); past it the cells shrink.
_FIG_MAX = (24.0, 24.0)


def require_matplotlib():
    """Import matplotlib or say how to install it.

    Raises:
        ImportError: matplotlib is missing; the message carries the pip command.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"attnkit's figures need matplotlib; install it with: "
                          f"{INSTALL_HINT}") from err
    return matplotlib


def _matrix(values, name: str):
    """A 2-D float numpy array from a tensor, array or nested list."""
    import numpy as np

    if hasattr(values, "detach"):  # a torch.Tensor, possibly on a GPU or with grad
        values = values.detach().float().cpu().numpy()
    data = np.asarray(values, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols), got shape {data.shape}")
    return data


def wrap(text: str | None, inches: float, fontsize: float = 10.0) -> str | None:
    """``text`` wrapped to lines that fit ``inches`` at ``fontsize`` points (about 0.55 em a
    character in DejaVu Sans), so long titles break instead of running into their neighbours."""
    if not text:
        return text
    width = max(12, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width) for line in str(text).splitlines())


def new_figure(nrows: int = 1, ncols: int = 1, *, panel_size=(4.2, 3.8), figsize=None):
    """A figure on an Agg canvas (constrained layout) and its ``(nrows, ncols)`` Axes.

    Args:
        panel_size: inches per panel; the figure is ``ncols x nrows`` of them...
        figsize: ...unless given here as ``(width, height)`` inches.

    Raises:
        ImportError: matplotlib is missing.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = figsize or (panel_size[0] * ncols, panel_size[1] * nrows)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: rendering without pyplot or a global backend
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _tick_fontsize(cell_inches: float) -> float:
    """Tick label size for cells of ``cell_inches``: a label (about 1.2 em tall) and its gap
    (a third of an em) as tall as a cell, clamped to 6-9 points."""
    return min(_TICK_FONT_MAX, max(_TICK_FONT_MIN, cell_inches * 72 / 1.55))


def _set_ticks(ax, which: str, positions, labels) -> None:
    style = ax._attnkit_ticks[which]
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_ticks(list(positions), labels=[labels[i] for i in positions], **style["kwargs"])


_NICE_STRIDES = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


def draw_heatmap(ax, matrix, x_labels=None, y_labels=None, title=None, *, annotate=None,
                 vmin=0.0, vmax=None, cmap="viridis", x_name="key", y_name="query",
                 fontsize=None, cell_inches=None, label_x=True, label_y=True,
                 x_index=None, y_index=None):
    """Draw ``matrix`` (rows = queries, columns = keys) on ``ax`` and return the image.

    Tick labels are thinned to every k-th (first and last kept) when they would not fit the
    cells; :func:`fit_tick_labels` (run by :func:`save_figure`) checks the stride against the
    measured labels once the layout is known, so they never collide.

    Args:
        ax: a matplotlib Axes.
        matrix: 2-D tensor, array or nested list ``(rows, cols)``.
        x_labels, y_labels: one label per column / row (e.g. tokens), or None for indices.
            Multi-character x labels are drawn vertically.
        title: panel title.
        annotate: write each value in its cell; default when there are at most 256 cells.
        vmin, vmax: colour scale; ``vmax`` defaults to the matrix maximum.
        cmap: matplotlib colour map name.
        x_name, y_name: axis titles.
        fontsize: tick label size in points; default from the cell size (6 to 9 points).
        cell_inches: the side of one cell once laid out, for the font size and the first
            guess of the label stride; default from the Axes' share of the figure.
        label_x, label_y: False leaves that axis bare (no ticks, labels or name), for inner
            panels of a grid whose outer panels carry them.
        x_index, y_index: the position of each column / row (default ``0, 1, ...``): the
            labels when none are given, and the ``position:`` prefix of thinned labels, so
            a window cut out of a longer sequence keeps its positions.

    Raises:
        ValueError: ``matrix`` is not 2-D, or a label or index list does not match its size.
    """
    data = _matrix(matrix, "matrix")
    rows, cols = data.shape
    for arg, labels, size in (("x_labels", x_labels, cols), ("y_labels", y_labels, rows),
                              ("x_index", x_index, cols), ("y_index", y_index, rows)):
        if labels is not None and len(labels) != size:
            what = "column" if arg.startswith("x") else "row"
            kind = "label" if arg.endswith("labels") else "position"
            raise ValueError(f"{arg} must have one {kind} per {what} ({size}), got "
                             f"{len(labels)}")
    x_index = list(range(cols)) if x_index is None else list(x_index)
    y_index = list(range(rows)) if y_index is None else list(y_index)
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax)
    if cell_inches is None:  # the panel's share of the figure before layout (an overestimate)
        box = ax.get_position()
        width, height = ax.figure.get_size_inches()
        cell_inches = min(box.width * width / cols, box.height * height / rows)
    fontsize = fontsize or _tick_fontsize(cell_inches)
    xs = [str(s) for s in x_labels] if x_labels is not None else [str(i) for i in x_index]
    ys = [str(s) for s in y_labels] if y_labels is not None else [str(i) for i in y_index]
    vertical = x_labels is not None and max(map(len, xs)) > 1
    ax._attnkit_ticks = {
        "x": {"labels": xs, "name": x_name, "stride": 1, "named": x_labels is not None,
              "index": x_index, "kwargs": dict(fontsize=fontsize,
                                               rotation=90 if vertical else 0, ha="center")},
        "y": {"labels": ys, "name": y_name, "stride": 1, "named": y_labels is not None,
              "index": y_index, "kwargs": dict(fontsize=fontsize)},
    }
    # A first guess of the stride from the font size (a label about 1.2 em tall, a character
    # about 0.65 em wide); fit_tick_labels corrects it once the layout is known. Labelling
    # only every k-th position from the start keeps long sequences quick to lay out.
    spacing = cell_inches * 72
    longest = 1 if vertical else max(map(len, xs))
    for which, shown, name, extent in (
            ("x", label_x, x_name, (1.2 if vertical else 0.65 * longest) * fontsize),
            ("y", label_y, y_name, 1.2 * fontsize)):
        if shown:
            (ax.set_xlabel if which == "x" else ax.set_ylabel)(name)
            _thin(ax, which, extent, spacing)
        else:
            ax._attnkit_ticks[which]["labels"] = []
            (ax.set_xticks if which == "x" else ax.set_yticks)([])
    ax.tick_params(length=2)
    if title:
        ax.set_title(title, fontsize=10)
    if annotate if annotate is not None else rows * cols <= _ANNOTATE_MAX_CELLS:
        for i in range(rows):
            for j in range(cols):
                # Light text on the dark end of the colour map, dark text on the light end.
                colour = "white" if image.norm(data[i, j]) < 0.5 else "black"
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color=colour,
                        fontsize=min(8, fontsize))
    return image


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _kept(n: int, k: int) -> list[int]:
    """Every ``k``-th of ``n`` positions, the first and the last always among them (the one
    before the last dropped when it would crowd it)."""
    if k <= 1:
        return list(range(n))
    kept = list(range(0, n, k))
    if kept[-1] != n - 1:
        if len(kept) > 1:
            kept[-1] = n - 1  # the gap to the last is under k: replace, don't crowd
        elif n - 1 >= k:
            kept.append(n - 1)
    return kept


def _thin(ax, which: str, extent: float, spacing: float) -> bool:
    """Label every k-th tick of ``ax``'s ``which`` axis, k so that labels ``extent`` long (along
    the axis, in the same unit as the tick ``spacing``) plus a gap of a third of the font size
    never touch; the stride only grows and is rounded up to 2, 5, 10, 20, 25, 50, ...

    Thinned token labels carry their position (``"40:t"``: a lone character every fifth place
    says little), drawn vertically on the x axis, and the axis name says what is shown.

    Returns:
        Whether the labels changed.
    """
    style = ax._attnkit_ticks[which]
    fontsize = style["kwargs"]["fontsize"]

    def stride(length: float) -> int:
        need = math.ceil((length + fontsize / 3) / max(spacing, 1e-9))
        return next((k for k in _NICE_STRIDES if k >= need), need)

    k = max(style["stride"], stride(extent))
    if k > 1 and style["named"] and which == "x":  # vertical labels: as long as a line is tall
        k = max(k, stride(1.25 * fontsize))
    labels = style["labels"]
    if k == style["stride"] and getattr(ax, f"_attnkit_{which}_set", False):
        return False
    style["stride"] = k
    setattr(ax, f"_attnkit_{which}_set", True)
    if k > 1 and style["named"]:
        labels = [f"{i}:{label}" for i, label in zip(style["index"], labels)]
        if which == "x":
            style["kwargs"]["rotation"] = 90
    _set_ticks(ax, which, _kept(len(labels), k), labels)
    if k > 1:
        shown = ", as position:token" if style["named"] else ""
        label = f"{style['name']} (every {_ordinal(k)} shown{shown})"
        (ax.set_xlabel if which == "x" else ax.set_ylabel)(label)
    return True


def fit_tick_labels(fig) -> bool:
    """Check the tick labels of every :func:`draw_heatmap` panel of ``fig`` against the layout.

    The figure is laid out and its labels measured; with ``s`` pixels between ticks and labels
    up to ``e`` pixels long along the axis (plus a gap of a third of the font size), every
    ``k = ceil(e / s)``-th label is kept, always the first and the last, and the axis name
    says "every k-th shown". :func:`save_figure` and the tests' overlap check call it; a
    figure already checked and unchanged since is not laid out again.

    Returns:
        Whether any labels changed (the figure then needs a new layout).
    """
    panels = [ax for ax in fig.axes if hasattr(ax, "_attnkit_ticks")]
    if not panels or getattr(fig, "_attnkit_fitted", None) == len(fig.axes):
        return False
    fig.draw_without_rendering()  # constrained layout places the axes and their labels
    renderer = fig.canvas.get_renderer()
    points = 72 / fig.dpi
    changed = False
    for ax in panels:
        ends = ax.transData.transform([(0, 0), (1, 1)])
        for which, along in (("x", 0), ("y", 1)):
            axis = ax.xaxis if which == "x" else ax.yaxis
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels()]
            if len(ax._attnkit_ticks[which]["labels"]) < 2 or not boxes:
                continue
            extent = max((b.x1 - b.x0) if along == 0 else (b.y1 - b.y0) for b in boxes)
            changed |= _thin(ax, which, extent * points,
                             abs(ends[1][along] - ends[0][along]) * points)
    fig._attnkit_fitted = len(fig.axes)  # fewer labels only widen the spacing: done
    return changed


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (default PNG).

    Tick labels of heatmap panels are thinned first (:func:`fit_tick_labels`). The figure is
    rendered into a temporary file in the same directory and moved into place
    (:func:`attnkit._atomic.atomic_write`): an interrupted run leaves the old file or none,
    never a truncated one.
    """
    path = Path(path)
    fit_tick_labels(fig)
    return atomic_write(path, lambda handle: fig.savefig(
        handle, format=path.suffix.lstrip(".") or "png", dpi=DPI))


def _colorbar(fig, image, axes, matrices, vmax, label, shrink):
    """A labelled colour bar; an arrow at the top when some values lie above ``vmax``."""
    clipped = vmax is not None and any(float(m.max()) > vmax for m in matrices)
    bar = fig.colorbar(image, ax=axes, shrink=shrink, extend="max" if clipped else "neither")
    bar.set_label(label + (" (arrow: larger values, clipped)" if clipped else ""))
    return bar


def heatmap_figure(weights, x_labels=None, y_labels=None, title=None, *, annotate=None,
                   colorbar_label=COLORBAR_LABEL, **draw_kwargs):
    """One heatmap of ``weights`` ``(T, S)`` with a labelled colour bar, as a Figure.

    ``draw_kwargs`` go to :func:`draw_heatmap` (``vmax``, ``cmap``, ``x_name``, ``y_name``).
    """
    return grid_figure([[_matrix(weights, "matrix")]], x_labels, y_labels,
                       panel_titles=[[title]],
                       annotate=annotate, colorbar_label=colorbar_label, **draw_kwargs)


def heatmap(weights, x_labels=None, y_labels=None, title=None, path="heatmap.png", *,
            annotate=None, **draw_kwargs) -> Path:
    """One annotated heatmap of ``weights`` ``(T, S)`` written to ``path``.

    ``draw_kwargs`` go to :func:`heatmap_figure`.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: as :func:`draw_heatmap`.
    """
    fig = heatmap_figure(weights, x_labels, y_labels, title, annotate=annotate, **draw_kwargs)
    return save_figure(fig, path)


def _check_grid(panels) -> tuple[int, int]:
    nrows = len(panels)
    ncols = len(panels[0]) if nrows else 0
    if ncols == 0 or any(len(row) != ncols for row in panels):
        raise ValueError(f"panels must be a non-empty grid of equally long rows, got row "
                         f"lengths {[len(row) for row in panels]}")
    return nrows, ncols


def grid_figure(panels: Sequence[Sequence], x_labels=None, y_labels=None, *, title=None,
                row_titles=None, col_titles=None, panel_titles=None, annotate=None,
                colorbar_label=COLORBAR_LABEL, max_size=_FIG_MAX, label_outer=False,
                **draw_kwargs):
    """A grid of heatmaps, ``panels[r][c]`` a ``(T, S)`` matrix, on one colour scale.

    The shared scale (0 to the largest value of any panel unless ``vmax`` is given) keeps
    panels comparable: a brighter cell is a larger weight wherever it is; the colour bar is
    labelled, with an arrow when ``vmax`` clips larger values.

    Sizing: cells are square, as large as reads well (0.5 in annotated, 0.3 in plain), and
    the figure grows with ``T`` and ``S`` until it reaches ``max_size`` inches; past that the
    cells shrink, tick labels shrink to 6 pt, and :func:`fit_tick_labels` thins them. A
    ``(10, 40)`` alignment is a wide, short panel, not a square one.

    Args:
        panels: rows of equally long lists of 2-D matrices (all the same shape).
        x_labels, y_labels: tick labels shared by every panel.
        title: figure title (wrapped to the figure's width).
        row_titles, col_titles: joined into each panel's title as ``"row, col"``...
        panel_titles: ...or one title per panel, rows of lists like ``panels``.
        annotate: as :func:`draw_heatmap`.
        colorbar_label: what the colours measure.
        max_size: ``(width, height)`` cap in inches.
        label_outer: tick labels and axis names only on the bottom row (x) and the left
            column (y), as the panels share them: less clutter, quicker to draw.
        draw_kwargs: as :func:`draw_heatmap` (``vmax``, ``cmap``, ``x_name``, ``y_name``).

    Raises:
        ImportError: matplotlib is missing.
        ValueError: an empty grid or ragged rows; as :func:`draw_heatmap`.
    """
    nrows, ncols = _check_grid(panels)
    matrices = [[_matrix(p, f"panels[{r}][{c}]") for c, p in enumerate(row)]
                for r, row in enumerate(panels)]
    flat = [m for row in matrices for m in row]
    draw_kwargs.setdefault("vmax", max(float(m.max()) for m in flat))
    rows = max(m.shape[0] for m in flat)
    cols = max(m.shape[1] for m in flat)
    annotated = annotate if annotate is not None else rows * cols <= _ANNOTATE_MAX_CELLS
    # Room (inches) for tick labels and axis names, beside each panel or only beside the
    # outer ones, plus a gap and a title line around every panel.
    x_named = x_labels is not None and max(len(str(s)) for s in x_labels) > 1
    longest = max((len(str(s)) for s in x_labels), default=1) if x_named else 1
    y_width = max((len(str(s)) for s in (y_labels if y_labels is not None else [rows])),
                  default=1)
    if rows > 40:  # thinned labels carry their position ("120:t")
        last = draw_kwargs["y_index"][-1] if draw_kwargs.get("y_index") is not None else rows
        y_width = max(y_width, len(str(last)) + 2)
    label_w = 0.35 + 0.07 * min(y_width, 12)
    label_h = 0.5 + (0.07 * min(longest, 12) if x_named else 0)
    label_w, label_h = (label_w, label_h) if label_outer else (ncols * label_w, nrows * label_h)
    gap_w, gap_h, bar_w = 0.15, 0.4, 1.1
    title_h = 0.5 if title else 0.0  # one line; more are added below once wrapped
    cell = min(_CELL_ANNOTATED if annotated else _CELL_PLAIN,
               (max_size[0] - bar_w - label_w - ncols * gap_w) / (ncols * cols),
               (max_size[1] - title_h - label_h - nrows * gap_h) / (nrows * rows))
    cell = max(cell, _CELL_MIN)
    # Titles need about 1.6 in; a narrow panel (a short source) is widened around its cells.
    panel_w = max(cols * cell, 1.6)
    width = ncols * (panel_w + gap_w) + label_w + bar_w
    title = wrap(title, width - 0.3, 12)  # to the figure's width; each line adds height
    title_h = 0.22 * (title.count("\n") + 1) + 0.25 if title else 0.0
    names = [[wrap(panel_titles[r][c] if panel_titles is not None else ", ".join(
        t for t in ((row_titles or [None] * nrows)[r], (col_titles or [None] * ncols)[c]) if t),
        panel_w, 10) for c in range(ncols)] for r in range(nrows)]
    extra = max((name or "").count("\n") for row in names for name in row)  # wrapped lines
    height = nrows * (rows * cell + gap_h + 0.18 * extra) + label_h + title_h
    fig, axes = new_figure(nrows, ncols, figsize=(width, height))
    fontsize = _tick_fontsize(cell)
    image = None
    for r, row in enumerate(matrices):
        for c, matrix in enumerate(row):
            image = draw_heatmap(axes[r, c], matrix, x_labels, y_labels, names[r][c],
                                 annotate=annotated, fontsize=fontsize, cell_inches=cell,
                                 label_x=not label_outer or r == nrows - 1,
                                 label_y=not label_outer or c == 0, **draw_kwargs)
    _colorbar(fig, image, axes, flat, draw_kwargs["vmax"], colorbar_label,
              shrink=0.8 if nrows == 1 else 0.6)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def panel_grid(panels: Sequence[Sequence], x_labels=None, y_labels=None, path="grid.png", *,
               title=None, row_titles=None, col_titles=None, annotate=None,
               **draw_kwargs) -> Path:
    """:func:`grid_figure` written to ``path``; the arguments are the same.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: an empty grid or ragged rows; as :func:`draw_heatmap`.
    """
    fig = grid_figure(panels, x_labels, y_labels, title=title, row_titles=row_titles,
                      col_titles=col_titles, annotate=annotate, **draw_kwargs)
    return save_figure(fig, path)


def head_grid_figure(weights, x_labels=None, y_labels=None, *, title=None, row_titles=None,
                     annotate=None, **draw_kwargs):
    """One panel per head: ``(H, T, S)`` as a row, ``(L, H, T, S)`` as layers by heads.

    All panels share their tokens, so only the bottom row and the left column are labelled
    (pass ``label_outer=False`` to label every panel).

    Args:
        weights: attention weights of one sample, ``(H, T, S)`` or ``(L, H, T, S)``.
        row_titles: one per row; default ``"layer l"`` for 4-D input.
        x_labels, y_labels, title, annotate, draw_kwargs: as :func:`grid_figure`.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: ``weights`` is not 3-D or 4-D.
    """
    shape = tuple(weights.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"weights must be (H, T, S) or (L, H, T, S), got shape {shape}")
    grid = weights if len(shape) == 4 else weights[None]  # (L, H, T, S)
    if row_titles is None and len(shape) == 4:
        row_titles = [f"layer {layer}" for layer in range(shape[0])]
    col_titles = [f"head {h}" for h in range(grid.shape[1])]
    draw_kwargs.setdefault("label_outer", True)
    return grid_figure([list(layer) for layer in grid], x_labels, y_labels, title=title,
                       row_titles=row_titles, col_titles=col_titles, annotate=annotate,
                       **draw_kwargs)


def head_grid(weights, x_labels=None, y_labels=None, path="heads.png", *, title=None,
              row_titles=None, annotate=None, **draw_kwargs) -> Path:
    """:func:`head_grid_figure` written to ``path``; the arguments are the same.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: ``weights`` is not 3-D or 4-D.
    """
    fig = head_grid_figure(weights, x_labels, y_labels, title=title, row_titles=row_titles,
                           annotate=annotate, **draw_kwargs)
    return save_figure(fig, path)
