"""The translator's figure: its cross-attention on one input, in the style of Bahdanau et al.
Fig. 3 (source characters along x, output characters down y).
"""

from __future__ import annotations

import math
from pathlib import Path

from .model import SOURCE_VOCAB, TARGET_VOCAB, TransformerSeq2Seq

__all__ = ["alignment_figure", "plot_alignment"]


def alignment_figure(model: TransformerSeq2Seq, source: str):
    """The cross-attention figure of one input, as a matplotlib Figure: one panel per decoder
    layer and head, plus each layer's head average. In each panel the source characters run
    along x and the 10 output characters down y, in square cells, so a panel is as wide as
    the source is long. Long sources (wide panels) stack the heads down the figure with one
    column per layer; short ones put the heads across with one row per layer: whichever
    figure is closer to a screen's shape.

    Raises:
        ValueError: characters outside the vocabulary, or a source too long.
        ImportError: matplotlib is missing.
    """
    from ...viz import grid_figure

    text = source.lower()
    tokens, _, weights = model.greedy_decode(SOURCE_VOCAB.batch([text]), need_weights=True)
    weights = weights[:, 0]  # (layers, H, 10, S)
    layers, heads, steps, length = weights.shape
    panels = [list(weights[layer]) + [weights[layer].mean(0)] for layer in range(layers)]
    titles = [[f"decoder layer {layer}, " + (f"head {h}" if h < heads else "head average")
               for h in range(heads + 1)] for layer in range(layers)]
    across = (heads + 1) * length / (layers * steps)  # width / height, heads across
    down = layers * length / ((heads + 1) * steps)  # width / height, heads down
    if abs(math.log(down / 1.6)) < abs(math.log(across / 1.6)):
        # rows: heads, columns: layers
        panels, titles = ([list(column) for column in zip(*grid)] for grid in (panels, titles))
    output = TARGET_VOCAB.decode(tokens[0].tolist())
    # One label per output step; a special token (an untrained model's) shows as "·".
    characters = [TARGET_VOCAB.decode([t]) or "\u00b7" for t in tokens[0].tolist()]
    return grid_figure(panels, [c if c != " " else "\u2423" for c in text], characters,
                       title=f"cross-attention: {source!r} -> {output} (bright: the source "
                             f"characters each output character reads)",
                       annotate=False, cmap="gray",
                       panel_titles=titles, x_name="source", y_name="output",
                       max_size=(18.0, 20.0))


def plot_alignment(model: TransformerSeq2Seq, source: str, path) -> Path:
    """Write :func:`alignment_figure` of ``source`` to ``path`` (atomically).

    Raises:
        ValueError: characters outside the vocabulary, or a source too long.
        ImportError: matplotlib is missing.
    """
    from ...viz import save_figure

    return save_figure(alignment_figure(model, source), path)
