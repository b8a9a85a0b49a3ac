"""The mask reader: transformers' mask closures -> attnkit mask descriptions.

transformers calls the registered mask function (:func:`mask_interface`) where it would build
``sdpa``'s ``(B, 1, T, S)`` bool mask, with a ``mask_function`` closure made of its own pieces
(``causal_mask_function``, ``sliding_window_overlay``, ``chunked_overlay``,
``packed_sequence_mask_function``, ``and_masks``/``or_masks`` ...) plus the 2-D padding mask
and the cache's offsets. The reader finds which factory made each closure and what its cells
hold (every transformers name it relies on is in :mod:`.transformers_api`) and returns an
:class:`HFMask` holding an attnkit description in the call's local indices, the simplest one
that is exact:

* plain causal stays ``Causal(offset)`` (the attention adapter passes it as ``causal=True``);
* a window and causal merge into one ``Window`` (:func:`attnkit.masks.merge_and`);
* the 2-D padding mask is left out when every key a query can see is real (checked on the
  host in eager mode; while compiling it is kept, reading it would break the graph);
* a static cache's unfilled tail is cut off: :attr:`HFMask.keys` is how many leading keys
  can be visible (``q_offset + T`` for causal), and the description is for those keys only,
  so the adapter hands the engine views of the filled part; a decode step then has no mask.

A closure the reader does not know (a model's own ``or_mask_function``, block-wise image
masks) is evaluated densely by transformers' own ``sdpa_mask`` and counted in
:data:`dense_fallbacks`. So is a cache offset held in a tensor while compiling (a
``StaticCache`` under ``torch.compile``): reading it would break the graph, and a dense
``(B, 1, T, S)`` row is what ``sdpa`` gets there too (not counted: it is by design).

Shape letters: ``B`` batch, ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..masks import (Causal, ChunkedLocal, Dense, KeyPadding, MaskMod, Or, PerSampleChunks,
                     Window, at_positions, depends_on_difference_only, documents, merge_and,
                     visible_key_bound)
from . import transformers_api as _api

__all__ = ["HFMask", "describe_mask_function", "mask_interface", "dense_fallbacks"]

#: How many masks were built densely, by the reason the closure was not recognised.
dense_fallbacks: Counter = Counter()

_MU = "transformers.masking_utils"
_causal_mask_function = _api.get(f"{_MU}.causal_mask_function")
_bidirectional_mask_function = _api.get(f"{_MU}.bidirectional_mask_function")
_sdpa_mask = _api.get(f"{_MU}.sdpa_mask")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@dataclass(frozen=True, eq=False)
class HFMask:
    """What the mask function hands the attention function: a description, not a tensor.

    Attributes:
        mask_mod: an attnkit mask description in the call's local indices (query ``i``,
            key ``j``) for the first ``keys`` keys, or None: every one of them.
        batch_size: ``B``.
        q_length: ``T``.
        kv_length: ``S``, the length transformers' key/value tensors have.
        keys: how many leading keys can be visible (``<= S``); keys past it are hidden from
            every query (a static cache's unfilled tail), so the attention may read only
            ``key[:, :, :keys]``.
        dense: True when ``mask_mod`` wraps transformers' own dense ``sdpa_mask``.
        reason: for a dense mask, why (the piece that was not recognised).
    """

    mask_mod: MaskMod | None
    batch_size: int
    q_length: int
    kv_length: int
    keys: int | None = None
    dense: bool = False
    reason: str = ""

    # transformers reads ``ndim``/``shape`` of a mask it is handed back (generate builds the
    # masks of a static cache ahead of the forward); a 4-D shape marks it as ready.
    ndim = 4

    def __post_init__(self):
        if self.keys is None:
            object.__setattr__(self, "keys", self.kv_length)

    @property
    def shape(self) -> torch.Size:
        """``(B, 1, T, S)``, the shape of the mask this stands for."""
        return torch.Size((self.batch_size, 1, self.q_length, self.kv_length))

    def describe(self) -> str:
        """A readable name of the pattern (``"all"`` for no mask), with the visible keys
        when they are fewer than ``S``."""
        name = "all" if self.mask_mod is None else self.mask_mod.describe()
        return name if self.keys == self.kv_length else f"{name} on keys[:{self.keys}]"

    def to_dense(self, device=None) -> Tensor:
        """The bool mask ``(B, 1, T, S)`` the description stands for (tests, debugging)."""
        B, T, S, L = self.batch_size, self.q_length, self.kv_length, self.keys
        out = torch.zeros(B, 1, T, S, dtype=torch.bool, device=device)
        if self.mask_mod is None:
            out[..., :L] = True
            return out
        mod = self.mask_mod.resolve(T, L)
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q = torch.arange(T, device=device).view(1, 1, T, 1)  # (1, 1, T, 1)
        k = torch.arange(L, device=device).view(1, 1, 1, L)  # (1, 1, 1, L)
        out[..., :L] = mod.grid(b, h, q, k).expand(B, 1, T, L)
        return out

    def __repr__(self) -> str:
        kind = f"dense: {self.reason}" if self.dense else self.describe()
        return f"HFMask(B={self.batch_size}, T={self.q_length}, S={self.kv_length}, {kind})"


# --- reading the closures -------------------------------------------------------------------

class _Unrecognised(Exception):
    """A mask closure this module cannot describe (the message says which piece)."""


class _TensorOffset(Exception):
    """A cache offset held in a tensor while compiling: reading it would break the graph."""


@dataclass(frozen=True)
class _Ctx:
    B: int
    T: int
    S: int
    q_offset: int
    kv_offset: int

    @property
    def offset(self) -> int:  # query i sits at key index i + offset
        return self.q_offset - self.kv_offset


def _factory(fn) -> str:
    """``"and_masks"`` for a closure made by ``masking_utils.and_masks``, else ``""``."""
    if getattr(fn, "__module__", None) != _MU:
        return ""
    return getattr(fn, "__qualname__", "").split(".<locals>", 1)[0]


def _cells(fn, *names) -> list:
    """The values of closure variables ``names`` of ``fn`` (a renamed one is unrecognised,
    naming it: see :func:`.transformers_api.problems`)."""
    code, cells = fn.__code__, fn.__closure__ or ()
    have = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    missing = [n for n in names if n not in have]
    if missing:
        raise _Unrecognised(f"{_MU}.{_factory(fn)} no longer closes over {missing} (it closes "
                            f"over {tuple(have)}): attnkit needs an update for this "
                            f"transformers")
    return [have[n] for n in names]


def _int(value, what: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
        if _compiling():
            raise _TensorOffset(what)
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Unrecognised(f"{what} = {value!r} is not an int")
    return value


def _keys_slice(mask: Tensor, ctx: _Ctx) -> Tensor:
    """The ``(B, S)`` part of a ``(B, kv_offset + S...)`` padding mask this call sees."""
    mask = mask.to(torch.bool)
    need = ctx.kv_offset + ctx.S
    if mask.shape[-1] < need:  # as transformers' prepare_padding_mask: missing keys are padding
        mask = torch.nn.functional.pad(mask, (0, need - mask.shape[-1]))
    return mask[:, ctx.kv_offset:need]


def _positive(value, what: str, least: int) -> int:
    value = _int(value, what)
    if value < least:
        raise _Unrecognised(f"{what} = {value} < {least}")
    return value


def _describe(fn, ctx: _Ctx) -> MaskMod | None:
    if fn is _causal_mask_function:
        return Causal(offset=ctx.offset)
    if fn is _bidirectional_mask_function:
        return None
    kind = _factory(fn)
    if not kind:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise _Unrecognised(f"mask function {name} (not one of transformers.masking_utils')")
    if kind == "and_masks":
        (fns,) = _cells(fn, "mask_functions")
        packed = any(_factory(f) == "packed_sequence_mask_function" for f in fns)
        parts = []
        for f in fns:
            if _factory(f) == "remap_positions_for_packed_sequence" and packed:
                # Within one packed document positions step by 1, so a pattern that depends
                # only on i - j is the same at remapped and raw indices.
                inner = _describe(_cells(f, "mask_function")[0], ctx)
                if not depends_on_difference_only(inner):
                    raise _Unrecognised(f"packed sequences with {inner.describe()}")
                parts.append(inner)
            else:
                parts.append(_describe(f, ctx))
        return merge_and(*parts)
    if kind == "or_masks":
        parts = [_describe(f, ctx) for f in _cells(fn, "mask_functions")[0]]
        return None if any(p is None for p in parts) else Or(tuple(parts))
    if kind == "sliding_window_overlay":
        sw = _positive(_cells(fn, "sliding_window")[0], "sliding_window", 1)
        return Window(left=sw - 1, right=None, offset=ctx.offset)
    if kind == "sliding_window_bidirectional_overlay":
        sw = _positive(_cells(fn, "sliding_window")[0], "sliding_window", 0)
        return Window(left=sw, right=sw, offset=ctx.offset)
    if kind == "chunked_overlay":
        size, left_padding = _cells(fn, "chunk_size", "left_padding")
        size = _positive(size, "chunk_size", 1)
        start = torch.as_tensor(left_padding).long().reshape(-1)
        if start.numel() <= 1 or (not _compiling() and bool((start == start[0]).all())):
            first = int(start[0]) if start.numel() else 0
            return at_positions(ChunkedLocal(size, offset=0), ctx.q_offset - first,
                                ctx.kv_offset - first)
        return PerSampleChunks(size, start, ctx.q_offset, ctx.kv_offset)
    if kind == "padding_mask_function":
        return KeyPadding(_keys_slice(_cells(fn, "padding_mask")[0], ctx))
    if kind == "packed_sequence_mask_function":
        (ids,) = _cells(fn, "packed_sequence_mask")
        if ctx.q_offset or ctx.kv_offset or ctx.T != ctx.S or ids.shape[-1] != ctx.T:
            raise _Unrecognised("packed sequences with a cache")
        return documents(ids.long(), causal=False)
    raise _Unrecognised(f"{kind} from transformers.masking_utils")


def _covers_every_key(mod, T: int, S: int) -> bool:
    """A window (or causal) that hides nothing from ``T`` queries over ``S`` keys."""
    if not isinstance(mod, Window) or not isinstance(mod.offset, int):
        return False
    o = mod.offset
    left_ok = mod.left is None or 0 >= T - 1 + o - mod.left
    right_ok = mod.right is None or S - 1 <= o + mod.right
    return left_ok and right_ok


def _read(mask_function, ctx: _Ctx, attention_mask, narrow: bool):
    """``(description, keys)`` for one call; with ``narrow`` the description covers only the
    first ``keys`` keys (those any query can see)."""
    mod = _describe(mask_function, ctx)
    keys = ctx.S
    if narrow:
        bound = visible_key_bound(mod, ctx.T)
        if bound is not None and bound < ctx.S:
            keys = bound
            ctx = replace(ctx, S=bound)
            mod = _describe(mask_function, ctx)  # tensors sliced to the visible keys
        if _covers_every_key(mod, ctx.T, ctx.S):
            mod = None
    if attention_mask is not None:
        padding = _keys_slice(attention_mask, ctx)  # (B, S)
        bound = visible_key_bound(mod, ctx.T)
        seen = padding if bound is None else padding[:, :bound]
        # every key a query can see is real: no padding part (a host read, skipped while
        # compiling: torch.compile cannot branch on a tensor's value without a graph break)
        if _compiling() or not bool(seen.all()):
            mod = merge_and(mod, KeyPadding(padding))
    return mod, keys


def describe_mask_function(mask_function, *, batch_size: int, q_length: int, kv_length: int,
                           q_offset=0, kv_offset=0, attention_mask: Tensor | None = None
                           ) -> MaskMod | None:
    """The attnkit description of transformers' mask for one call (None = every key).

    Args:
        mask_function: the closure transformers passes (``causal_mask_function``,
            ``and_masks(...)`` ...), evaluated by transformers at positions
            ``q_offset + i`` and ``kv_offset + j``.
        batch_size, q_length, kv_length: ``B``, ``T``, ``S`` of the call.
        q_offset, kv_offset: the cache's offsets (ints or one-element tensors).
        attention_mask: the 2-D ``(B, >= kv_offset + S)`` padding mask, True = real token.

    Returns:
        A mask description in local indices ``(i, j)`` over all ``S`` keys, or None when
        every key is visible. (:func:`mask_interface` also cuts off keys no query sees.)

    Raises:
        LookupError: a closure this module cannot describe (the message says which piece),
            or a tensor offset while compiling; the mask function then builds a dense mask.
    """
    try:
        ctx = _Ctx(batch_size, q_length, kv_length, _int(q_offset, "q_offset"),
                   _int(kv_offset, "kv_offset"))
        return _read(mask_function, ctx, attention_mask, narrow=False)[0]
    except _Unrecognised as exc:
        raise LookupError(str(exc)) from None
    except _TensorOffset as exc:
        raise LookupError(f"{exc} is a tensor while compiling") from None


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask: Tensor | None = None,
                   use_vmap: bool = False, device="cpu", **kwargs) -> HFMask:
    """transformers' ``AttentionMaskInterface`` entry: same arguments as ``sdpa_mask``.

    Returns:
        An :class:`HFMask`: a description when the closure is recognised (over the keys a
        query can see), else transformers' own dense ``sdpa_mask`` wrapped (counted in
        :data:`dense_fallbacks` when the closure was not recognised).

    Raises:
        ValueError: a ready :class:`HFMask` handed back for other lengths.
    """
    if isinstance(attention_mask, HFMask):  # built ahead by generate, handed back as is
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(f"attention_mask {attention_mask!r} was built for another call "
                             f"than (B, T, S) = ({batch_size}, {q_length}, {kv_length})")
        return attention_mask
    mask_function = _causal_mask_function if mask_function is None else mask_function
    try:
        ctx = _Ctx(batch_size, q_length, kv_length, _int(q_offset, "q_offset"),
                   _int(kv_offset, "kv_offset"))
        mod, keys = _read(mask_function, ctx, attention_mask, narrow=True)
        return HFMask(mod, batch_size, q_length, kv_length, keys)
    except _Unrecognised as exc:
        reason = str(exc)
        if not _compiling():  # a counter bump is a side effect torch.compile would replay
            dense_fallbacks[reason] += 1
    except _TensorOffset as exc:
        reason = f"{exc} is a tensor while compiling (a static cache)"
    dense = _sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                       q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                       attention_mask=attention_mask, allow_is_causal_skip=False,
                       allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
    return HFMask(Dense(dense), batch_size, q_length, kv_length, dense=True, reason=reason)
