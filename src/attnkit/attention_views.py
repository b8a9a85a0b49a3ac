"""The figures and text of :class:`attnkit.AttentionMaps`: heatmap, head and model views,
PNG export, notebook display and the summary table.

Kept apart from the data (:mod:`attnkit.attention_maps`) so each file reads top to bottom;
:class:`MapViews` is a mixin that reads only the data members of ``AttentionMaps``
(``layers``, ``heads``, ``readable()``, tokens, positions, ``window``, ``block``).
matplotlib is imported lazily through :mod:`attnkit.viz`.

Shape letters: ``B`` batch, ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

import base64
import html

import torch
from torch import Tensor

__all__ = ["MapViews"]

_VIEWS = ("model", "head", "heatmap")


class MapViews:
    """Figures, PNG, notebook display and the summary of an ``AttentionMaps``."""

    # --- figures --------------------------------------------------------------------------

    def _figure_title(self, what: str, sample: int, drawn: "AttentionMaps") -> str:
        title = f"{self.title}: {what}, sample {self._sample_index(sample)}"
        if drawn.window is not None:
            (q0, q1), (k0, k1) = drawn.window
            title += f"; queries {q0}..{q1}, keys {k0}..{k1}"
        if drawn.block > 1:
            title += (f"; blocks of {drawn.block} tokens (mean over a block's queries of the "
                      f"weight on a block's keys)")
        return title

    def _grid(self, panels, maps, title, panel_titles, draw_kwargs):
        from . import viz

        return viz.grid_figure(panels, maps.key_tokens[0], maps.query_tokens[0], title=title,
                               panel_titles=panel_titles, label_outer=True,
                               x_index=maps.key_positions, y_index=maps.query_positions,
                               **draw_kwargs)

    def _layer_title(self, layer: int) -> str:
        name = self.layer_names.get(layer)
        return f"layer {layer}" + (f" ({name})" if name else "")

    def heatmap(self, layer: int | None = None, head: int | None = None, *, sample: int = 0,
                max_cells: int = 256, **draw_kwargs):
        """One panel: ``maps[layer, head]``, or the mean over the chosen heads (``head=None``)
        and/or layers (``layer=None``), of one sample.

        Every view draws one sample without its padding, pooled to at most ``max_cells``
        cells a side (:meth:`pool`); ``draw_kwargs`` go to :func:`attnkit.viz.grid_figure`
        (``vmax``, ``cmap``, ``annotate``, ``max_size``).

        Raises:
            KeyError: a layer or head that was not inspected.
            ImportError: matplotlib is missing.
        """
        maps = self.readable(sample, max_cells)
        layers = self.layers if layer is None else [layer]
        heads = self.heads if head is None else [head]
        matrix = torch.stack([maps[l, h][0] for l in layers for h in heads]).mean(0)
        what = ("mean over layers" if layer is None else f"layer {layer}") + ", " + \
            ("mean over heads" if head is None else f"head {head}")
        return self._grid([[matrix]], maps, self._figure_title(what, sample, maps), [[None]],
                          draw_kwargs)

    def head_view(self, layer: int | None = None, *, sample: int = 0, max_cells: int = 128,
                  **draw_kwargs):
        """One layer's chosen heads side by side (default: the first chosen layer); the
        keywords as :meth:`heatmap`.

        Raises:
            KeyError: a layer that was not inspected.
            ImportError: matplotlib is missing.
        """
        layer = self.layers[0] if layer is None else layer
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not inspected: layers {self.layers}")
        maps = self.readable(sample, max_cells)
        panels = [[maps[layer, h][0] for h in self.heads]]
        title = self._figure_title(self._layer_title(layer), sample, maps)
        return self._grid(panels, maps, title, [[f"head {h}" for h in self.heads]],
                          draw_kwargs)

    def model_view(self, *, sample: int = 0, max_cells: int = 64, **draw_kwargs):
        """Every chosen layer (rows) by every chosen head (columns), one colour scale; the
        keywords as :meth:`heatmap`.

        Raises:
            ImportError: matplotlib is missing.
        """
        maps = self.readable(sample, max_cells)
        panels = [[maps[l, h][0] for h in self.heads] for l in self.layers]
        titles = [[f"layer {l}, head {h}" for h in self.heads] for l in self.layers]
        title = self._figure_title("layers x heads", sample, maps)
        return self._grid(panels, maps, title, titles, draw_kwargs)

    def figure(self, view: str = "model", **kwargs):
        """:meth:`model_view`, :meth:`head_view` or :meth:`heatmap` by name.

        Raises:
            ValueError: another view.
        """
        if view not in _VIEWS:
            raise ValueError(f"view must be one of {list(_VIEWS)}, got {view!r}")
        return {"model": self.model_view, "head": self.head_view,
                "heatmap": self.heatmap}[view](**kwargs)

    def save(self, path, view: str = "model", **kwargs):
        """Draw ``view`` (as :meth:`figure`) and write it to ``path`` atomically (the format
        follows the suffix; PNG without one). Returns the path."""
        from . import viz

        return viz.save_figure(self.figure(view, **kwargs), path)

    def to_png(self, view: str = "model", **kwargs) -> bytes:
        """The PNG bytes of ``view`` (as :meth:`figure`)."""
        import io

        from . import viz

        fig = self.figure(view, **kwargs)
        viz.fit_tick_labels(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=viz.DPI)
        return buffer.getvalue()

    def widget(self, *, sample: int = 0, max_cells: int = 128, language: str = "en",
               static: bool | None = None):
        """The explorer's head and model views of one sample, as a notebook widget
        (:func:`attnkit.widgets.heads`; static HTML without anywidget).

        The sample is drawn as :meth:`readable` gives it: padding dropped, pooled to at most
        ``max_cells`` tokens a side (each pooled cell shows its block's mean weight), so a
        2k-token map stays interactive; :meth:`zoom` first to look at a span in full.

        Raises:
            ValueError: cross-attention (queries and keys differ), or what
                :func:`attnkit.widgets.heads` refuses (too many weights: keep fewer heads).
        """
        from . import widgets

        maps = self.readable(sample, max_cells)
        if maps.num_queries != maps.num_keys or maps.query_positions != maps.key_positions:
            raise ValueError(f"the head and model views draw self-attention over one token "
                             f"sequence; these maps have {maps.num_queries} queries and "
                             f"{maps.num_keys} keys (zoom rows and cols to the same span)")
        weights = maps.stack(0)  # (L, H, T, T)
        return widgets.heads(weights, list(maps.query_tokens[0]),
                             layer_labels=[str(l) for l in self.layers],
                             head_labels=[str(h) for h in self.heads],
                             language=language, static=static)

    def _repr_png_(self):
        # the model view while it stays legible, else the mean over every layer and head
        view = "model" if len(self.layers) * len(self.heads) <= 16 else "heatmap"
        try:
            return self.to_png(view, max_cells=48 if view == "model" else 128,
                               annotate=False)  # numbers in cells are slow to lay out
        except ImportError:  # no matplotlib: the notebook shows the text instead
            return None

    def _repr_html_(self) -> str:
        png = self._repr_png_()
        image = "" if png is None else (f'<img alt="attention weights" src="data:image/png;'
                                        f'base64,{base64.b64encode(png).decode()}">')
        return f"<pre>{html.escape(self.summary())}</pre>{image}"

    # --- text -----------------------------------------------------------------------------

    def _stats(self, w: Tensor) -> tuple[float, float, float, int]:
        """Of one sample without padding ``w (1, T, S)``: mean entropy (nats) of the rows,
        mean distance in positions, mean weight on the first key, the most attended key."""
        w = w[0].double()  # (T, S)
        entropy = -(w * torch.log(w.clamp(min=1e-300))).sum(-1)  # (T,)
        q = torch.tensor(self.query_positions, dtype=torch.float64).view(-1, 1)  # (T, 1)
        k = torch.tensor(self.key_positions, dtype=torch.float64).view(1, -1)  # (1, S)
        distance = (w * (q - k).abs()).sum(-1)  # (T,)
        return (float(entropy.mean()), float(distance.mean()), float(w[:, 0].mean()),
                int(w.sum(0).argmax()))

    def summary(self, sample: int = 0) -> str:
        """A text table of one sample (padding dropped): per layer and head, the rows' mean
        entropy (nats), mean attention distance (positions), mean weight on the first token
        and the key that receives the most weight in total."""
        maps = self.sample(sample)
        lines = [f"{self.title}: {len(self.layers)} layer(s) x {len(self.heads)} head(s), "
                 f"sample {self._sample_index(sample)} of {self.batch_size}: "
                 f"{maps.num_queries} queries x {maps.num_keys} keys"
                 + (f" (blocks of {self.block} tokens)" if self.block > 1 else "")]
        for l in self.layers:
            info = self.layer_info.get(l)
            if info or self.layer_names.get(l):
                lines.append(f"  {self._layer_title(l)}" + (f": {info}" if info else ""))
        lines.append("| layer | head | entropy | mean distance | on first token | most "
                     "attended key |")
        lines.append("|------:|-----:|--------:|--------------:|---------------:|"
                     "-------------------|")
        for (l, h), w in maps._weights.items():
            entropy, distance, first, top = maps._stats(w)
            token = maps.key_tokens[0][top]
            lines.append(f"| {l:5d} | {h:4d} | {entropy:7.3f} | {distance:13.2f} | "
                         f"{first:14.3f} | {f'{maps.key_positions[top]}:{token!r}':<17} |")
        return "\n".join(lines)
