"""The dilated (strided) mask kind: a query sees every ``stride``-th key counted from its own
position, the pattern of dilated sliding windows (LongNet, attention-gym's
``dilated_sliding_window``) and of the Sparse Transformer's strided heads.

One class in one file, as every kind: :meth:`Dilated.grid` for the dense backends,
:meth:`Dilated.blocks` with interval arithmetic for block plans (chunked, flex's
``BlockMask``, :func:`attnkit.create_block_mask`), ``validate`` and ``describe``. Compose it
with the others: ``dilated(4) & sliding_window(512)`` is a dilated window,
``sliding_window(63) | dilated(64)`` the Sparse Transformer's local + strided pattern.

Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import MaskMod, check_align, offset_of
from .row_ranges import UNBOUNDED, span


@dataclass(frozen=True, eq=False)
class Dilated(MaskMod):
    """Query at position ``p = i + offset`` sees key ``j`` iff ``(p - j) % stride == 0``::

        T=S=6, stride=2   k0 k1 k2 k3 k4 k5
                   q2      1  .  1  .  1  .
                   q3      .  1  .  1  .  1

    (no causality of its own: AND it with :func:`causal` or a window.)
    """

    stride: int
    align: object = "top_left"
    offset: int | None = None

    def __post_init__(self):
        check_align(self.align)
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
            raise ValueError(f"stride must be a positive int (1 = every key), got "
                             f"{self.stride!r}")

    def resolve(self, T, S):
        if self.offset is not None:
            return self
        return replace(self, offset=offset_of(T, S, self.align))

    def grid(self, b, h, q, k):
        return (q + (self.offset or 0) - k) % self.stride == 0

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        # Over a block the distance d = p - j spans [lo, hi]: some pair is visible iff a
        # multiple of the stride lies in it, every pair iff the stride is 1 or the block is a
        # single pair on the lattice.
        o, s = self.offset or 0, self.stride
        lo, hi = q_lo + o - k_hi, q_hi + o - k_lo  # (nQ, nK)
        some = torch.div(hi, s, rounding_mode="floor") * s >= lo
        every = (lo == hi) & (lo % s == 0) if s > 1 else torch.ones_like(some)
        return some, every

    def intervals(self, B, H, q0, q1):
        """Every key when the stride is 1; otherwise no ranges (a comb, not an interval)."""
        return span(-UNBOUNDED, UNBOUNDED) if self.stride == 1 else None

    def describe(self):
        at = f", offset={self.offset}" if self.offset else ""
        return f"dilated({self.stride}{at})"
