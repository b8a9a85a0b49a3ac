"""The structural mask kinds: visibility from positions alone (windows, causal, chunks,
a key prefix).

Part of :mod:`attnkit.masks` (import them from there); the protocol every kind follows is in
:mod:`attnkit.masks.base`. Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import MaskMod, check_align, offset_of
from .row_ranges import UNBOUNDED, span


def _rows(q0: int, q1: int) -> Tensor:
    """``(1, 1, nq)`` query indices ``q0 .. q1 - 1``."""
    return torch.arange(q0, q1).view(1, 1, -1)


@dataclass(frozen=True, eq=False)
class Window(MaskMod):
    """Query at position ``p = i + offset`` sees keys ``p - left <= j <= p + right``."""

    left: int | None = None
    right: int | None = 0
    align: object = "top_left"
    offset: int | None = None

    def __post_init__(self):
        check_align(self.align)
        for name in ("left", "right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"{name} must be a non-negative int (keys on that side of the "
                                 f"query) or None for unbounded, got {val!r}")
        if self.offset is not None and (not isinstance(self.offset, int)
                                        or isinstance(self.offset, bool)):
            raise ValueError(f"offset must be an int, got {self.offset!r}")

    def resolve(self, T, S):
        return self if self.offset is not None else replace(self, offset=offset_of(T, S, self.align))

    def _o(self):
        return 0 if self.offset is None else self.offset

    def grid(self, b, h, q, k):
        p = q + self._o()
        ok = None
        if self.left is not None:
            ok = k >= p - self.left
        if self.right is not None:
            ok = (k <= p + self.right) if ok is None else ok & (k <= p + self.right)
        return torch.ones_like(k - p, dtype=torch.bool) if ok is None else ok

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        o = self._o()
        shape = (q_lo.shape[0], k_lo.shape[-1])  # (nQ, 1) with (1, nK)
        some = every = torch.ones(shape, dtype=torch.bool, device=q_lo.device)  # narrowed below
        if self.left is not None:
            some = some & (k_hi >= q_lo + o - self.left)
            every = every & (k_lo >= q_hi + o - self.left)
        if self.right is not None:
            some = some & (k_lo <= q_hi + o + self.right)
            every = every & (k_hi <= q_lo + o + self.right)
        return some, every

    def intervals(self, B, H, q0, q1):
        p = _rows(q0, q1) + self._o()
        lo = p - self.left if self.left is not None else -UNBOUNDED
        hi = p + self.right + 1 if self.right is not None else UNBOUNDED
        return span(lo, hi)

    def describe(self):
        at = f", offset={self.offset}" if self.offset else ""
        return f"window(left={self.left}, right={self.right}{at})"


@dataclass(frozen=True, eq=False)
class Causal(Window):
    """``Window(left=None, right=0)``: no key after the query's own position."""

    def describe(self):
        if self.offset:
            return f"causal(offset={self.offset})"
        return "causal" if self.offset is not None or self.align == "top_left" else \
            f"causal({self.align})"


@dataclass(frozen=True, eq=False)
class KeyPrefix(MaskMod):
    """Key index below ``n`` (an int or ``(B,)`` tensor): the prefix of prefix-LM."""

    n: object

    def grid(self, b, h, q, k):
        n = self.n[b] if isinstance(self.n, Tensor) else self.n
        return k < n

    def tile(self, B, H, q0, q1, k0, k1, device):
        k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)  # (1, 1, 1, nk)
        n = self.n.view(-1, 1, 1, 1) if isinstance(self.n, Tensor) else self.n  # (B, 1, 1, 1)
        return k < n

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        if isinstance(self.n, Tensor):
            lo, hi = int(self.n.min()), int(self.n.max())
        else:
            lo = hi = int(self.n)
        return (k_lo < hi) & (q_lo >= 0), (k_hi < lo) & (q_lo >= 0)

    def intervals(self, B, H, q0, q1):
        n = self.n.long().cpu().view(-1, 1, 1) if isinstance(self.n, Tensor) else int(self.n)
        return span(0, n)

    def describe(self):
        return f"prefix({self.n if not isinstance(self.n, Tensor) else 'per-sample'})"

    def tensors(self):
        return (self.n,) if isinstance(self.n, Tensor) else ()


@dataclass(frozen=True, eq=False)
class ChunkedLocal(MaskMod):
    """Query position ``p = i + offset`` and key ``j`` lie in the same ``size``-chunk."""

    size: int
    align: object = "top_left"
    offset: int | None = None

    def __post_init__(self):
        check_align(self.align)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.size!r}")

    def resolve(self, T, S):
        return self if self.offset is not None else replace(self, offset=offset_of(T, S, self.align))

    def grid(self, b, h, q, k):
        return (q + (self.offset or 0)) // self.size == k // self.size

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        o, c = self.offset or 0, self.size
        qa, qb, ka, kb = (q_lo + o) // c, (q_hi + o) // c, k_lo // c, k_hi // c
        return (qa <= kb) & (ka <= qb), (qa == qb) & (ka == kb) & (qa == ka)

    def intervals(self, B, H, q0, q1):
        c = torch.div(_rows(q0, q1) + (self.offset or 0), self.size, rounding_mode="floor")
        return span(c * self.size, (c + 1) * self.size)

    def describe(self):
        return f"chunked_local({self.size})"
