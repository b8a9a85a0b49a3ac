"""The explorer in a notebook: ``attnkit.widgets`` (an anywidget widget, or static HTML).

Each function returns a widget that shows one or more of the explorer's views, drawn by the
page's own JavaScript (:mod:`.scripts`) and computed by the same view functions the server
calls: :func:`tutorial` (the tutorial's steps on any sentence), :func:`mask` (a mask's pattern,
block map and ``explain()``), :func:`translate` (the translator's cross-attention),
:func:`gpt` (the GPT's heads), :func:`heads` (head and model views of any weights: a tensor
from any model) and :func:`explorer` (every tab). Typing in the widget asks the kernel, which
answers with the view's new data; the model keeps the last data, so a saved notebook shows
it again.

With anywidget installed (the ``notebook`` extra) the result is a :class:`Widget`, which works
in JupyterLab, Notebook 7, VS Code and Colab. Its display data also carries a static HTML copy
(``text/html``: the same scripts, the data embedded, no kernel needed), which is what a
notebook exported to HTML shows, and what a front end without widget support shows. Without
anywidget, or with ``static=True``, the result is a :class:`StaticView` (that HTML only).
Either can export a PNG: the "save PNG" button of each view, or :meth:`Widget.save_png`.
"""

from __future__ import annotations

import base64
import binascii
import sys
import traceback
from pathlib import Path

from ..._atomic import atomic_write
from .._i18n import LANGUAGES, localized, translator
from ..walkthrough_steps import SENTENCE
from .guard import cost_refusal
from .mask_view import mask_view
from .model_view import ModelMissing, Models, gpt_view, heads_view, translate_view
from .scripts import static_html, widget_module
from .server import DEFAULTS
from .tutorial_view import tutorial_view

__all__ = ["Widget", "StaticView", "tutorial", "mask", "translate", "gpt", "heads", "explorer",
           "HAS_ANYWIDGET"]

try:
    import anywidget
    import traitlets
    HAS_ANYWIDGET = True
except ImportError:  # the notebook extra is not installed: static HTML only
    HAS_ANYWIDGET = False


def _compute(view: str, params: dict, models: Models) -> dict:
    """One view's data for ``params``, as the server computes it."""
    if view == "tutorial":
        return tutorial_view(params.get("sentence", SENTENCE))
    if view == "mask":
        return mask_view(params)
    if view == "translate":
        return translate_view(models, params.get("text", ""))
    if view == "gpt":
        return gpt_view(models, params.get("prompt", ""))
    raise ValueError(f"view must be one of tutorial, mask, translate, gpt; got {view!r}")


def _error(err: Exception) -> dict:
    """A view that could not be computed, in every language (as an exported page keeps it)."""
    return {"error": str(err), "errors": {lang: localized(err, lang) for lang in LANGUAGES}}


class _Views:
    """What both kinds of widget hold: the views shown, their data and choices."""

    def _setup(self, views, view, data, params, language):
        translator(language)  # a bad language fails here, naming it
        self._options = {"views": list(views), "view": view, "lang": language}
        return {"views": list(views), "view": view, "data": data, "params": params,
                "language": language}

    def static_html(self) -> str:
        """This widget as self-contained HTML (the scripts and the current data inlined)."""
        return static_html({**self._options, "initial": dict(self.data),
                            "params": dict(self.params)})

    def save_html(self, path) -> Path:
        """Write :meth:`static_html` as one HTML page (atomically); returns the path."""
        page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>attnkit</title>'
                f"</head>\n<body>\n{self.static_html()}</body></html>\n")
        return atomic_write(path, lambda handle: handle.write(page.encode("utf-8")))


class StaticView(_Views):
    """A widget's views as static HTML (no kernel): what :mod:`attnkit.widgets` returns
    without anywidget or with ``static=True``. Displays itself in a notebook
    (``_repr_html_``); :meth:`save_html` writes it as a page."""

    def __init__(self, views, view, data, params, language="en", models=None):
        state = self._setup(views, view, data, params, language)
        self.data, self.params, self.views = state["data"], state["params"], state["views"]

    def _repr_html_(self) -> str:
        return self.static_html()

    def __repr__(self) -> str:
        return f"<attnkit StaticView of {', '.join(self.views)}>"


if HAS_ANYWIDGET:
    class Widget(_Views, anywidget.AnyWidget):
        """The explorer's views as a live notebook widget (anywidget).

        Attributes:
            data: ``{view: data}``, the views' current data (synced to the front end).
            params: ``{view: choices}``, what each view was computed from.
            views, view: the tabs shown and the one selected first.
            language: ``"en"`` or ``"zh"``.
            saved: paths :meth:`save_png` wrote, in order.
        """

        _esm = widget_module()
        data = traitlets.Dict().tag(sync=True)
        params = traitlets.Dict().tag(sync=True)
        views = traitlets.List().tag(sync=True)
        view = traitlets.Unicode("tutorial").tag(sync=True)
        language = traitlets.Unicode("en").tag(sync=True)

        def __init__(self, views, view, data, params, language="en", models=None):
            super().__init__(**self._setup(views, view, data, params, language))
            self._models = models or Models()
            self._exports: dict[int, Path] = {}  # export id -> the file to write
            self._asked = 0
            self.saved: list[Path] = []
            self.on_msg(self._on_message)

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs)
            if bundle is None:
                return None
            data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
            # Front ends without widgets, and nbconvert's HTML export, show this copy.
            return {**data, "text/html": self.static_html()}, metadata

        def update(self, view: str | None = None, **params) -> None:
            """Recompute ``view`` (default: the first shown) from ``params`` and redraw it.

            Raises:
                ValueError, TypeError: what the view refuses (as the page would show it).
                ModelMissing: no trained model for ``translate`` or ``gpt``.
            """
            view = view or self.views[0]
            data = _compute(view, params, self._models)
            self.params = {**self.params, view: params}
            self.data = {**self.data, view: data}

        def save_png(self, path, view: str | None = None) -> Path:
            """Ask the front end for ``view``'s PNG (as its "save PNG" button makes it) and
            write it to ``path`` when it answers: after the cell finishes, since the kernel
            reads the answer then. :attr:`saved` lists the files written."""
            view = view or self.views[0]
            self._asked += 1
            self._exports[self._asked] = Path(path)
            self.send({"type": "export", "id": self._asked, "view": view})
            return Path(path)

        def _on_message(self, widget, content, buffers) -> None:
            kind = content.get("type")
            if kind == "request":
                self._answer(content)
            elif kind == "png":
                self._write_png(content)

        def _answer(self, content: dict) -> None:
            view, params = content.get("view"), content.get("params") or {}
            language = content.get("lang") if content.get("lang") in ("en", "zh") else "en"
            reply = {"type": "response", "id": content.get("id"), "view": view}
            try:
                if not isinstance(params, dict):
                    raise TypeError("the request's params must be a JSON object")
                reason = cost_refusal(f"/api/{view}", params, language)
                if reason:
                    raise ValueError(reason)
                data = _compute(view, params, self._models)
            except (ValueError, TypeError, ModelMissing) as err:
                reply["error"] = localized(err, language)
            except Exception as err:  # a bug: say so in the widget, keep the kernel alive
                traceback.print_exc(file=sys.stderr)
                reply["error"] = f"internal error ({type(err).__name__}: {err})"
            else:
                self.params = {**self.params, view: params}
                self.data = {**self.data, view: data}
            self.send(reply)

        def _write_png(self, content: dict) -> None:
            path = self._exports.pop(content.get("id"), None)
            if path is None or content.get("error"):
                if content.get("error"):
                    print(f"attnkit widget: no PNG: {content['error']}", file=sys.stderr)
                return
            text = str(content.get("data", ""))
            prefix = "data:image/png;base64,"
            try:
                png = base64.b64decode(text[len(prefix):], validate=True) \
                    if text.startswith(prefix) else b""
            except binascii.Error:
                png = b""
            if not png.startswith(b"\x89PNG"):
                print("attnkit widget: the front end sent no PNG", file=sys.stderr)
                return
            self.saved.append(atomic_write(path, lambda handle: handle.write(png)))
else:
    Widget = None


def _make(views, view, data, params, language, static, models=None):
    if static is None:
        static = not HAS_ANYWIDGET
    if not static and not HAS_ANYWIDGET:
        raise ImportError('attnkit.widgets needs anywidget for a live widget; install it with: '
                          'pip install "attnkit[notebook]" (or pass static=True)')
    kind = StaticView if static else Widget
    return kind(views, view, data, params, language, models)


def tutorial(sentence: str | None = None, *, language: str = "en", static: bool | None = None):
    """The tutorial's steps on ``sentence`` (default: the tutorial's own), as the explorer's
    Tutorial tab shows them.

    Args:
        sentence: 1 to 16 words separated by spaces.
        language: ``"en"`` or ``"zh"``.
        static: True for static HTML; default: a live widget when anywidget is installed.

    Raises:
        ValueError, TypeError: a sentence the view refuses (empty, too long), or a bad
            ``language``.
        ImportError: ``static=False`` without anywidget.
    """
    params = {"sentence": SENTENCE if sentence is None else sentence}
    return _make(["tutorial"], "tutorial", {"tutorial": _compute("tutorial", params, None)},
                 {"tutorial": params}, language, static)


def mask(T: int = 16, S: int | None = None, *, causal: bool = True, window=None,
         prefix_lm: int = 0, chunked_local: int = 0, documents=None, combine: str = "and",
         valid_keys: int = 0, align: str = "top_left", causal_offset: int | None = None,
         block_q: int = 4, block_k: int = 4, language: str = "en",
         static: bool | None = None):
    """A mask's ``T x S`` pattern, the engine's block map and ``explain()``'s choice.

    Args:
        T, S: queries and keys (S defaults to T).
        causal: a causal mask (``align`` or ``causal_offset`` place its diagonal).
        window: a sliding window: ``(left, right)`` keys around each query (None for
            unbounded), or an int ``w`` for ``(w - 1, 0)``.
        prefix_lm, chunked_local: prefix length / chunk size (0: none).
        documents: lengths of packed documents adding up to ``S`` (needs ``T == S``).
        combine: ``"and"`` or ``"or"``: how the kinds above combine.
        valid_keys: keys after this many are padding (0: none; always ANDed).
        block_q, block_k: the chunked backend's tile sizes for the block map.
        language, static: as :func:`tutorial`.

    Raises:
        ValueError, TypeError: a choice the view refuses (named, as in the explorer).
    """
    params = {"T": T, "S": T if S is None else S, "causal": causal, "align": align,
              "causal_offset": "" if causal_offset is None else causal_offset,
              "prefix": prefix_lm, "chunk": chunked_local, "combine": combine,
              "valid_keys": valid_keys, "block_q": block_q, "block_k": block_k,
              "documents": ",".join(str(n) for n in documents) if documents else ""}
    if isinstance(window, int) and not isinstance(window, bool):
        params["window"] = window
    elif window is not None:
        left, right = window
        params.update(window_on=True, window_left="" if left is None else left,
                      window_right="" if right is None else right)
    reason = cost_refusal("/api/mask", params, language)
    if reason:
        raise ValueError(reason)
    return _make(["mask"], "mask", {"mask": _compute("mask", params, None)}, {"mask": params},
                 language, static)


def translate(text: str = DEFAULTS["translate"]["text"], *, translator_dir="out/translate",
              language: str = "en", static: bool | None = None):
    """The trained translator's answer for ``text`` and its cross-attention, per layer and
    head (train it with ``attnkit translate train``).

    Raises:
        ModelMissing: no trained translator in ``translator_dir`` (the message says how to
            train one).
        ValueError, TypeError: a text the translator refuses.
    """
    models = Models(translator_dir)
    params = {"text": text}
    return _make(["translate"], "translate", {"translate": _compute("translate", params, models)},
                 {"translate": params}, language, static, models)


def gpt(prompt: str = DEFAULTS["gpt"]["prompt"], *, checkpoint="out/gpt/gpt.pt",
        language: str = "en", static: bool | None = None):
    """The trained GPT's attention on ``prompt``: head view and model view (train it with
    ``attnkit gpt train``).

    Raises:
        ModelMissing: no usable checkpoint (the message says how to make one).
        ValueError, TypeError: a prompt the model cannot read (unknown characters, too long).
    """
    models = Models(gpt_path=checkpoint)
    params = {"prompt": prompt}
    reason = cost_refusal("/api/gpt", params, language)
    if reason:
        raise ValueError(reason)
    return _make(["gpt"], "gpt", {"gpt": _compute("gpt", params, models)}, {"gpt": params},
                 language, static, models)


def heads(weights, tokens, *, layer_labels=None, head_labels=None, causal: bool | None = None,
          language: str = "en", static: bool | None = None):
    """Head view and model view of any self-attention weights: the explorer's GPT view for
    weights you computed (``attnkit.inspect``'s, a model's ``output_attentions``, the
    tutorial's modules' ``return_weights=True``).

    Args:
        weights: ``(H, T, T)`` or ``(L, H, T, T)`` weights of one sample, each row a
            distribution over the keys, or a sequence of per-layer ``(H, T, T)`` or
            ``(1, H, T, T)`` tensors. At most 2**24 weights (``L * H * T * T``): keep the
            layers and heads you want to look at.
        tokens: ``T`` strings (the model's tokens).
        layer_labels, head_labels: names shown for the layers and heads (default 0, 1, ...).
        causal: draw keys up to each query only; default: detected (all zero above the
            diagonal).
        language, static: as :func:`tutorial`.

    Raises:
        TypeError, ValueError: as :func:`attnkit.apps.explore.model_view.heads_view`.
    """
    data = heads_view(weights, tokens, layer_labels=layer_labels, head_labels=head_labels,
                      causal=causal)
    return _make(["gpt"], "gpt", {"gpt": data}, {}, language, static)


def explorer(*, translator_dir="out/translate", checkpoint="out/gpt/gpt.pt",
             language: str = "en", static: bool | None = None):
    """Every tab of the explorer, on its default inputs; a view whose model is missing shows
    why (and how to train it), as ``attnkit explore --export`` does."""
    models = Models(translator_dir, checkpoint)
    data, params = {}, {}
    for view in ("tutorial", "mask", "translate", "gpt"):
        params[view] = {"tutorial": {"sentence": SENTENCE}}.get(view, DEFAULTS[view])
        try:
            data[view] = _compute(view, params[view], models)
        except (ValueError, TypeError, ModelMissing) as err:
            data[view] = _error(err)
    return _make(["tutorial", "mask", "translate", "gpt"], "tutorial", data, params, language,
                 static, models)
