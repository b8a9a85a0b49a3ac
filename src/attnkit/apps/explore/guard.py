"""Who may drive the explorer, and how much one request may cost.

The explorer's API computes with torch on the person's machine, so only pages the explorer
served itself may call it (the checks Jupyter and TensorBoard make):

* :func:`host_refusal` - the ``Host:`` header must be ``127.0.0.1:PORT`` or
  ``localhost:PORT``. A page on another domain whose DNS name is re-pointed at 127.0.0.1
  (DNS rebinding) sends its own name, so it gets 403 instead of the API's answers.
* :func:`origin_refusal` - a ``POST`` whose ``Origin:`` header is present must come from the
  server's own origin. A page on any other site or port (including ``null``: a file or a
  sandboxed frame) gets 403 before anything is computed; a ``POST`` without ``Origin``
  (curl, scripts on this machine) is served.
* :func:`cost_refusal` - caps per request: mask cells and blocks, GPT prompt tokens; over a
  cap is a 400 that names the cap, before any tensor is built.

Each function returns None when the request may go on, else the one-line reason.
"""

from __future__ import annotations

from ...backends import chunked
from .._i18n import LANGUAGES, translator

__all__ = ["MAX_MASK_CELLS", "MAX_MASK_BLOCKS", "MAX_GPT_TOKENS", "allowed_hosts",
           "host_refusal", "origin_refusal", "cost_refusal"]

MAX_MASK_CELLS = 4096 * 4096  # the mask view's T * S
MAX_MASK_BLOCKS = 128 * 128  # the block map's tiles (block_q x min(block_k, chunked.FINE))
MAX_GPT_TOKENS = 512  # prompt characters (tokens) the GPT view runs, whatever its context


def allowed_hosts(port: int) -> tuple[str, str]:
    """The two ``Host:`` values the explorer on ``port`` answers."""
    return f"127.0.0.1:{port}", f"localhost:{port}"


def host_refusal(host: str | None, port: int) -> str | None:
    """Why a request with this ``Host:`` header is refused (None: it is allowed).

    Args:
        host: the header's value, or None when the request had none.
        port: the port the explorer listens on.
    """
    allowed = allowed_hosts(port)
    if host is not None and host.strip().lower() in allowed:
        return None
    shown = "no Host header" if host is None else f"Host {host[:100]!r}"
    return (f"refused: {shown}; the explorer answers only Host {allowed[0]} or {allowed[1]} "
            "(this protects it from DNS rebinding)")


def origin_refusal(origin: str | None, port: int) -> str | None:
    """Why a ``POST`` with this ``Origin:`` header is refused (None: it is allowed).

    Args:
        origin: the header's value, or None when the request had none.
        port: the port the explorer listens on.
    """
    if origin is None:
        return None
    own = tuple(f"http://{host}" for host in allowed_hosts(port))
    if origin.strip().lower() in own:
        return None
    return (f"refused: a POST from origin {origin[:100]!r}; the explorer's API answers only "
            f"its own page ({own[0]}/ or {own[1]}/)")


def _number(params: dict, name: str, default: int) -> int | None:
    value = params.get(name, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None  # the view itself names a bad value


def cost_refusal(view: str, params: dict, language: str = "en") -> str | None:
    """Why the ``view`` request ``params`` costs too much to compute (None: it may run).

    Only the sizes are checked here; malformed values are left to the view, which names them.

    Args:
        view: the API path, e.g. ``"/api/mask"``.
        params: the request's JSON object.
        language: the language of the reason (the page's; see :mod:`attnkit.apps._i18n`).
    """
    tr = translator(language if language in LANGUAGES else "en")
    if view == "/api/mask":
        T = _number(params, "T", 16)
        S = _number(params, "S", T or 16)
        if T is None or S is None:
            return None
        if T * S > MAX_MASK_CELLS:
            return tr("error.cost_cells", T=T, S=S, cells=T * S, limit=MAX_MASK_CELLS)
        block_q = _number(params, "block_q", chunked.BLOCK_Q)
        block_k = _number(params, "block_k", chunked.BLOCK_K)
        if block_q is None or block_k is None:
            return None
        tile_k = min(chunked.FINE, block_k)  # the block map's key granularity (mask_view)
        blocks = -(-T // block_q) * -(-S // tile_k)
        if blocks > MAX_MASK_BLOCKS:
            return tr("error.cost_blocks", T=T, S=S, block_q=block_q, tile_k=tile_k,
                      blocks=blocks, limit=MAX_MASK_BLOCKS, fine=chunked.FINE)
    if view == "/api/gpt":
        prompt = params.get("prompt", "")
        if isinstance(prompt, str) and len(prompt) > MAX_GPT_TOKENS:
            return tr("error.cost_prompt", length=len(prompt), limit=MAX_GPT_TOKENS)
    return None
