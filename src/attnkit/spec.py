""":class:`MaskSpec`: everything a backend needs to know about a call besides q, k, v.

It gathers the mask (the classic fields ``causal``/``causal_align``/``window``/
``key_padding_mask``/``mask`` plus any ``mask_mod`` description from :mod:`attnkit.masks`),
the score function (``score_mod``, :mod:`attnkit.scores`) and the attention sinks, and
resolves them against a call's lengths: :meth:`MaskSpec.mask_mod_for` gives one composed
mask description, :meth:`MaskSpec.score_mod_for` one score description.

Shape letters: ``B`` batch, ``H`` query heads, ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks.base import And, MaskMod, as_mask_mod, check_align, offset_of
from .masks.data import Dense, KeyPadding
from .masks.structural import Causal, Window
from .scores import ScoreMod, as_score_mod

__all__ = ["MaskSpec"]


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may see and how scores are shaped, without a ``T x S`` tensor.

    Attributes:
        causal: hide keys after the query's own position.
        causal_align: ``"top_left"``, ``"bottom_right"`` or an int offset (query ``i`` sees
            keys ``j <= i + offset``; see :func:`attnkit.masks.causal_mask`).
        window: if set, each query sees at most this many most recent keys (implies causal).
        key_padding_mask: ``(B, S)`` bool, True = real key.
        mask: dense bool mask broadcastable to ``(B, H, T, S)``, True = may attend.
        mask_mod: a further mask description (ANDed with the above), or a callable
            ``fn(b, h, q_idx, kv_idx)``.
        score_mod: a score description or callable ``fn(score, b, h, q_idx, kv_idx)``.
        sinks: ``(H,)`` float, one extra logit per head in the softmax denominator
            (attention sinks); it takes probability mass but contributes no value.
    """

    causal: bool = False
    causal_align: object = "top_left"
    window: int | None = None
    key_padding_mask: Tensor | None = None
    mask: Tensor | None = None
    mask_mod: object = None
    score_mod: object = None
    sinks: Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be a bool, got {type(self.causal).__name__} "
                            f"{self.causal!r}; for a mask tensor use mask=")
        check_align(self.causal_align)
        if self.window is not None:
            if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
                raise ValueError(f"window must be a positive int or None, got {self.window!r}")
            object.__setattr__(self, "causal", True)  # a sliding window only looks back
        for name in ("key_padding_mask", "mask"):
            m = getattr(self, name)
            if m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool):
                got = m.dtype if isinstance(m, Tensor) else type(m).__name__
                raise TypeError(f"{name} must be a bool tensor (True = attend), got {got}; "
                                f"convert a 0/1 tensor with .bool()")
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

    @property
    def is_empty(self) -> bool:
        """True when nothing is masked."""
        return (not self.causal and self.key_padding_mask is None and self.mask is None
                and self.mask_mod is None)

    @property
    def is_plain(self) -> bool:
        """No score function and no sinks: plain softmax attention."""
        return self.score_mod is None and self.sinks is None

    def offset(self, T: int, S: int) -> int:
        """Position of query 0 among the keys (0 top-left, S - T bottom-right, or the int)."""
        return offset_of(T, S, self.causal_align)

    def plain_causal(self, T: int, S: int) -> bool:
        """Only causal with offset 0 (SDPA's ``is_causal``), nothing else masked."""
        return (self.causal and self.window is None and self.offset(T, S) == 0
                and self.key_padding_mask is None and self.mask is None
                and self.mask_mod is None)

    def mask_mod_for(self, T: int, S: int) -> MaskMod | None:
        """The whole mask as one description resolved for this call, or None if empty."""
        parts = []
        off = self.offset(T, S)
        if self.window is not None:
            parts.append(Window(left=self.window - 1, right=0, offset=off))
        elif self.causal:
            parts.append(Causal(offset=off))
        if self.key_padding_mask is not None:
            parts.append(KeyPadding(self.key_padding_mask))
        if self.mask is not None:
            parts.append(Dense(self.mask))
        if self.mask_mod is not None:
            parts.append(self.mask_mod.resolve(T, S))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def score_mod_for(self, T: int, S: int) -> ScoreMod | None:
        """The score function resolved for this call, or None."""
        return None if self.score_mod is None else self.score_mod.resolve(T, S)

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        """Check the tensors against the call's sizes.

        Raises:
            ValueError: a mask, bias, slopes or sinks whose shape does not fit.
        """
        mod = self.mask_mod_for(T, S)
        if mod is not None:
            mod.validate(B, H, T, S)
        if self.score_mod is not None:
            self.score_mod.validate(B, H, T, S)
        if self.sinks is not None and tuple(self.sinks.shape) != (H,):
            raise ValueError(f"sinks must have shape (H,) = ({H},), one per query head, got "
                             f"{tuple(self.sinks.shape)}")

    def tensors(self) -> tuple:
        """Every tensor the description holds."""
        out = [t for t in (self.key_padding_mask, self.mask, self.sinks) if t is not None]
        for mod in (self.mask_mod, self.score_mod):
            if mod is not None:
                out += list(mod.tensors())
        return tuple(out)

    def describe(self, T: int, S: int) -> str:
        """A short readable summary (``explain()`` shows it)."""
        mod, score = self.mask_mod_for(T, S), self.score_mod_for(T, S)
        parts = [mod.describe() if mod is not None else "no mask"]
        if score is not None:
            parts.append(f"scores: {score.describe()}")
        if self.sinks is not None:
            parts.append("sinks")
        return ", ".join(parts)

    def dense(self, T: int, S: int, device=None, B: int | None = None,
              H: int | None = None) -> Tensor | None:
        """The whole mask as one bool tensor broadcastable to ``(B, H, T, S)``, or None.

        Costs ``T x S`` memory (times B when there is key padding): for the math backend and
        for peers that need a dense mask, not for long sequences. ``B`` and ``H`` default to
        the largest batch/head sizes of the tensors held (1 without any); pass them when a
        mask function depends on ``b`` or ``h``.
        """
        mod = self.mask_mod_for(T, S)
        if mod is None:
            return None
        if B is None:  # only a mask function of b needs it: named kinds slice their tensors
            B = self.key_padding_mask.shape[0] if self.key_padding_mask is not None else 1
            if self.mask is not None and self.mask.dim() == 4:
                B = max(B, self.mask.shape[0])
        if H is None:
            H = self.mask.shape[-3] if self.mask is not None and self.mask.dim() >= 3 else 1
        if device is None:
            device = next((t.device for t in self.tensors()), None)
        out = mod.tile(B, H, 0, T, 0, S, device)
        if out.dim() < 4:
            out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
        return out
