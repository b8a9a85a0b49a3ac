"""One description of a call, and the lowering step that recognises its structure.

A call is ``(mask_mod, score_mod, sinks)``: a mask description (:mod:`attnkit.masks`), a score
description (:mod:`attnkit.scores`) and optional attention sinks. That is all a
:class:`MaskSpec` holds. The familiar arguments of :func:`attnkit.attention` (``causal=``,
``causal_align=``, ``window=``, ``key_padding_mask=``, ``mask=``, ``softcap=``,
``alibi_slopes=``, ``bias=``) are only constructors of those kinds (:meth:`MaskSpec.from_args`),
so no spelling is privileged.

:func:`lower` is the step that makes spelling irrelevant for speed: resolved against a call's
lengths, a description is simplified structurally (a window wider than the keys is causal,
causal whose queries sit past the last key hides nothing, windows ANDed at one offset merge,
an all-True key padding disappears) and plain causal is recognised as such, so
``causal=True``, ``mask_mod=masks.causal()`` and transformers' causal closure all reach SDPA's
``is_causal``. :class:`Call` carries the lowered call to the backends, with its block
summaries (:class:`attnkit.summary.BlockSummary`) built once per block size.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _display
from .masks.base import And, MaskMod, Or, Shift, as_mask_mod, check_align
from .masks.data import Dense, KeyPadding, QueryPadding, SameDocument
from .masks.dilated import Dilated
from .masks.per_sample_chunks import PerSampleChunks
from .masks.simplify import merge_and
from .masks.structural import Causal, ChunkedLocal, KeyPrefix, Window
from .masks.varlen import Varlen
from .scores import Alibi, Bias, Chain, ScoreMod, ScoreShift, Softcap, as_score_mod, chain
from .summary import BlockSummary

__all__ = ["MaskSpec", "Call", "lower", "window_mask", "description_key", "Uncacheable"]

_SMALL = 1 << 20  # below this many T x S pairs, a block summary is not worth building


def window_mask(window, align="top_left") -> Window:
    """The one definition of ``window=``: flash-attn's ``(left, right)`` keys on each side of
    the query (``None`` or ``-1`` = unbounded); an int ``w`` is sugar for ``(w - 1, 0)``, the
    ``w`` most recent keys, the query's own included (Mistral's ``sliding_window``).

    Raises:
        ValueError: an int below 1, a pair with a negative side other than -1, or another
            form.
    """
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 1:
            raise ValueError(f"window must be a positive int (keys per query, itself "
                             f"included) or a (left, right) pair, got {window!r}")
        return Window(left=window - 1, right=0, align=align)
    if isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = (None if side in (None, -1) else side for side in window)
        return Window(left=left, right=right, align=align)
    raise ValueError(f"window must be a positive int or a (left, right) pair (None or -1 = "
                     f"unbounded), got {window!r}")


#: The keywords of MaskSpec's constructor before the one-description change (and the other
#: arguments of :meth:`MaskSpec.from_args`): still accepted, with a DeprecationWarning.
_LEGACY_KEYWORDS = ("causal", "causal_align", "window", "key_padding_mask", "mask", "softcap",
                    "alibi_slopes", "bias")


@dataclass(frozen=True, init=False)
class MaskSpec:
    """Which keys each query may see and how scores are shaped, without a ``T x S`` tensor.

    ``MaskSpec(mask_mod=..., score_mod=..., sinks=...)`` holds a description;
    :meth:`from_args` builds one from :func:`attnkit.attention`'s familiar arguments. The
    constructor's old keywords (``causal``, ``causal_align``, ``window``,
    ``key_padding_mask``, ``mask``, and ``softcap``, ``alibi_slopes``, ``bias``) still
    work, with a ``DeprecationWarning``: ``MaskSpec(causal=True, ...)`` is exactly
    ``MaskSpec.from_args(causal=True, ...)``.

    Attributes:
        mask_mod: a mask description (True = may attend), a callable
            ``fn(b, h, q_idx, kv_idx)``, or None (every key visible).
        score_mod: a score description or callable ``fn(score, b, h, q_idx, kv_idx)``.
        sinks: ``(H,)`` float, one extra logit per head in the softmax denominator
            (attention sinks); it takes probability mass but contributes no value.

    Raises:
        TypeError: an unknown keyword, a bool as the first positional argument (the old
            ``causal``), or what :meth:`from_args` refuses.
    """

    mask_mod: object = None
    score_mod: object = None
    sinks: Tensor | None = None

    def __init__(self, mask_mod=None, score_mod=None, sinks=None, **legacy):
        if isinstance(mask_mod, bool):
            raise TypeError(f"MaskSpec's first argument is mask_mod (a description), got the "
                            f"bool {mask_mod!r}: the old positional causal; write "
                            f"MaskSpec.from_args(causal={mask_mod!r}, ...)")
        if legacy:
            unknown = sorted(set(legacy) - set(_LEGACY_KEYWORDS))
            if unknown:
                raise TypeError(f"MaskSpec() got unexpected keyword argument(s) {unknown}; it "
                                f"takes mask_mod, score_mod, sinks (or, deprecated, "
                                f"{', '.join(_LEGACY_KEYWORDS)})")
            warnings.warn(f"MaskSpec({', '.join(f'{n}=' for n in legacy)}...) is deprecated: "
                          f"MaskSpec holds (mask_mod, score_mod, sinks); build it from these "
                          f"arguments with MaskSpec.from_args({', '.join(legacy)}=...)",
                          DeprecationWarning, stacklevel=2)
            built = MaskSpec.from_args(mask_mod=mask_mod, score_mod=score_mod, sinks=sinks,
                                       **legacy)
            mask_mod, score_mod, sinks = built.mask_mod, built.score_mod, built.sinks
        object.__setattr__(self, "mask_mod", mask_mod)
        object.__setattr__(self, "score_mod", score_mod)
        object.__setattr__(self, "sinks", sinks)
        self.__post_init__()

    def __post_init__(self):
        if self.mask_mod is not None:
            object.__setattr__(self, "mask_mod", as_mask_mod(self.mask_mod))
        if self.score_mod is not None:
            object.__setattr__(self, "score_mod", as_score_mod(self.score_mod))
        s = self.sinks
        if s is not None and (not isinstance(s, Tensor) or not s.is_floating_point()
                              or s.dim() != 1):
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(f"sinks must be a 1-D float tensor (H,), one logit per query "
                            f"head, got {got}")

    # In a notebook: a picture (attnkit._display); str() stays the text everywhere else.
    _repr_html_ = _display.spec_html
    _repr_png_ = _display.spec_png

    @classmethod
    def from_args(cls, *, causal: bool = False, causal_align="top_left", window=None,
                  key_padding_mask: Tensor | None = None, mask: Tensor | None = None,
                  mask_mod=None, score_mod=None, softcap: float | None = None,
                  alibi_slopes: Tensor | None = None, bias: Tensor | None = None,
                  sinks: Tensor | None = None) -> "MaskSpec":
        """The description :func:`attnkit.attention`'s arguments stand for: every mask
        argument becomes a kind, ANDed; ``softcap``, ALiBi, ``bias`` and ``score_mod`` are
        chained in that order.

        Raises:
            TypeError: a ``causal`` that is not a bool; masks that are not bool tensors.
            ValueError: a bad ``window`` or ``causal_align``.
        """
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}; "
                            f"for a mask tensor use mask=, for a description mask_mod=")
        check_align(causal_align)
        parts = []
        if window is not None:  # a sliding window already bounds the right side
            parts.append(window_mask(window, causal_align))
            if causal and parts[0].right != 0:
                parts.append(Causal(align=causal_align))
        elif causal:
            parts.append(Causal(align=causal_align))
        if key_padding_mask is not None:
            parts.append(KeyPadding(key_padding_mask))
        if mask is not None:
            parts.append(Dense(mask))
        if mask_mod is not None:
            parts.append(as_mask_mod(mask_mod))
        mod = None if not parts else parts[0] if len(parts) == 1 else And(tuple(parts))
        score = chain(Softcap(softcap) if softcap is not None else None,
                      Alibi(alibi_slopes, align=causal_align)
                      if alibi_slopes is not None else None,
                      Bias(bias) if bias is not None else None, score_mod)
        return cls(mask_mod=mod, score_mod=score, sinks=sinks)

    @property
    def is_plain(self) -> bool:
        """No score function and no sinks: plain softmax attention."""
        return self.score_mod is None and self.sinks is None

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        """Check the tensors (and mask functions) against the call's sizes.

        Raises:
            ValueError: a mask, bias, slopes or sinks whose shape does not fit.
            TypeError: a mask or score function that returns the wrong kind of value.
        """
        if self.mask_mod is not None:
            self.mask_mod.resolve(T, S).validate(B, H, T, S)
        if self.score_mod is not None:
            self.score_mod.validate(B, H, T, S)
        if self.sinks is not None and tuple(self.sinks.shape) != (H,):
            raise ValueError(f"sinks must have shape (H,) = ({H},), one per query head, got "
                             f"{tuple(self.sinks.shape)}")

    def tensors(self) -> tuple:
        """Every tensor the description holds."""
        out = [self.sinks] if self.sinks is not None else []
        for mod in (self.mask_mod, self.score_mod):
            if mod is not None:
                out += list(mod.tensors())
        return tuple(out)

    def dense(self, T: int, S: int, device=None, B: int | None = None,
              H: int | None = None) -> Tensor | None:
        """The whole mask as one bool tensor broadcastable to ``(B, H, T, S)``, or None.

        Costs ``T x S`` memory (times B for per-sample kinds): for the math backend and for
        peers that need a dense mask, not for long sequences. ``B`` and ``H`` default to 1;
        kinds holding per-sample tensors slice them, so pass them only for a mask function
        of ``b`` or ``h``.
        """
        mod = lower(self.mask_mod, T, S)[0]
        if mod is None:
            return None
        if device is None:
            device = next((t.device for t in self.tensors()), None)
        out = mod.tile(B or 1, H or 1, 0, T, 0, S, device)
        return out.reshape((1,) * (4 - out.dim()) + tuple(out.shape)) if out.dim() < 4 else out


# --- cache keys ----------------------------------------------------------------------------

class Uncacheable(Exception):
    """A description (or argument) whose behaviour its key cannot capture."""


# Kinds whose behaviour is a function of their fields alone (ints, strings, tuples, tensors):
# two with equal keys lower, validate and evaluate alike. Exact types: a subclass (or a user's
# function, MaskFn / ScoreFn, which may read any global state) is never cached.
_PURE_KINDS = frozenset({Window, Causal, KeyPrefix, ChunkedLocal, KeyPadding, QueryPadding,
                         SameDocument, Dense, Dilated, PerSampleChunks, Varlen, And, Or, Shift,
                         Softcap, Alibi, Bias, ScoreShift, Chain})
_SCALARS = frozenset({type(None), bool, int, float, str})
MAX_KEY_TENSOR_BYTES = 1 << 20  # a cache entry keeps its tensors alive: small ones only


def tensor_key(t: Tensor) -> tuple:
    """Identity and state of a tensor: equal while it is the same tensor with the same
    contents (an in-place write bumps ``_version``). Only sound while the key's owner keeps
    ``t`` alive (no other tensor can then take its ``id``).

    Raises:
        Uncacheable: a large tensor, or one without a version counter (inference tensors).
    """
    if t.numel() * t.element_size() > MAX_KEY_TENSOR_BYTES:
        raise Uncacheable("large tensor")
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter
        raise Uncacheable("no version counter") from None
    return (id(t), version, t.data_ptr(), t.shape, t.stride(), t.dtype, t.device,
            t.requires_grad)


def description_key(obj) -> tuple:
    """A hashable key of a description, an argument or a tuple of them: equal keys mean
    equal behaviour (same kinds, same fields, the same tensors unchanged).

    Raises:
        Uncacheable: a user function, an unknown kind, or a tensor :func:`tensor_key` refuses.
    """
    t = type(obj)
    if t in _SCALARS:
        return (t, obj)
    if isinstance(obj, Tensor):
        return tensor_key(obj)
    if t is tuple:
        return (tuple, tuple(description_key(x) for x in obj))
    if t is MaskSpec or t in _PURE_KINDS:
        return (t, tuple((name, description_key(value)) for name, value in vars(obj).items()))
    raise Uncacheable(t.__name__)


# --- lowering -------------------------------------------------------------------------------

def _window(mod: Window, T: int, S: int) -> MaskMod | None:
    """A resolved window with the sides that bind nothing dropped; None if neither binds."""
    o = mod.offset or 0
    left = mod.left if mod.left is not None and mod.left < T - 1 + o else None
    right = mod.right if mod.right is not None and o + mod.right < S - 1 else None
    if left is None and right is None:
        return None
    if left is None and right == 0:
        return Causal(offset=o)
    return Window(left=left, right=right, offset=o)


def _simplify(mod: MaskMod, T: int, S: int) -> MaskMod | None:
    if isinstance(mod, Window):
        return _window(mod, T, S)
    if isinstance(mod, Shift) and isinstance(mod.mod, Window):
        w = mod.mod
        shifted = Window(left=w.left, right=w.right,
                         offset=(w.offset or 0) + mod.q_offset - mod.kv_offset)
        return _window(shifted, T, S)
    if isinstance(mod, KeyPadding):
        if torch.compiler.is_compiling() or not bool(mod.mask.all()):
            return mod
        return None
    if isinstance(mod, And):
        # Flattened, parts that bind nothing dropped, windows at one offset merged; a merged
        # window is simplified again (it may now be plain causal).
        merged = merge_and(*(_simplify(p, T, S) for p in mod.parts))
        parts = () if merged is None else merged.parts if isinstance(merged, And) else (merged,)
        parts = [q for q in (_simplify(p, T, S) if isinstance(p, Window) else p for p in parts)
                 if q is not None]
        return None if not parts else parts[0] if len(parts) == 1 else And(tuple(parts))
    if isinstance(mod, Or):
        parts = [_simplify(p, T, S) for p in mod.parts]
        return None if any(p is None for p in parts) else Or(tuple(parts))
    return mod


def lower(mask_mod, T: int, S: int) -> tuple[MaskMod | None, int | None]:
    """``(mask, causal_offset)``: the description resolved for ``T`` queries and ``S`` keys
    and simplified by structure (None = every key visible), and, when what remains is
    exactly causal, its offset (0 = SDPA's ``is_causal``)."""
    if mask_mod is None:
        return None, None
    mod = _simplify(mask_mod.resolve(T, S), T, S)
    causal = (mod.offset or 0) if isinstance(mod, Causal) else None
    return mod, causal


# --- the call as the backends see it --------------------------------------------------------

def _causal_fraction(T: int, S: int, offset: int) -> float:
    """The exact fraction of the ``T x S`` pairs causal at ``offset`` leaves visible (query
    ``t`` sees ``clamp(t + offset + 1, 0, S)`` keys), in O(1): about 1/2 for prefill, about
    1 for a decode block at the end of a long cache."""
    first, last = offset + 1, offset + T  # keys seen by the first and last query, unclamped
    lo, hi = max(first, 1), min(last, S - 1)
    partial = (lo + hi) * (hi - lo + 1) // 2 if lo <= hi else 0
    full = max(0, last - max(first, S) + 1) * S
    return (partial + full) / (T * S)


@dataclass
class Call:
    """One ``attention()`` call, lowered: sizes, the simplified mask, the resolved score
    function, sinks, and block summaries built on demand, once per block size."""

    B: int
    H: int
    Hkv: int
    T: int
    S: int
    D: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    spec: MaskSpec
    mask: MaskMod | None = None
    causal_offset: int | None = None
    score: ScoreMod | None = None
    _summaries: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, q: Tensor, k: Tensor, spec: MaskSpec, grad: bool) -> "Call":
        B, H, T, D = q.shape
        S = k.shape[2]
        mask, offset = lower(spec.mask_mod, T, S)
        score = None if spec.score_mod is None else spec.score_mod.resolve(T, S)
        return cls(B, H, k.shape[1], T, S, D, q.dtype, q.device, grad, spec, mask, offset,
                   score)

    @property
    def sinks(self) -> Tensor | None:
        return self.spec.sinks

    @property
    def plain_causal(self) -> bool:
        """The mask is exactly top-left causal (SDPA's ``is_causal``)."""
        return self.causal_offset == 0

    def summary(self, block_q: int, block_k: int) -> BlockSummary:
        """The :class:`BlockSummary` of the lowered mask at this granularity (cached)."""
        key = (block_q, block_k)
        if key not in self._summaries:
            self._summaries[key] = BlockSummary.build(self.mask, self.T, self.S, block_q,
                                                      block_k)
        return self._summaries[key]

    def visited(self, block_q: int, block_k: int) -> tuple[float, int]:
        """``(fraction of the T x S pairs in non-empty tiles, number of non-empty tiles)``
        at this granularity, for the cost rules. Small calls and calls under
        ``torch.compile`` are estimated without building the summary (1, or 1/2 when
        causal)."""
        n_blocks = -(-self.T // block_q) * -(-self.S // block_k)
        if self.mask is None or self.T * self.S == 0:
            return 1.0, n_blocks
        if torch.compiler.is_compiling() or self.T * self.S < _SMALL:
            frac = 1.0 if self.causal_offset is None else \
                _causal_fraction(self.T, self.S, self.causal_offset)
            return frac, max(1, int(n_blocks * frac))
        summary = self.summary(block_q, block_k)
        return summary.visited_fraction(), int((summary.kind != 0).sum())

    def flops(self) -> float:
        """Dense forward FLOPs: ``q kᵀ`` and ``P v``."""
        return 4.0 * self.B * self.H * self.T * self.S * self.D

    def describe(self) -> str:
        """A short readable summary (``explain()`` shows it)."""
        parts = [self.mask.describe() if self.mask is not None else "no mask"]
        if self.score is not None:
            parts.append(f"scores: {self.score.describe()}")
        if self.sinks is not None:
            parts.append("sinks")
        return ", ".join(parts)
