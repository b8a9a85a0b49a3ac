"""Attention masks, described rather than materialised.

A mask here is a small frozen *description* (True = "may attend"), a mask function in the
FlexAttention sense, ``mod(b, h, q_idx, kv_idx) -> bool``, that every backend turns into its
cheapest form:

* ``math`` evaluates it on broadcast index grids (:meth:`MaskMod.grid`);
* ``chunked`` asks it, for whole blocks at once, whether a block is empty, full or partial
  (:meth:`MaskMod.blocks`, interval arithmetic, never a ``T x S`` tensor) and evaluates it
  only on the partial blocks (:meth:`MaskMod.tile`);
* ``flex`` hands it to ``create_block_mask`` as is (``mod(b, h, q, kv)``);
* ``sdpa`` gets ``is_causal`` when that is exact, else the dense grid.

Named kinds compose with ``&`` and ``|`` (or :func:`and_masks` / :func:`or_masks`) and keep
:meth:`MaskMod.describe` readable::

    documents(ids) & window(left=127)     ->  "same_document(B=1) & causal & window(left=127)"

A plain callable ``fn(b, h, q_idx, kv_idx)`` written with tensor ops works too
(:class:`MaskFn`), and is read rather than only evaluated (:mod:`attnkit.masks.traced`):
``q >= kv`` runs as :class:`Causal`, ``doc[q] == doc[kv]`` as :class:`SameDocument`, and
anything else gets block summaries from a sound interval evaluator of its traced program.

Polarity everywhere: ``True`` means "may attend". (``torch.nn.MultiheadAttention`` uses the
opposite for its bool masks.) :class:`MaskSpec`, the engine's whole description of a call
(mask plus score functions), lives in :mod:`attnkit.spec` and is re-exported here.

Shape letters: ``B`` batch, ``H`` heads, ``T`` queries, ``S`` keys. Index tensors: ``b (B, 1,
1, 1)``, ``h (1, H, 1, 1)``, ``q_idx (1, 1, T, 1)``, ``kv_idx (1, 1, 1, S)`` (or scalars under
``vmap`` in flex). Block bounds: ``q_lo, q_hi (nQ, 1)``, ``k_lo, k_hi (1, nK)``, inclusive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (ALIGNMENTS, And, MaskFn, MaskMod, Or, Shift, as_mask_mod, check_align,
                   offset_of)
from .data import Dense, KeyPadding, QueryPadding, SameDocument
from .dilated import Dilated
from .per_sample_chunks import PerSampleChunks
from .simplify import depends_on_difference_only, merge_and, visible_key_bound
from .structural import Causal, ChunkedLocal, KeyPrefix, Window
from .varlen import Varlen

__all__ = [
    "ALIGNMENTS", "MaskMod", "MaskFn", "Causal", "Window", "KeyPadding", "QueryPadding",
    "SameDocument", "KeyPrefix", "ChunkedLocal", "Dense", "Varlen", "And", "Or", "Shift",
    "Dilated", "and_masks", "or_masks", "causal", "sliding_window", "key_padding",
    "query_padding", "documents", "varlen", "prefix_lm", "chunked_local", "dilated",
    "at_positions", "as_mask_mod",
    "MaskSpec", "causal_mask", "sliding_window_mask", "padding_mask_from_lengths",
    "combine_masks", "PerSampleChunks", "merge_and", "visible_key_bound",
    "depends_on_difference_only",
]



def __getattr__(name):
    # MaskSpec lives in attnkit.spec, which imports this package: re-exported lazily.
    if name == "MaskSpec":
        from ..spec import MaskSpec
        return MaskSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- named constructors ---------------------------------------------------------------------

def and_masks(*mods) -> MaskMod:
    """A key is visible iff every description allows it (callables are wrapped)."""
    return And(tuple(as_mask_mod(m) for m in mods))


def or_masks(*mods) -> MaskMod:
    """A key is visible iff some description allows it."""
    return Or(tuple(as_mask_mod(m) for m in mods))


def causal(*, align: str = "top_left", offset: int | None = None) -> Causal:
    """Query ``i`` sees key ``j`` iff ``j <= i + offset``.

    ``offset`` defaults from ``align``: 0 top-left, ``S - T`` bottom-right (the T queries
    are the last T of the S keys). Give an explicit ``offset`` for a static cache whose fill
    is not the last position. See :func:`causal_mask` for pictures.
    """
    return Causal(align=align, offset=offset)


def sliding_window(left: int | None = None, right: int | None = 0, *, align: str = "top_left",
                   offset: int | None = None) -> Window:
    """Query at position ``p`` sees keys ``p - left .. p + right`` (``None`` = unbounded).

    ``right=0`` is causal local attention (``left = window - 1``); ``left = right = w`` is
    the two-sided window of local-attention encoders::

        T=S=5, left=1, right=1   k0 k1 k2 k3 k4
                        q0        1  1  .  .  .
                        q2        .  1  1  1  .
    """
    return Window(left=left, right=right, align=align, offset=offset)


def key_padding(mask: Tensor) -> KeyPadding:
    """``(B, S)`` bool, True = real key."""
    return KeyPadding(mask)


def query_padding(mask: Tensor) -> QueryPadding:
    """``(B, T)`` bool, True = real query; padded queries see nothing (their rows are 0)."""
    return QueryPadding(mask)


def documents(document_ids: Tensor | None = None, *, cu_seqlens=None, length: int | None = None,
              kv_document_ids: Tensor | None = None, causal: bool = True) -> MaskMod:
    """Packed sequences: a query sees only keys of its own document (and, if ``causal``,
    not later ones)::

        ids = [0, 0, 1, 1, 1]    k0 k1 k2 k3 k4
                        q1        1  1  .  .  .
                        q3        .  .  1  1  .

    Args:
        document_ids: ``(B, T)`` integer document of every position (sorted ids let chunked
            skip blocks; unsorted ones are still exact, only slower).
        cu_seqlens: instead of ids, cumulative lengths ``[0, l1, l1+l2, ..., T]`` (one packed
            row, flash-attn's varlen convention); ``length`` defaults to its last entry.
        kv_document_ids: ``(B, S)`` ids of the keys when they differ from the queries'.
        causal: also hide later positions (top-left; shift with :func:`at_positions`).

    Raises:
        ValueError: neither or both of ``document_ids`` and ``cu_seqlens``; ``cu_seqlens``
            not starting at 0 or decreasing.
    """
    if (document_ids is None) == (cu_seqlens is None):
        raise ValueError("documents needs exactly one of document_ids (B, T) or cu_seqlens "
                         f"[0, l1, l1+l2, ...]; got document_ids={type(document_ids).__name__}"
                         f", cu_seqlens={type(cu_seqlens).__name__}")
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu.diff() < 0).any()):
            raise ValueError(f"cu_seqlens must be a 1-D non-decreasing sequence starting at 0, "
                             f"got {cu.tolist()}")
        length = int(cu[-1]) if length is None else length
        pos = torch.arange(length, device=cu.device)
        document_ids = (torch.searchsorted(cu[1:], pos, right=True)).unsqueeze(0)  # (1, T)
    same = SameDocument(document_ids, kv_document_ids,
                        None if cu_seqlens is None else tuple(cu.tolist()))
    return And((same, Causal())) if causal else same


def varlen(cu_seqlens_q, cu_seqlens_k=None, *, causal: bool = True,
           window: tuple | None = None) -> Varlen:
    """Packed sequences in flash-attn's varlen convention, causal aligned bottom-right per
    sequence (its queries are the last of its keys: decoding over a cache works)::

        cu_q = [0, 1, 3], cu_k = [0, 3, 5]    k0 k1 k2 k3 k4
                              q0 (seq 0)       1  1  1  .  .
                              q2 (seq 1)       .  .  .  1  1

    Args:
        cu_seqlens_q: ``(N + 1,)`` cumulative query lengths ``[0, l1, l1+l2, ..., total_q]``.
        cu_seqlens_k: the same for keys; defaults to ``cu_seqlens_q``.
        causal: no key after the query's own position (``right = 0``).
        window: ``(left, right)`` keys visible on each side of the query's position;
            ``None`` or ``-1`` on a side = unbounded (flash-attn's ``window_size``).

    Raises:
        TypeError: non-integer ``cu_seqlens``.
        ValueError: ``cu_seqlens`` not 1-D, not starting at 0 or decreasing; different
            numbers of sequences; a window that is not two ints >= -1.
    """
    left, right = _window_pair(window)
    if causal:
        right = 0 if right is None else min(right, 0)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    return Varlen(cu_seqlens_q, cu_k, left=left, right=right)


def _window_pair(window):
    """flash-attn's ``(left, right)`` with -1 for unbounded -> ``(left|None, right|None)``."""
    if window is None:
        return None, None
    ok = isinstance(window, (tuple, list)) and len(window) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    if not ok:
        raise ValueError(f"window must be (left, right), two ints >= 0 or -1 (unbounded), "
                         f"got {window!r}")
    return tuple(None if w == -1 else w for w in window)


def prefix_lm(prefix_length, *, align: str = "top_left") -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix_length`` keys, the rest causally::

        T=S=5, prefix=2   k0 k1 k2 k3 k4
                   q0      1  1  .  .  .
                   q3      1  1  1  1  .

    ``prefix_length`` is an int or a ``(B,)`` tensor (one prefix per sample).
    """
    return Or((KeyPrefix(prefix_length), Causal(align=align)))


def chunked_local(chunk_size: int, *, causal: bool = True, align: str = "top_left") -> MaskMod:
    """Fixed attention chunks (Llama-4 style): query and key must share a chunk of
    ``chunk_size`` positions; with ``causal`` also no later key::

        T=S=5, chunk=2   k0 k1 k2 k3 k4
                  q1      1  1  .  .  .
                  q2      .  .  1  .  .
    """
    local = ChunkedLocal(chunk_size, align=align)
    return And((local, Causal(align=align))) if causal else local


def dilated(stride: int, *, window: int | None = None, causal: bool = True,
            align: str = "top_left") -> MaskMod:
    """Dilated attention: every ``stride``-th key back from the query's own position,
    within ``window`` positions if given (a dilated sliding window), not later ones if
    ``causal``::

        T=S=5, stride=2   k0 k1 k2 k3 k4
                   q2      1  .  1  .  .
                   q3      .  1  .  1  .
    """
    parts = [Dilated(stride, align=align)]
    if window is not None:
        parts.append(Window(left=window, right=None if causal else window, align=align))
    if causal:
        parts.append(Causal(align=align))
    return parts[0] if len(parts) == 1 else And(tuple(parts))


def at_positions(mod, q_offset: int = 0, kv_offset: int = 0) -> MaskMod:
    """Evaluate ``mod`` at global positions: local query ``i`` is position ``i + q_offset``,
    local key ``j`` is ``j + kv_offset``. Ring attention and cached decoding use this so a
    description written for the whole sequence (documents, prefix-LM) holds on each piece.
    """
    return Shift(as_mask_mod(mod), int(q_offset), int(kv_offset))


# --- dense builders (tests, peers that need a tensor) ---------------------------------------

def causal_mask(T: int, S: int | None = None, *, align: str = "top_left", device=None) -> Tensor:
    """Bool ``(T, S)`` mask where query ``i`` sees key ``j`` iff ``j <= i + offset``.

    ``top_left`` (offset 0): queries and keys start together (training, prefill)::

        T=3, S=5     k0 k1 k2 k3 k4
              q0      1  .  .  .  .
              q1      1  1  .  .  .
              q2      1  1  1  .  .

    ``bottom_right`` (offset S - T): the T queries are the *last* T of the S positions
    (decoding with a KV cache, chunked prefill)::

        T=3, S=5     k0 k1 k2 k3 k4
              q0      1  1  1  .  .
              q1      1  1  1  1  .
              q2      1  1  1  1  1

    Raises:
        ValueError: unknown ``align``.
    """
    check_align(align)
    S = T if S is None else S
    q_pos = torch.arange(T, device=device).unsqueeze(1) + offset_of(T, S, align)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    return k_pos <= q_pos


def sliding_window_mask(
    T: int, S: int | None = None, window: int = 1, *, align: str = "top_left", device=None
) -> Tensor:
    """Causal mask that also hides keys more than ``window - 1`` positions back.

    Each query sees at most ``window`` keys, itself included::

        T=S=5, window=2   k0 k1 k2 k3 k4
                   q0      1  .  .  .  .
                   q1      1  1  .  .  .
                   q2      .  1  1  .  .
                   q3      .  .  1  1  .
                   q4      .  .  .  1  1

    Raises:
        ValueError: ``window < 1`` or unknown ``align``.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (keys per query, itself included), "
                         f"got {window!r}")
    S = T if S is None else S
    q_pos = torch.arange(T, device=device).unsqueeze(1) + offset_of(T, S, align)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    return causal_mask(T, S, align=align, device=device) & (k_pos > q_pos - window)


def padding_mask_from_lengths(lengths: Tensor, S: int | None = None) -> Tensor:
    """``(B, S)`` key padding mask, True for the first ``lengths[b]`` keys of each sample::

        lengths = [3, 1], S = 4  ->  [[1, 1, 1, 0],
                                      [1, 0, 0, 0]]
    """
    lengths = torch.as_tensor(lengths)
    S = int(lengths.max()) if S is None else S
    return torch.arange(S, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of broadcastable bool masks, skipping ``None``; ``None`` if all are."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out

