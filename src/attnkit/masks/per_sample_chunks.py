"""Fixed attention chunks counted from a per-sample start (Llama-4 with left padding).

Part of :mod:`attnkit.masks` (import from there). Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import MaskMod, Shift
from .row_ranges import span
from .structural import ChunkedLocal

__all__ = ["PerSampleChunks"]


@dataclass(frozen=True, eq=False)
class PerSampleChunks(MaskMod):
    """Query ``i`` (position ``i + q_offset``) and key ``j`` (position ``j + kv_offset``) lie
    in the same ``size``-chunk, chunks counted from ``start[b]`` in sample ``b``::

        size=2, start=[0, 1]   b=0: k0 k1 k2 k3    b=1: k0 k1 k2 k3
                         q1         1  1  .  .          .  1  1  .
                         q3         .  .  1  1          .  .  .  1

    Alone it is two-sided (AND it with :class:`Causal` for Llama-4's chunked attention).
    With one start for every sample it is ``at_positions(ChunkedLocal(size), ...)``.

    Attributes:
        size: positions per chunk (> 0).
        start: ``(B,)`` integer, where sample ``b``'s first chunk begins (its left padding).
        q_offset, kv_offset: positions of local query 0 and key 0.

    Raises:
        ValueError: ``size < 1``; (``validate``) ``start`` not of shape ``(B,)``.
        TypeError: ``start`` not an integer tensor.
    """

    size: int
    start: Tensor
    q_offset: int = 0
    kv_offset: int = 0

    def __post_init__(self):
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"chunk size must be a positive int, got {self.size!r}")
        if not isinstance(self.start, Tensor) or self.start.is_floating_point() \
                or self.start.dtype == torch.bool:
            got = self.start.dtype if isinstance(self.start, Tensor) else \
                type(self.start).__name__
            raise TypeError(f"start must be an integer tensor (B,), got {got}")

    def grid(self, b, h, q, k):
        s = self.start[b]
        return (q + self.q_offset - s) // self.size == (k + self.kv_offset - s) // self.size

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        some = every = None
        for value in sorted(set(self.start.tolist())):  # one shifted ChunkedLocal per start
            part = Shift(ChunkedLocal(self.size, offset=0), self.q_offset - value,
                         self.kv_offset - value)
            s, e = part.blocks(q_lo, q_hi, k_lo, k_hi)
            some = s if some is None else some | s
            every = e if every is None else every & e
        return some, every

    def intervals(self, B, H, q0, q1):
        st = self.start.long().view(-1, 1, 1)  # (B, 1, 1)
        q = torch.arange(q0, q1).view(1, 1, -1)
        c = torch.div(q + self.q_offset - st, self.size, rounding_mode="floor")  # (B, 1, nq)
        lo = c * self.size + st - self.kv_offset
        return span(lo, lo + self.size)

    def validate(self, B, H, T, S):
        if tuple(self.start.shape) != (B,):
            raise ValueError(f"chunk start (left padding) must have shape (B,) = ({B},), got "
                             f"{tuple(self.start.shape)}")

    def describe(self):
        return f"chunked_local({self.size}, per-sample start)"

    def tensors(self):
        return (self.start,)
