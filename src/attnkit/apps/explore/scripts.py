"""The explorer's JavaScript, assembled once for the page and for the notebook widget.

``assets/core.js``, ``views.js``, ``models.js`` and ``app.js`` are the body of one function,
``attnkitExplorer(root, options)``, that draws the explorer inside ``root`` (a document or a
shadow root). The served page (:func:`page_script`), the exported HTML file, the anywidget
widget (:func:`widget_module`) and the widget's static HTML copy (:func:`static_html`) all run
that same function; they differ only in where the views' data come from (the server's API, the
embedded views, the kernel) and in the few lines that call it.

* :func:`asset` - one packaged file's bytes (``explorer.js`` is :func:`page_script`).
* :func:`markup` - the page's body between its ``explorer:begin``/``end`` markers: what a
  widget puts in its shadow root.
* :func:`script_safe` - JSON that cannot close the ``<script>`` it sits in.
"""

from __future__ import annotations

import functools
import html
import json
import secrets
from importlib import resources

from .._i18n import LANGUAGES, catalogue

__all__ = ["SOURCES", "asset", "script_safe", "explorer_script", "page_script", "markup",
           "widget_module", "static_html"]

SOURCES = ("core.js", "views.js", "models.js", "app.js")  # attnkitExplorer's body, in order


def asset(name: str) -> bytes:
    """The bytes of one packaged asset; ``explorer.js`` is :func:`page_script`."""
    if name == "explorer.js":
        return page_script().encode("utf-8")
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def script_safe(payload) -> str:
    """JSON that cannot close the ``<script>`` element it is embedded in."""
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") \
        .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@functools.lru_cache(maxsize=None)
def explorer_script() -> str:
    """``function attnkitExplorer(root, options) {...}``: :data:`SOURCES` as one function."""
    parts = [asset(name).decode("utf-8") for name in SOURCES]
    body = "\n".join(f"// ---- {name}\n{text}" for name, text in zip(SOURCES, parts))
    return ('"use strict";\n// attnkit explore: assets/core.js, views.js, models.js, app.js as '
            "one function (attnkit/apps/explore/scripts.py).\n"
            f"function attnkitExplorer(root, options) {{\n{body}\nreturn state;\n}}\n")


def page_script() -> str:
    """The page's ``explorer.js``: :func:`explorer_script` run on the document, with the
    catalogues (``window.ATTNKIT_I18N``) and, in an exported file, its views
    (``window.ATTNKIT_OFFLINE``)."""
    return explorer_script() + (
        "attnkitExplorer(document, { page: true, i18n: window.ATTNKIT_I18N, "
        "offline: window.ATTNKIT_OFFLINE || null });\n")


def markup() -> str:
    """The explorer's markup (header, views, tooltip) from ``index.html``."""
    text = asset("index.html").decode("utf-8")
    begin = text.index("-->", text.index("<!-- explorer:begin")) + 3
    return text[begin:text.index("<!-- explorer:end -->")].strip()


@functools.lru_cache(maxsize=None)
def _module_body() -> str:
    """The constants :file:`assets/widget.js` reads, the explorer, and ``widget.js``."""
    css = asset("style.css").decode("utf-8")
    words = {language: catalogue(language) for language in LANGUAGES}
    return (f"const ATTNKIT_I18N = {script_safe(words)};\n"
            f"const ATTNKIT_CSS = {script_safe(css)};\n"
            f"const ATTNKIT_MARKUP = {script_safe(markup())};\n"
            + explorer_script() + asset("widget.js").decode("utf-8"))


def widget_module() -> str:
    """The anywidget ES module: :func:`explorer_script`, ``widget.js`` and its ``render``."""
    return _module_body() + "export default { render };\n"


def static_html(options: dict) -> str:
    """A widget as self-contained HTML, drawn by the same code without a kernel: for a
    notebook exported to HTML, or a front end without widgets.

    Args:
        options: ``attnkitExplorer``'s options (``lang``, ``views``, ``view``, ``initial``,
            ``params``), JSON-able.
    """
    node = f"attnkit-{secrets.token_hex(6)}"
    code = _module_body().replace("</script", "<\\/script")
    return (f'<div id="{html.escape(node)}" class="attnkit-static"></div>\n'
            f'<script type="module">\n{code}'
            f'mount(document.getElementById("{node}"), {script_safe(options)});\n</script>\n')
