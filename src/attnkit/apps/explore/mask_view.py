"""The mask view's numbers: a ``T x S`` pattern, its blocks, and ``explain()``'s answer.

All mask logic lives in :func:`build_mask`, which turns the page's choices into the keyword
arguments of :func:`attnkit.attention` (``causal``, ``causal_align``, ``window``,
``key_padding_mask``, ``mask``). Documents are a dense block-diagonal ``mask=`` because the
engine has no document description yet; when :mod:`attnkit.masks` gains one, only that
function changes.

Blocks: the ``chunked`` backend walks queries in tiles of ``block_q`` rows and keys in blocks
of ``block_k`` and never computes a block its causal/window geometry rules out
(:mod:`attnkit.backends.chunked`). Each block is classed as ``skipped`` (never computed),
``empty`` (computed although every cell is masked: padding or documents, which the backend
applies cell by cell), ``partial`` or ``full``.

Shape letters: ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import explain
from ...backends import chunked
from ...spec import Call, MaskSpec

__all__ = ["MAX_LEN", "MAX_CELLS_SHOWN", "KINDS", "build_mask", "mask_view"]

MAX_LEN = 4096
MAX_CELLS_SHOWN = 256 * 256  # larger patterns are drawn from the block map only
KINDS = ("causal", "window", "padding", "documents")
_HEAD_DIM = 8


def _int(params: dict, name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _lengths(text, S: int) -> list[int]:
    """Document lengths from ``"3,5,4"`` (or a list); they must add up to ``S``."""
    parts = text if isinstance(text, list) else str(text).replace(" ", "").split(",")
    try:
        lengths = [int(p) for p in parts if p != ""]
    except (TypeError, ValueError):
        raise ValueError(f"documents must be lengths separated by commas, e.g. '4,8,4', "
                         f"got {text!r}") from None
    if not lengths or min(lengths) < 1 or sum(lengths) != S:
        raise ValueError(f"document lengths must be positive and add up to S={S}, got "
                         f"{lengths} (sum {sum(lengths)})")
    return lengths


def build_mask(params: dict) -> tuple[int, int, dict]:
    """Turn the page's mask choices into ``(T, S, attention keyword arguments)``.

    Args:
        params: ``T``, ``S`` (1 to :data:`MAX_LEN`), ``causal`` (bool), ``align``
            (``"top_left"``/``"bottom_right"``), ``window`` (0 = none), ``valid_keys``
            (keys after it are padding; 0 = no padding), ``documents`` (``"4,8,4"``: lengths
            adding up to ``S``; needs ``T == S``).

    Raises:
        TypeError: ``params`` is not a dict.
        ValueError: a value outside its range, or documents that do not tile ``S``.
    """
    if not isinstance(params, dict):
        raise TypeError(f"the mask request must be a JSON object, got {type(params).__name__}")
    T = _int(params, "T", 16, 1, MAX_LEN)
    S = _int(params, "S", T, 1, MAX_LEN)
    align = params.get("align", "top_left")
    if align not in ("top_left", "bottom_right"):
        raise ValueError(f"align must be 'top_left' or 'bottom_right', got {align!r}")
    window = _int(params, "window", 0, 0, MAX_LEN) or None
    kwargs = {"causal": bool(params.get("causal", False)) or window is not None,
              "causal_align": align, "window": window}
    valid = _int(params, "valid_keys", 0, 0, S)
    if valid:
        kwargs["key_padding_mask"] = torch.arange(S).unsqueeze(0) < valid  # (1, S)
    documents = params.get("documents") or ""
    if documents:
        if T != S:
            raise ValueError(f"documents need T == S (self-attention), got T={T}, S={S}")
        lengths = _lengths(documents, S)
        doc_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (S,)
        kwargs["mask"] = (doc_id[:, None] == doc_id[None, :])[None, None]  # (1, 1, T, S)
    return T, S, kwargs


def _visited(T: int, S: int, kwargs: dict, block_q: int, block_k: int) -> Tensor:
    """``(nq, nk)`` bool: the blocks chunked attention computes (its own tile walk)."""
    q, k = torch.zeros(1, 1, T, 1), torch.zeros(1, 1, S, 1)
    spec = MaskSpec.from_args(**kwargs)
    nq, nk = -(-T // block_q), -(-S // block_k)
    visited = torch.zeros(nq, nk, dtype=torch.bool)
    for q0, _, blocks in chunked._Layout(q, k, Call.of(q, k, spec, False), block_q, block_k).tiles():
        for k0, k1, _ in blocks:
            # Tiles may start mid-block (a window's first key); mark every block touched.
            visited[q0 // block_q, k0 // block_k:(k1 - 1) // block_k + 1] = True
    return visited


def mask_view(params: dict) -> dict:
    """The pattern, block map and backend choice for one set of mask choices.

    Args:
        params: as :func:`build_mask`, plus ``block_q``/``block_k`` (block sizes; default
            chunked's own, ``BLOCK_Q``/``BLOCK_K``).

    Returns:
        ``{"T", "S", "pattern" (rows of "1"/"0", or None when larger than
        :data:`MAX_CELLS_SHOWN`), "blocks" (rows of "s"kipped/"e"mpty/"p"artial/"f"ull),
        "block_q", "block_k", "visible" (cells that may attend), "explain": {"chosen",
        "reason", "rejected"}, "arguments" (the attention() call, as text)}``.

    Raises:
        TypeError, ValueError: as :func:`build_mask`, or block sizes out of range.
    """
    T, S, kwargs = build_mask(params)
    block_q = _int(params, "block_q", chunked.BLOCK_Q, 1, MAX_LEN)
    block_k = _int(params, "block_k", chunked.BLOCK_K, 1, MAX_LEN)
    dense = MaskSpec.from_args(**kwargs).dense(T, S)
    grid = torch.ones(T, S, dtype=torch.bool) if dense is None else \
        dense.expand(1, 1, T, S)[0, 0]  # (T, S)
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = torch.zeros(nq * block_q, nk * block_k, dtype=torch.int8)
    padded[:T, :S] = grid.to(torch.int8) + 1  # 0 outside the matrix, 1 blocked, 2 may attend
    cells = padded.view(nq, block_q, nk, block_k).transpose(1, 2)  # (nq, nk, bq, bk)
    any_visible = (cells == 2).any(-1).any(-1)
    any_blocked = (cells == 1).any(-1).any(-1)
    visited = _visited(T, S, kwargs, block_q, block_k)
    codes = [["s" if not visited[i, j] else "e" if not any_visible[i, j] else
              "p" if any_blocked[i, j] else "f" for j in range(nk)] for i in range(nq)]
    D = _HEAD_DIM
    q, k = torch.zeros(1, 1, T, D), torch.zeros(1, 1, S, D)
    why = explain(q, k, k, **kwargs)
    shown = {name: value for name, value in kwargs.items()
             if value is not None and value is not False
             and not (name == "causal_align" and not kwargs["causal"])}
    described = ", ".join(f"{name}={_describe(value)}" for name, value in shown.items())
    return {"T": T, "S": S, "block_q": block_q, "block_k": block_k,
            "pattern": ["".join("1" if c else "0" for c in row) for row in grid.tolist()]
            if T * S <= MAX_CELLS_SHOWN else None,
            "blocks": ["".join(row) for row in codes], "visible": int(grid.sum()),
            "explain": {"chosen": why.chosen, "reason": why.reason, "rejected": why.rejected},
            "arguments": f"attnkit.attention(q, k, v{', ' if described else ''}{described})"}


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"<bool tensor {tuple(value.shape)}>"
    return repr(value)
