"""Attention figures: annotated heatmaps and grids of them, written atomically.

matplotlib is an optional extra, imported only when a figure is drawn (``import attnkit``
never needs it). Figures are plain ``matplotlib.figure.Figure`` objects on an Agg canvas:
no pyplot, no global backend switch, no GUI, so drawing works headless and never changes a
user's own matplotlib set-up.

Three layers, so later figures reuse the pieces:

* :func:`draw_heatmap` draws one matrix on a given Axes (tokens on both axes, values written
  in the cells). Translator alignment plots call it with ``x_name="source"``.
* :func:`panel_grid` lays rows of matrices out as a grid on one shared colour scale;
  :func:`head_grid` is the common case of ``(H, T, S)`` heads or ``(L, H, T, S)`` layers by
  heads.
* :func:`save_figure` writes a figure to a temporary file beside the target and renames it,
  so a reader never sees a half-written PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_write

__all__ = ["require_matplotlib", "new_figure", "draw_heatmap", "save_figure", "heatmap",
           "panel_grid", "head_grid", "INSTALL_HINT"]

INSTALL_HINT = 'pip install "attnkit[viz]"'
# Above this many cells the numbers no longer fit in them.
_ANNOTATE_MAX_CELLS = 256


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


def new_figure(nrows: int = 1, ncols: int = 1, *, panel_size=(4.2, 3.8)):
    """A figure on an Agg canvas and its ``(nrows, ncols)`` array of Axes.

    Raises:
        ImportError: matplotlib is missing.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: rendering without pyplot or a global backend
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def draw_heatmap(ax, matrix, x_labels=None, y_labels=None, title=None, *, annotate=None,
                 vmin=0.0, vmax=None, cmap="viridis", x_name="key", y_name="query"):
    """Draw ``matrix`` (rows = queries, columns = keys) on ``ax`` and return the image.

    Args:
        ax: a matplotlib Axes.
        matrix: 2-D tensor, array or nested list ``(rows, cols)``.
        x_labels, y_labels: one label per column / row (e.g. tokens), or None for indices.
        title: panel title.
        annotate: write each value in its cell; default when there are at most 256 cells.
        vmin, vmax: colour scale; ``vmax`` defaults to the matrix maximum.
        cmap: matplotlib colour map name.
        x_name, y_name: axis titles.

    Raises:
        ValueError: ``matrix`` is not 2-D, or a label list does not match its size.
    """
    data = _matrix(matrix, "matrix")
    rows, cols = data.shape
    for arg, labels, size in (("x_labels", x_labels, cols), ("y_labels", y_labels, rows)):
        if labels is not None and len(labels) != size:
            what = "column" if arg == "x_labels" else "row"
            raise ValueError(f"{arg} must have one label per {what} ({size}), got {len(labels)}")
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax)
    named = x_labels is not None
    ax.set_xticks(range(cols), labels=list(x_labels) if named else range(cols),
                  rotation=45 if named else 0, ha="right" if named else "center")
    ax.set_yticks(range(rows), labels=list(y_labels) if y_labels is not None else range(rows))
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    if title:
        ax.set_title(title)
    if annotate if annotate is not None else rows * cols <= _ANNOTATE_MAX_CELLS:
        for i in range(rows):
            for j in range(cols):
                # Light text on the dark end of the colour map, dark text on the light end.
                colour = "white" if image.norm(data[i, j]) < 0.5 else "black"
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color=colour,
                        fontsize=8)
    return image


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (default PNG).

    The figure is rendered into a temporary file in the same directory and moved into place
    (:func:`attnkit.checkpoint.atomic_write`): an interrupted run leaves the old file or none,
    never a truncated one.
    """
    path = Path(path)
    return atomic_write(path, lambda handle: fig.savefig(
        handle, format=path.suffix.lstrip(".") or "png", dpi=120))


def heatmap(weights, x_labels=None, y_labels=None, title=None, path="heatmap.png", *,
            annotate=None, **draw_kwargs) -> Path:
    """One annotated heatmap of ``weights`` ``(T, S)`` written to ``path``.

    ``draw_kwargs`` go to :func:`draw_heatmap` (``vmax``, ``cmap``, ``x_name``, ``y_name``).

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: as :func:`draw_heatmap`.
    """
    fig, axes = new_figure()
    image = draw_heatmap(axes[0, 0], weights, x_labels, y_labels, title, annotate=annotate,
                         **draw_kwargs)
    fig.colorbar(image, ax=axes[0, 0], shrink=0.8)
    return save_figure(fig, path)


def panel_grid(panels: Sequence[Sequence], x_labels=None, y_labels=None, path="grid.png", *,
               title=None, row_titles=None, col_titles=None, annotate=None,
               **draw_kwargs) -> Path:
    """A grid of heatmaps, ``panels[r][c]`` a ``(T, S)`` matrix, on one colour scale.

    The shared scale (0 to the largest value of any panel unless ``vmax`` is given) keeps
    panels comparable: a brighter cell is a larger weight wherever it is.

    Args:
        panels: rows of equally long lists of 2-D matrices.
        x_labels, y_labels: tick labels shared by every panel.
        path: where to write the figure.
        title: figure title.
        row_titles, col_titles: prefixed to each panel's title as ``"row, col"``.
        annotate, draw_kwargs: as :func:`draw_heatmap`.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: an empty grid or ragged rows; as :func:`draw_heatmap`.
    """
    nrows = len(panels)
    ncols = len(panels[0]) if nrows else 0
    if ncols == 0 or any(len(row) != ncols for row in panels):
        raise ValueError(f"panels must be a non-empty grid of equally long rows, got row "
                         f"lengths {[len(row) for row in panels]}")
    matrices = [[_matrix(p, f"panels[{r}][{c}]") for c, p in enumerate(row)]
                for r, row in enumerate(panels)]
    draw_kwargs.setdefault("vmax", max(float(m.max()) for row in matrices for m in row))
    fig, axes = new_figure(nrows, ncols)
    for r, row in enumerate(matrices):
        for c, matrix in enumerate(row):
            names = [t for t in ((row_titles or [None] * nrows)[r],
                                 (col_titles or [None] * ncols)[c]) if t]
            image = draw_heatmap(axes[r, c], matrix, x_labels, y_labels, ", ".join(names),
                                 annotate=annotate, **draw_kwargs)
    fig.colorbar(image, ax=axes, shrink=0.6)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def head_grid(weights, x_labels=None, y_labels=None, path="heads.png", *, title=None,
              row_titles=None, annotate=None, **draw_kwargs) -> Path:
    """One panel per head: ``(H, T, S)`` as a row, ``(L, H, T, S)`` as layers by heads.

    Args:
        weights: attention weights of one sample, ``(H, T, S)`` or ``(L, H, T, S)``.
        row_titles: one per row; default ``"layer l"`` for 4-D input.
        x_labels, y_labels, path, title, annotate, draw_kwargs: as :func:`panel_grid`.

    Returns:
        The path written.

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
    return panel_grid([list(layer) for layer in grid], x_labels, y_labels, path, title=title,
                      row_titles=row_titles, col_titles=col_titles, annotate=annotate,
                      **draw_kwargs)
