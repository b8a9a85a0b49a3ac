"""The attention explorer inside a notebook (JupyterLab, Notebook 7, VS Code, Colab).

::

    from attnkit import widgets
    widgets.tutorial("attention is all you need")   # the tutorial's steps on any sentence
    widgets.mask(64, window=(15, 0), block_q=16, block_k=16)  # pattern, block map, explain()
    widgets.heads(weights, tokens)                 # head + model views of (L, H, T, T) weights
    widgets.translate("25th of June, 2009")        # the trained translator's cross-attention
    widgets.gpt("def attention(")                  # the trained GPT's heads
    widgets.explorer()                             # every tab

Each returns a live widget (anywidget, the ``notebook`` extra: ``pip install
"attnkit[notebook]"``) drawn by the same JavaScript as ``attnkit explore``; typing in it asks
the kernel. Without anywidget, or with ``static=True``, each returns static HTML of the same
views. A widget's display also carries that static copy, which a notebook exported to HTML
shows. Every view has a "save PNG" button; :meth:`Widget.save_png` saves one from Python.
See :mod:`attnkit.apps.explore.widget` and ``docs/explore.md``.
"""

from .apps.explore.widget import (HAS_ANYWIDGET, StaticView, Widget, explorer, gpt, heads, mask,
                                  translate, tutorial)

__all__ = ["HAS_ANYWIDGET", "StaticView", "Widget", "explorer", "gpt", "heads", "mask",
           "translate", "tutorial"]
