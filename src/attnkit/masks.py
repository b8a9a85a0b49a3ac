"""Attention masks, described rather than materialised.

A :class:`MaskSpec` says *which* keys each query may see (causal with an alignment, a sliding
window, key padding, an optional dense mask). Each backend turns it into its cheapest form:
``sdpa`` uses ``is_causal`` when it can, ``chunked`` skips whole blocks and never builds a
``T x S`` tensor, and ``math`` asks for :meth:`MaskSpec.dense`.

Polarity everywhere: ``True`` means "may attend". (``torch.nn.MultiheadAttention`` uses the
opposite for its bool masks.)

Shape letters: ``B`` batch, ``H`` heads, ``T`` queries, ``S`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ALIGNMENTS",
    "MaskSpec",
    "causal_mask",
    "sliding_window_mask",
    "padding_mask_from_lengths",
    "combine_masks",
]

ALIGNMENTS = ("top_left", "bottom_right")


def _check_align(align: str) -> None:
    if align not in ALIGNMENTS:
        raise ValueError(f"causal_align must be one of {ALIGNMENTS}, got {align!r}")


def _offset(T: int, S: int, align: str) -> int:
    """How many keys precede query 0's own position: 0 top-left, S - T bottom-right."""
    return 0 if align == "top_left" else S - T


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
    _check_align(align)
    S = T if S is None else S
    q_pos = torch.arange(T, device=device).unsqueeze(1) + _offset(T, S, align)  # (T, 1)
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
    q_pos = torch.arange(T, device=device).unsqueeze(1) + _offset(T, S, align)  # (T, 1)
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


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may see, without building a ``T x S`` tensor.

    Attributes:
        causal: hide keys after the query's own position.
        causal_align: ``"top_left"`` or ``"bottom_right"`` (see :func:`causal_mask`).
        window: if set, each query sees at most this many most recent keys (implies causal).
        key_padding_mask: ``(B, S)`` bool, True = real key.
        mask: dense bool mask broadcastable to ``(B, H, T, S)``, True = may attend.
    """

    causal: bool = False
    causal_align: str = "top_left"
    window: int | None = None
    key_padding_mask: Tensor | None = None
    mask: Tensor | None = None

    def __post_init__(self):
        _check_align(self.causal_align)
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

    @property
    def is_empty(self) -> bool:
        """True when nothing is masked."""
        return not self.causal and self.key_padding_mask is None and self.mask is None

    def offset(self, T: int, S: int) -> int:
        """Position of query 0 among the keys (0 top-left, S - T bottom-right)."""
        return _offset(T, S, self.causal_align)

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        """Check the tensors against the call's sizes.

        Raises:
            ValueError: a mask whose shape does not fit ``(B, S)`` / ``(B, H, T, S)``.
        """
        kpm = self.key_padding_mask
        if kpm is not None and tuple(kpm.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, "
                             f"got {tuple(kpm.shape)}")
        if self.mask is not None:
            m = self.mask
            ok = m.dim() <= 4
            if ok:
                try:
                    ok = torch.broadcast_shapes(m.shape, (B, H, T, S)) == torch.Size((B, H, T, S))
                except RuntimeError:
                    ok = False
            if not ok:
                raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to "
                                 f"(B, H, T, S) = {(B, H, T, S)}")

    def dense(self, T: int, S: int, device=None) -> Tensor | None:
        """The whole description as one bool mask broadcastable to ``(B, H, T, S)``.

        Costs ``T x S`` memory (times B when there is key padding): for the math backend and
        for peers that need a dense mask, not for long sequences.
        """
        structural = None
        if self.window is not None:
            structural = sliding_window_mask(T, S, self.window, align=self.causal_align,
                                             device=device)
        elif self.causal:
            structural = causal_mask(T, S, align=self.causal_align, device=device)
        padding = None
        if self.key_padding_mask is not None:
            padding = self.key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        return combine_masks(structural, padding, self.mask)
