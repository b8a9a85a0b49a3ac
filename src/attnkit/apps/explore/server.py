"""The explorer's local web server and its self-contained HTML export.

One page (``index.html``, ``style.css`` and ``explorer.js``, the scripts of ``assets/`` as one
function: :mod:`.scripts`) and a small JSON API that computes every view with torch on the
server:

====================  =================================================================
``GET /``             the page, with the catalogues of :mod:`attnkit.apps._i18n` inlined
``GET /explorer.js``  the allow-listed assets (:data:`ASSETS`); nothing else is served
``POST /api/tutorial``  ``{"sentence"}`` -> :func:`~.tutorial_view.tutorial_view`
``POST /api/mask``      mask choices -> :func:`~.mask_view.mask_view`
``POST /api/translate`` ``{"text"}`` -> :func:`~.model_view.translate_view`
``POST /api/gpt``       ``{"prompt"}`` -> :func:`~.model_view.gpt_view`
====================  =================================================================

Errors are JSON ``{"error": message}``: 400 for bad JSON, bad input or a request over a cost
cap (:mod:`.guard`), 403 for a foreign ``Host:`` or a ``POST`` from a foreign ``Origin:``
(:mod:`.guard`; the reason is one line, also kept in ``server.refusals``), 404 for an
unknown path or a missing checkpoint, 413 for a body over :data:`MAX_BODY`, 500 (logged)
for a bug. Messages about the input (400, 404 for a missing model) are in the page's language,
sent as ``X-Attnkit-Language`` (:mod:`attnkit.apps._i18n`); the others are English.
URL paths are looked up in :data:`ASSETS` by exact name, never joined to a file-system path,
so no request can reach a file outside the assets. The server binds 127.0.0.1 only.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..checkpoint import atomic_write
from .._i18n import LANGUAGES, catalogue, localized
from .guard import cost_refusal, host_refusal, origin_refusal
from .mask_view import mask_view
from .model_view import ModelMissing, Models, gpt_view, translate_view
from .scripts import asset, script_safe
from .tutorial_view import tutorial_view

__all__ = ["HOST", "SCRIPTS", "ASSETS", "MAX_BODY", "DEFAULTS", "ExploreServer",
           "make_server", "serve_in_thread", "export_html", "asset", "page"]

SCRIPTS = ("explorer.js",)  # the page's script (scripts.page_script)
HOST = "127.0.0.1"  # never any other address: the explorer is for the person at this machine
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          **{f"/{name}": (name, "text/javascript; charset=utf-8") for name in SCRIPTS},
          "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_BODY = 64 * 1024
DEFAULTS = {"tutorial": {}, "mask": {"T": 16, "S": 16, "causal": True, "block_q": 4,
                                     "block_k": 4},
            "translate": {"text": "thursday june 25 2009"},
            "gpt": {"prompt": "def attention(query, key, value):\n    return "}}


def page() -> str:
    """``index.html`` with every language's catalogue inlined (``window.ATTNKIT_I18N``), so
    the page's words come from the same files as the walkthrough's."""
    words = script_safe({language: catalogue(language) for language in LANGUAGES})
    first = f'<script src="{SCRIPTS[0]}"></script>'
    return asset("index.html").decode("utf-8").replace(
        first, f"<script>window.ATTNKIT_I18N = {words};</script>\n{first}")


class _Handler(BaseHTTPRequestHandler):
    server_version = "attnkit-explore"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode("utf-8"),
                   "application/json")

    def _refuse(self, status: int, reason: str) -> None:
        self.server.refusals.append((status, self.command, self.path[:200], reason))
        if self.server.verbose:
            self.log_message("%s", reason)
        self.close_connection = True  # an unread body must not be taken for a request
        self._json(status, {"error": reason})

    def _foreign_host(self) -> bool:
        """Refuse (403) a request whose Host is not this server's; True when refused."""
        reason = host_refusal(self.headers.get("Host"), self.server.server_address[1])
        if reason:
            self._refuse(403, reason)
        return reason is not None

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self._foreign_host():
            return
        path = self.path.split("?", 1)[0]
        if path not in ASSETS:
            self._json(404, {"error": f"not found: {path[:200]!r}; this server serves only "
                                      f"{sorted(ASSETS)} and POST /api/..."})
            return
        name, content_type = ASSETS[path]
        body = page().encode("utf-8") if name == "index.html" else asset(name)
        self._send(200, body, content_type)

    do_HEAD = do_GET

    def do_OPTIONS(self):  # noqa: N802 - a CORS preflight: no other page may call the API
        if not self._foreign_host():
            self._refuse(403, "refused: the explorer answers no cross-origin (CORS) requests; "
                              "only its own page may call its API")

    def do_POST(self):  # noqa: N802
        if self._foreign_host():
            return
        reason = origin_refusal(self.headers.get("Origin"), self.server.server_address[1])
        if reason:
            self._refuse(403, reason)
            return
        view = self.server.views.get(self.path)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body, if any, is not read
            self._json(413 if length > MAX_BODY else 400,
                       {"error": f"a POST needs a Content-Length between 0 and {MAX_BODY}"})
            return
        raw = self.rfile.read(length)
        if view is None:
            self._json(404, {"error": f"no such API: {self.path[:200]!r}; use one of "
                                      f"{sorted(self.server.views)}"})
            return
        try:
            params = json.loads(raw.decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self._json(400, {"error": f"the request body is not valid JSON: {err}"})
            return
        if not isinstance(params, dict):
            self._json(400, {"error": "the request body must be a JSON object"})
            return
        language = self.headers.get("X-Attnkit-Language", "en")  # the page's language
        reason = cost_refusal(self.path, params, language)
        if reason:
            self._refuse(400, reason)
            return
        try:
            self._json(200, view(params))
        except (ValueError, TypeError) as err:
            self._json(400, {"error": localized(err, language)})
        except ModelMissing as err:
            self._json(404, {"error": localized(err, language)})
        except Exception as err:  # a bug: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error ({type(err).__name__}); see the "
                                      "server's log"})


class ExploreServer(ThreadingHTTPServer):
    """A threading HTTP server bound to 127.0.0.1 with the explorer's views.

    Args:
        port: TCP port; 0 picks a free one (read it back from ``server_address``).
        models: where the trained models live.
        verbose: log every request on stderr.

    Attributes:
        refusals: the last 100 refused requests as ``(status, method, path, reason)``.
    """

    daemon_threads = True
    request_queue_size = 128  # bursts of concurrent connections wait instead of failing

    def __init__(self, port: int = 0, models: Models | None = None, verbose: bool = False):
        self.models, self.verbose = models or Models(), verbose
        self.refusals = collections.deque(maxlen=100)
        self.views = {
            "/api/tutorial": lambda p: tutorial_view(p.get("sentence", _default_sentence())),
            "/api/mask": mask_view,
            "/api/translate": lambda p: translate_view(self.models, p.get("text", "")),
            "/api/gpt": lambda p: gpt_view(self.models, p.get("prompt", "")),
        }
        super().__init__((HOST, port), _Handler)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/``."""
        return f"http://{HOST}:{self.server_address[1]}/"


def _default_sentence() -> str:
    from ..walkthrough import SENTENCE
    return SENTENCE


def make_server(port: int = 0, **kwargs) -> ExploreServer:
    """An :class:`ExploreServer` on 127.0.0.1:``port`` (not yet serving).

    Raises:
        ValueError: ``port`` is not an int in [0, 65535].
        OSError: the port is taken.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
    return ExploreServer(port, **kwargs)


def serve_in_thread(server: ExploreServer) -> threading.Thread:
    """Start ``server.serve_forever`` in a daemon thread (stop with ``server.shutdown()``)."""
    thread = threading.Thread(target=server.serve_forever, name="attnkit-explore", daemon=True)
    thread.start()
    return thread


def export_html(path, models: Models | None = None) -> dict:
    """Write the page as one self-contained HTML file with the default inputs' views.

    The CSS and JavaScript are inlined and the views of the default inputs are embedded as
    JSON, so the file opens offline (no server, no network). A view whose model is missing
    is embedded as its error message.

    Args:
        path: the HTML file to write (atomically; its directory must exist).
        models: where the trained models are (default: the apps' own output folders).

    Returns:
        ``{view name: None or the error message}`` for the embedded views.
    """
    models = models or Models()
    views = {"tutorial": lambda: tutorial_view(_default_sentence()),
             "mask": lambda: mask_view(DEFAULTS["mask"]),
             "translate": lambda: translate_view(models, DEFAULTS["translate"]["text"]),
             "gpt": lambda: gpt_view(models, DEFAULTS["gpt"]["prompt"])}
    embedded, problems = {}, {}
    for name, compute in views.items():
        try:
            embedded[name] = compute()
            problems[name] = None
        except (ValueError, TypeError, ModelMissing) as err:
            embedded[name] = {"error": str(err),  # and in every language, for the page
                              "errors": {lang: localized(err, lang) for lang in LANGUAGES}}
            problems[name] = str(err)
    html = page()
    css = asset("style.css").decode("utf-8")
    html = html.replace('<link rel="stylesheet" href="style.css">', f"<style>\n{css}</style>")
    js = asset(SCRIPTS[0]).decode("utf-8").replace("</script", "<\\/script")
    data = f"<script>window.ATTNKIT_OFFLINE = {script_safe(embedded)};</script>\n"
    html = html.replace(f'<script src="{SCRIPTS[0]}"></script>', f"{data}<script>\n{js}</script>")
    atomic_write(path, lambda handle: handle.write(html.encode("utf-8")))
    return problems
