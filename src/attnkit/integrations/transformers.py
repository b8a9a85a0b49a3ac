"""Hugging Face transformers (5.x) models with their attention run by attnkit.

::

    from attnkit.integrations.transformers import register
    register()                                   # name "attnkit", backend "auto"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnkit")

:func:`register` adds two functions to transformers' registries under one name:

* a **mask function** (``AttentionMaskInterface``): transformers calls it where it would
  build ``sdpa``'s ``(B, 1, T, S)`` bool mask, with a ``mask_function`` closure made of its
  own pieces (``causal_mask_function``, ``sliding_window_overlay``, ``chunked_overlay``,
  ``packed_sequence_mask_function``, ``and_masks``/``or_masks`` ...) plus the 2-D padding mask
  and the cache's offsets. This function reads the closure and returns an :class:`HFMask`
  holding an attnkit mask *description* (causal with the cache's offset, window, key padding,
  same document, chunks) instead of a ``T x S`` tensor. A closure it does not recognise (a
  model's own ``or_mask_function``, block-wise image masks) is evaluated densely by
  transformers' own ``sdpa_mask`` and counted in :data:`dense_fallbacks`.
  Without a registered mask function transformers hands a custom attention
  ``attention_mask=None`` and padding would be silently dropped.
* an **attention function** (``AttentionInterface``): transformers calls it as
  ``fn(module, query (B, H, T, D), key (B, Hkv, S, D), value, attention_mask, dropout=,
  scaling=, sliding_window=, softcap=, s_aux=, is_causal=, **kwargs)`` and wants
  ``(out (B, T, H, D), weights (B, H, T, S) or None)``. It calls :func:`attnkit.attention`
  (GQA without repeating K/V; ``softcap`` -> ``softcap=``, ``s_aux`` -> ``sinks=``,
  ``scaling`` -> ``scale=``, ``dropout`` -> ``dropout_p=``) and returns weights when the
  model records attentions (``output_attentions=True``).

Differences from ``eager``, on purpose: a query row whose keys are all masked (the padded
positions of a left-padded batch) is zeros here; eager's ``finfo.min`` mask gives the mean of
the values. Real rows agree to float32 round-off.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import transformers
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:  # pragma: no cover - exercised by a test with transformers hidden
    raise ImportError("attnkit.integrations.transformers needs transformers 5.x: "
                      "pip install \"attnkit[hf]\" (or pip install \"transformers>=5,<6\")"
                      ) from exc

if not transformers.__version__.startswith("5."):
    raise ImportError(f"attnkit.integrations.transformers supports transformers 5.x, found "
                      f"{transformers.__version__}: pip install \"transformers>=5,<6\"")

from .. import engine as _engine
from ..backends import available_backends
from ..masks import (And, Causal, ChunkedLocal, Dense, KeyPadding, MaskMod, Or, Window,
                     and_masks,
                     at_positions, documents)

__all__ = ["register", "unregister", "HFMask", "attention_forward", "mask_interface",
           "describe_mask_function", "dense_fallbacks"]

#: How many masks were built densely, by the reason the closure was not recognised.
dense_fallbacks: Counter = Counter()

_OURS: dict[str, str] = {}  # name -> backend, the names register() added


class _Unrecognised(Exception):
    """A mask closure this module cannot describe (the message says which piece)."""


@dataclass(frozen=True, eq=False)
class HFMask:
    """What the mask function hands the attention function: a description, not a tensor.

    Attributes:
        mask_mod: an attnkit mask description in the call's local indices (query ``i``,
            key ``j`` of this forward's ``T`` queries and ``S`` keys), or None: every key.
        batch_size: ``B``.
        q_length: ``T``.
        kv_length: ``S``.
        dense: True when the closure was not recognised and ``mask_mod`` wraps transformers'
            own dense ``sdpa_mask``.
        reason: for a dense mask, the piece that was not recognised.
    """

    mask_mod: MaskMod | None
    batch_size: int
    q_length: int
    kv_length: int
    dense: bool = False
    reason: str = ""

    # transformers reads ``ndim``/``shape`` of a mask it is handed back (generate builds the
    # masks of a static cache ahead of the forward); a 4-D shape marks it as ready.
    ndim = 4

    @property
    def shape(self) -> torch.Size:
        """``(B, 1, T, S)``, the shape of the mask this stands for."""
        return torch.Size((self.batch_size, 1, self.q_length, self.kv_length))

    def describe(self) -> str:
        """A readable name of the pattern (``"all"`` for no mask)."""
        return "all" if self.mask_mod is None else self.mask_mod.describe()

    def to_dense(self, device=None) -> Tensor:
        """The bool mask ``(B, 1, T, S)`` the description stands for (tests, debugging)."""
        B, T, S = self.batch_size, self.q_length, self.kv_length
        if self.mask_mod is None:
            return torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
        mod = self.mask_mod.resolve(T, S)
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q = torch.arange(T, device=device).view(1, 1, T, 1)  # (1, 1, T, 1)
        k = torch.arange(S, device=device).view(1, 1, 1, S)  # (1, 1, 1, S)
        return mod.grid(b, h, q, k).expand(B, 1, T, S)

    def __repr__(self) -> str:
        kind = f"dense: {self.reason}" if self.dense else self.describe()
        return f"HFMask(B={self.batch_size}, T={self.q_length}, S={self.kv_length}, {kind})"


# --- reading transformers' mask closures ----------------------------------------------------

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
    if getattr(fn, "__module__", None) != _mu.__name__:
        return ""
    return getattr(fn, "__qualname__", "").split(".<locals>", 1)[0]


def _cells(fn) -> dict:
    code, cells = fn.__code__, fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


def _int(value, what: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
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


@dataclass(frozen=True, eq=False)
class _PerSampleChunks(MaskMod):
    """Llama-4 chunks shifted by each sample's left padding: query at ``i + q_offset`` and
    key at ``j + kv_offset`` share a ``size``-chunk counted from ``shift[b]``."""

    size: int
    shift: Tensor  # (B,) long
    q_offset: int = 0
    kv_offset: int = 0

    def grid(self, b, h, q, k):
        s = self.shift[b]
        return (q + self.q_offset - s) // self.size == (k + self.kv_offset - s) // self.size

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        some = every = None
        for value in sorted(set(self.shift.tolist())):
            part = at_positions(ChunkedLocal(self.size, offset=0), self.q_offset - value,
                                self.kv_offset - value)
            s, e = part.blocks(q_lo, q_hi, k_lo, k_hi)
            some = s if some is None else some | s
            every = e if every is None else every & e
        return some, every

    def validate(self, B, H, T, S):
        if tuple(self.shift.shape) != (B,):
            raise ValueError(f"left_padding must have shape (B,) = ({B},), got "
                             f"{tuple(self.shift.shape)}")

    def describe(self):
        return f"chunked_local({self.size}, per-sample start)"

    def tensors(self):
        return (self.shift,)


def _is_window(mod) -> bool:
    return isinstance(mod, Window)  # Causal is a Window


def _and(parts) -> MaskMod | None:
    """AND of descriptions (None = every key), windows at one offset merged into one."""
    flat = []
    for p in parts:
        if p is None:
            continue
        flat.extend(p.parts if isinstance(p, And) else (p,))
    windows = [p for p in flat if _is_window(p)]
    others = [p for p in flat if not _is_window(p)]
    if windows and len({w.offset for w in windows}) == 1:
        lefts = [w.left for w in windows if w.left is not None]
        rights = [w.right for w in windows if w.right is not None]
        left = min(lefts) if lefts else None
        right = min(rights) if rights else None
        offset = windows[0].offset
        merged = Causal(offset=offset) if (left is None and right == 0) else \
            Window(left=left, right=right, offset=offset)
        windows = [merged]
    flat = windows + others
    if not flat:
        return None
    return flat[0] if len(flat) == 1 else and_masks(*flat)


def _difference_only(mod) -> bool:
    """Visibility depends only on ``i - j`` (so it survives position remapping)."""
    if mod is None or _is_window(mod):
        return True
    parts = getattr(mod, "parts", None)
    return parts is not None and all(_difference_only(p) for p in parts)


def _describe(fn, ctx: _Ctx) -> MaskMod | None:
    if fn is _mu.causal_mask_function:
        return Causal(offset=ctx.offset)
    if fn is _mu.bidirectional_mask_function:
        return None
    kind = _factory(fn)
    if not kind:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise _Unrecognised(f"mask function {name} (not one of transformers.masking_utils')")
    cells = _cells(fn)
    if kind == "and_masks":
        fns = cells["mask_functions"]
        packed = [f for f in fns if _factory(f) == "packed_sequence_mask_function"]
        parts = []
        for f in fns:
            if _factory(f) == "remap_positions_for_packed_sequence" and packed:
                # Within one packed document positions step by 1, so a pattern that depends
                # only on i - j is the same at remapped and raw indices.
                inner = _describe(_cells(f)["mask_function"], ctx)
                if not _difference_only(inner):
                    raise _Unrecognised(f"packed sequences with {inner.describe()}")
                parts.append(inner)
            else:
                parts.append(_describe(f, ctx))
        return _and(parts)
    if kind == "or_masks":
        parts = [_describe(f, ctx) for f in cells["mask_functions"]]
        return None if any(p is None for p in parts) else Or(tuple(parts))
    if kind == "sliding_window_overlay":
        sw = _int(cells["sliding_window"], "sliding_window")
        if sw < 1:
            raise _Unrecognised(f"sliding_window = {sw} < 1")
        return Window(left=sw - 1, right=None, offset=ctx.offset)
    if kind == "sliding_window_bidirectional_overlay":
        sw = _int(cells["sliding_window"], "sliding_window")
        if sw < 0:
            raise _Unrecognised(f"sliding_window = {sw} < 0")
        return Window(left=sw, right=sw, offset=ctx.offset)
    if kind == "chunked_overlay":
        size = _int(cells["chunk_size"], "chunk_size")
        if size < 1:
            raise _Unrecognised(f"chunk_size = {size} < 1")
        shift = torch.as_tensor(cells["left_padding"]).long().reshape(-1)
        if shift.numel() == 1 or bool((shift == shift[0]).all()):
            first = int(shift[0]) if shift.numel() else 0
            return at_positions(ChunkedLocal(size, offset=0), ctx.q_offset - first,
                                ctx.kv_offset - first)
        return _PerSampleChunks(size, shift, ctx.q_offset, ctx.kv_offset)
    if kind == "padding_mask_function":
        return KeyPadding(_keys_slice(cells["padding_mask"], ctx))
    if kind == "packed_sequence_mask_function":
        ids = cells["packed_sequence_mask"]
        if ctx.q_offset or ctx.kv_offset or ctx.T != ctx.S or ids.shape[-1] != ctx.T:
            raise _Unrecognised("packed sequences with a cache")
        return documents(ids.long(), causal=False)
    raise _Unrecognised(f"{kind} from transformers.masking_utils")


def _visible_keys(mod, T: int) -> int | None:
    """How many leading keys can be visible at all (a causal bound), None if unbounded."""
    if _is_window(mod):
        return None if mod.right is None else max(0, T - 1 + mod.offset + mod.right + 1)
    if isinstance(mod, And):
        bounds = [b for b in (_visible_keys(p, T) for p in mod.parts) if b is not None]
        return min(bounds) if bounds else None
    return None


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
        A mask description in local indices ``(i, j)``, or None when every key is visible.

    Raises:
        LookupError: a closure this module cannot describe (the message says which piece);
            the mask function then falls back to a dense mask.
    """
    ctx = _Ctx(batch_size, q_length, kv_length, _int(q_offset, "q_offset"),
               _int(kv_offset, "kv_offset"))
    try:
        mod = _describe(mask_function, ctx)
    except _Unrecognised as exc:
        raise LookupError(str(exc)) from None
    if attention_mask is not None:
        keys = _keys_slice(attention_mask, ctx)  # (B, S)
        limit = _visible_keys(mod, q_length)
        seen = keys if limit is None else keys[:, :limit]
        if not bool(seen.all()):
            mod = _and([mod, KeyPadding(keys)])
    return mod


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask: Tensor | None = None,
                   use_vmap: bool = False, device="cpu", **kwargs) -> HFMask:
    """transformers' ``AttentionMaskInterface`` entry: same arguments as ``sdpa_mask``.

    Returns:
        An :class:`HFMask`: a description when the closure is recognised, else transformers'
        own dense ``sdpa_mask`` wrapped (and counted in :data:`dense_fallbacks`).
    """
    if isinstance(attention_mask, HFMask):  # built ahead by generate, handed back as is
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(f"attention_mask {attention_mask!r} was built for another call "
                             f"than (B, T, S) = ({batch_size}, {q_length}, {kv_length})")
        return attention_mask
    mask_function = _mu.causal_mask_function if mask_function is None else mask_function
    try:
        mod = describe_mask_function(mask_function, batch_size=batch_size, q_length=q_length,
                                     kv_length=kv_length, q_offset=q_offset,
                                     kv_offset=kv_offset, attention_mask=attention_mask)
        return HFMask(mod, batch_size, q_length, kv_length)
    except LookupError as exc:
        reason = str(exc)
    dense_fallbacks[reason] += 1
    dense = _mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                          q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                          attention_mask=attention_mask, allow_is_causal_skip=False,
                          allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
    return HFMask(Dense(dense), batch_size, q_length, kv_length, dense=True, reason=reason)


# --- the attention function -----------------------------------------------------------------

def _wants_weights(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers records attentions through hooks on the attention modules
        from transformers.utils.output_capturing import _active_collector
        collected = _active_collector.get()
    except (ImportError, AttributeError):
        return False
    return bool(collected) and "attentions" in collected


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      s_aux: Tensor | None = None, is_causal: bool | None = None, *,
                      backend: str = "auto", **kwargs):
    """transformers' ``AttentionInterface`` entry, run by :func:`attnkit.attention`.

    Args:
        module: the calling attention module (its ``is_causal`` is read when no mask came).
        query: ``(B, H, T, D)``.
        key: ``(B, Hkv, S, D)``, not repeated for GQA.
        value: ``(B, Hkv, S, D)``.
        attention_mask: an :class:`HFMask` from :func:`mask_interface`; or a bool tensor
            broadcastable to ``(B, H, T, S)`` (True = attend) or a float additive one (a
            user's ready 4-D mask); or None: causal (top-left) when ``is_causal`` and
            ``T > 1``, as transformers' ``sdpa`` does.
        dropout: dropout on the weights (models pass 0 outside training).
        scaling: score multiplier, default ``1/sqrt(D)``.
        sliding_window: the model's window; the mask already holds it, so it is only read
            when no mask came.
        softcap: Gemma-2's ``c * tanh(score / c)``.
        s_aux: ``(H,)`` attention sinks (gpt-oss).
        is_causal: overrides ``module.is_causal`` when no mask came.
        backend: the attnkit backend (``register`` fixes it).
        **kwargs: ``output_attentions``, ``position_bias`` (T5-style, added to the scores);
            the rest (positions, cache) is not needed here.

    Returns:
        ``(out (B, T, H, D), weights (B, H, T, S) or None)``.

    Raises:
        TypeError: an ``attention_mask`` of another type (a flex ``BlockMask``: load the
            model with the name :func:`register` returned).
        ValueError: an :class:`HFMask` built for other lengths than q/k, or anything
            :func:`attnkit.attention` rejects (a backend that cannot serve the call).
    """
    T, S = query.shape[2], key.shape[2]
    mask = mask_mod = None
    bias = kwargs.get("position_bias")
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (T, S):
            raise ValueError(f"attention_mask was built for (T, S) = ({attention_mask.q_length}"
                             f", {attention_mask.kv_length}) but query/key have (T, S) = "
                             f"({T}, {S}); build it for this call's cache")
        mask_mod = attention_mask.mask_mod
    elif attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if causal and T > 1:
            mask_mod = Causal(offset=0) if not sliding_window else \
                Window(left=sliding_window - 1, right=0, offset=0)
    elif isinstance(attention_mask, Tensor):
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask if bias is None else bias + attention_mask
    else:
        raise TypeError(f"attention_mask must be an attnkit HFMask, a tensor or None, got "
                        f"{type(attention_mask).__name__}; load the model with "
                        f"attn_implementation set to the name register() returned so "
                        f"transformers builds the mask with attnkit's mask function")
    weights = _wants_weights(kwargs)
    result = _engine.attention(query, key, value, mask=mask, mask_mod=mask_mod, bias=bias,
                               dropout_p=float(dropout), scale=scaling, softcap=softcap,
                               sinks=s_aux, backend=backend, return_weights=weights)
    out, attn = result if weights else (result, None)
    return out.transpose(1, 2).contiguous(), attn  # (B, T, H, D)


def register(name: str = "attnkit", backend: str = "auto") -> str:
    """Make ``attn_implementation=name`` run transformers models on attnkit.

    Args:
        name: the ``attn_implementation`` name to register (not one of transformers' own).
        backend: ``"auto"`` or a registered attnkit backend (``available_backends()``).

    Also registers ``f"{name}_flash"``, the flash-convention implementation for continuous
    batching and packed training (:mod:`attnkit.integrations.transformers_varlen`).

    Returns:
        ``name``, to pass as ``attn_implementation=``.

    Raises:
        ValueError: an empty name, one of transformers' built-in names, or an unknown
            backend.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    builtin = (set(AttentionInterface._global_mapping) | {"eager"}) - set(_OURS)
    if name in builtin:
        raise ValueError(f"name {name!r} is one of transformers' own attention "
                         f"implementations; pick another, e.g. register(name=\"attnkit\")")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got "
                         f"{backend!r}")

    def attnkit_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    AttentionInterface.register(name, attnkit_attention)
    AttentionMaskInterface.register(name, mask_interface)
    _OURS[name] = backend
    from .transformers_varlen import register as register_flash  # imports this module's deps
    register_flash(f"{name}_flash", backend)
    return name


def unregister(name: str = "attnkit") -> None:
    """Remove a name :func:`register` added.

    Raises:
        ValueError: a name that :func:`register` did not add.
    """
    if name not in _OURS:
        raise ValueError(f"{name!r} was not registered by attnkit; registered: "
                         f"{sorted(_OURS)}")
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    del _OURS[name]
