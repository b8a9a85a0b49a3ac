"""The mask view's numbers: a mask description, its ``T x S`` pattern, the block plan the
engine makes of it, and ``explain()``'s answer.

:func:`build_mask` turns the page's choices into one description of :mod:`attnkit.masks`
(never a dense ``mask=``): ``causal`` (top-left or bottom-right alignment, or an explicit
offset), a sliding ``window`` (``left``/``right`` keys), ``prefix_lm``, ``chunked_local``,
``documents`` (packed sequences, from their lengths), combined with ``&`` or ``|``, and key
padding (always ``&``: a padded key is never visible).

Blocks: the view reads the engine's own :class:`attnkit.summary.BlockSummary`, built from the
description's interval arithmetic by the call object every backend receives
(:class:`attnkit.spec.Call`), at the granularity the ``chunked`` backend plans with
(``block_q`` query rows by ``min(chunked.FINE, block_k)`` keys): ``skipped`` (empty: never
computed), ``full`` (computed without a mask) or ``partial`` (computed and masked). A tile
planned partial whose cells are in fact all masked (the interval arithmetic could not prove it
empty) is shown as ``e``; the backend still computes it.

Shape letters: ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

import torch

from ... import explain, masks
from ...backends import chunked
from ...spec import Call, MaskSpec
from ...summary import EMPTY, FULL, PARTIAL
from .._i18n import LocalizedError

__all__ = ["MAX_LEN", "MAX_CELLS_SHOWN", "KINDS", "build_mask", "mask_view"]

MAX_LEN = 4096
MAX_CELLS_SHOWN = 256 * 256  # larger patterns are drawn from the block map only
KINDS = ("causal", "window", "prefix_lm", "chunked_local", "documents", "padding")
_HEAD_DIM = 8


def _int(params: dict, name: str, default, low: int, high: int, *, blank=False):
    """An int in ``[low, high]`` (``""``/None give ``default`` when ``blank``)."""
    value = params.get(name, default)
    if blank and value in ("", None):
        return default
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise LocalizedError("error.mask_int", name=name, low=low, high=high, value=repr(value))
    return value


def _lengths(text, S: int) -> list[int]:
    """Document lengths from ``"3,5,4"`` (or a list); they must add up to ``S``."""
    parts = text if isinstance(text, list) else str(text).replace(" ", "").split(",")
    try:
        lengths = [int(p) for p in parts if p != ""]
    except (TypeError, ValueError):
        raise LocalizedError("error.docs_format", text=repr(text)) from None
    if not lengths or min(lengths) < 1 or sum(lengths) != S:
        raise LocalizedError("error.docs_sum", S=S, lengths=lengths, total=sum(lengths))
    return lengths


def _terms(params: dict, T: int, S: int, align: str) -> list[tuple[object, str]]:
    """The chosen kinds as ``(description, the code that builds it)``, in a fixed order."""
    terms, a = [], "" if align == "top_left" else f'align="{align}"'
    if params.get("causal"):
        offset = _int(params, "causal_offset", None, -MAX_LEN, MAX_LEN, blank=True)
        arg = a if offset is None else f"offset={offset}"
        terms.append((masks.causal(align=align, offset=offset), f"masks.causal({arg})"))
    window = _int(params, "window", 0, 0, MAX_LEN)  # keys per query, itself included
    # masks.sliding_window's defaults when absent (left unbounded, right 0); "" = unbounded.
    left = _int(params, "window_left", None, 0, MAX_LEN, blank=True)
    right = _int(params, "window_right", 0, 0, MAX_LEN) if params.get("window_right") != "" \
        else None
    if window:
        left, right = window - 1, 0
    if window or params.get("window_on"):
        args = ", ".join(x for x in (f"left={left}", f"right={right}", a) if x)
        terms.append((masks.sliding_window(left, right, align=align),
                      f"masks.sliding_window({args})"))
    prefix = _int(params, "prefix", 0, 0, S)
    if prefix:
        terms.append((masks.prefix_lm(prefix, align=align),
                      f"masks.prefix_lm({', '.join(x for x in (str(prefix), a) if x)})"))
    chunk = _int(params, "chunk", 0, 0, MAX_LEN)
    if chunk:
        terms.append((masks.chunked_local(chunk, causal=False, align=align),
                      f"masks.chunked_local({', '.join(x for x in (str(chunk), a) if x)}, "
                      f"causal=False)"))
    documents = params.get("documents") or ""
    if documents:
        if T != S:
            raise LocalizedError("error.docs_square", T=T, S=S)
        lengths = _lengths(documents, S)
        cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
        terms.append((masks.documents(cu_seqlens=cu, causal=False),
                      f"masks.documents(cu_seqlens={cu}, causal=False)"))
    return terms


def build_mask(params: dict) -> tuple[int, int, object, str]:
    """Turn the page's mask choices into ``(T, S, description or None, its code)``.

    Args:
        params: ``T``, ``S`` (1 to :data:`MAX_LEN`); ``align`` (``"top_left"`` or
            ``"bottom_right"``, for every kind); ``causal`` (bool) with ``causal_offset``
            (blank: from ``align``); ``window`` (keys per query, itself included; 0 = none)
            or ``window_on`` with ``window_left``/``window_right`` (default unbounded and 0,
            as :func:`attnkit.masks.sliding_window`; ``""`` = unbounded);
            ``prefix`` (prefix-LM: keys every query sees; 0 = none); ``chunk`` (chunked-local
            chunk size; 0 = none); ``documents`` (``"4,8,4"``: lengths adding up to ``S``,
            needs ``T == S``); ``combine`` (``"and"`` or ``"or"``: how the kinds above
            combine); ``valid_keys`` (keys after it are padding, always ANDed; 0 = none).

    Raises:
        TypeError: ``params`` is not a dict.
        ValueError: a value outside its range, documents that do not tile ``S``, or an
            unknown ``combine``.
    """
    if not isinstance(params, dict):
        raise TypeError(f"the mask request must be a JSON object, got {type(params).__name__}")
    T = _int(params, "T", 16, 1, MAX_LEN)
    S = _int(params, "S", T, 1, MAX_LEN)
    align = params.get("align", "top_left")
    if align not in ("top_left", "bottom_right"):
        raise LocalizedError("error.mask_align", value=repr(align))
    combine = params.get("combine", "and")
    if combine not in ("and", "or"):
        raise LocalizedError("error.mask_combine", value=repr(combine))
    terms = _terms(params, T, S, align)
    op = " & " if combine == "and" else " | "
    mod = None
    if terms:
        mod = terms[0][0] if len(terms) == 1 else \
            (masks.and_masks if combine == "and" else masks.or_masks)(*(t for t, _ in terms))
    code = op.join(c for _, c in terms)
    valid = _int(params, "valid_keys", 0, 0, S)
    if valid:
        padding = masks.key_padding(torch.arange(S).unsqueeze(0) < valid)  # (1, S)
        pad_code = f"masks.key_padding(torch.arange({S})[None] < {valid})"
        mod = padding if mod is None else masks.and_masks(mod, padding)
        code = pad_code if not code else \
            f"({code}) & {pad_code}" if len(terms) > 1 else f"{code} & {pad_code}"
    return T, S, mod, code


def _cells(grid: torch.Tensor, block_q: int, block_k: int) -> tuple:
    """Per tile of ``grid (T, S)``: ``(any visible, any masked)``, each ``(nQ, nK)``."""
    T, S = grid.shape
    nq, nk = -(-T // block_q), -(-S // block_k)
    padded = torch.zeros(nq * block_q, nk * block_k, dtype=torch.int8)
    padded[:T, :S] = grid.to(torch.int8) + 1  # 0 outside the matrix, 1 masked, 2 visible
    cells = padded.view(nq, block_q, nk, block_k).transpose(1, 2)  # (nQ, nK, bq, bk)
    return (cells == 2).any(-1).any(-1), (cells == 1).any(-1).any(-1)


def mask_view(params: dict) -> dict:
    """The pattern, the engine's block plan and the backend choice for one set of choices.

    Args:
        params: as :func:`build_mask`, plus ``block_q``/``block_k`` (the ``chunked``
            backend's tile sizes; default its own ``BLOCK_Q``/``BLOCK_K``).

    Returns:
        ``{"T", "S", "pattern" (rows of "1"/"0", or None when larger than
        :data:`MAX_CELLS_SHOWN`), "blocks" (rows of "s"kipped / "f"ull / "p"artial / "e"
        (planned partial, all masked), at ``block_q x tile_k``), "block_q", "block_k",
        "tile_k", "counts" ({"empty", "partial", "full"}, the summary's own),
        "visited_fraction", "key_blocks" and "masked_key_blocks" (the key blocks chunked
        computes, and how many of them build a mask), "visible" (cells that may attend),
        "describe" (the lowered description), "explain": {"chosen", "reason", "rejected"},
        "arguments" (the attention() call, as code)}``.

    Raises:
        TypeError, ValueError: as :func:`build_mask`, or block sizes out of range.
    """
    T, S, mod, code = build_mask(params)
    block_q = _int(params, "block_q", chunked.BLOCK_Q, 1, MAX_LEN)
    block_k = _int(params, "block_k", chunked.BLOCK_K, 1, MAX_LEN)
    tile_k = min(chunked.FINE, block_k)  # the granularity of chunked's plan
    q, k = torch.zeros(1, 1, T, _HEAD_DIM), torch.zeros(1, 1, S, _HEAD_DIM)
    spec = MaskSpec(mask_mod=mod)
    call = Call.of(q, k, spec, False)  # what every backend receives
    summary = call.summary(block_q, tile_k)
    plan = summary.tiles(max_block=block_k)  # chunked's own walk over the summary
    dense = spec.dense(T, S)
    grid = torch.ones(T, S, dtype=torch.bool) if dense is None else \
        dense.expand(1, 1, T, S)[0, 0]  # (T, S)
    visible, _ = _cells(grid, block_q, tile_k)
    code_of = {EMPTY: "s", PARTIAL: "p", FULL: "f"}
    blocks = ["".join("e" if c == PARTIAL and not bool(visible[i, j]) else code_of[c]
                      for j, c in enumerate(row))
              for i, row in enumerate(summary.kind.tolist())]
    why = explain(q, k, k, mask_mod=mod)
    key_blocks = [run for _, _, runs in plan for run in runs]
    return {"T": T, "S": S, "block_q": block_q, "block_k": block_k, "tile_k": tile_k,
            "pattern": ["".join("1" if c else "0" for c in row) for row in grid.tolist()]
            if T * S <= MAX_CELLS_SHOWN else None,
            "blocks": blocks, "counts": summary.counts(),
            "visited_fraction": round(summary.visited_fraction(), 6),
            "key_blocks": len(key_blocks),
            "masked_key_blocks": sum(1 for _, _, partial in key_blocks if partial),
            "visible": int(grid.sum()),
            "describe": "no mask: every key visible" if call.mask is None else
            call.mask.describe(),
            "explain": {"chosen": why.chosen, "reason": why.reason, "rejected": why.rejected},
            "arguments": f"attnkit.attention(q, k, v{', mask_mod=' + code if code else ''})"}
