"""The varlen mask kind: packed sequences of different query and key lengths, flash-attn's
convention (``cu_seqlens_q``, ``cu_seqlens_k``), each sequence causal aligned bottom-right.

Part of :mod:`attnkit.masks` (import it from there: :func:`attnkit.masks.varlen`); the protocol
every kind follows is in :mod:`attnkit.masks.base`.

Sequence ``s`` owns queries ``cu_q[s] .. cu_q[s+1]-1`` and keys ``cu_k[s] .. cu_k[s+1]-1`` of
one packed row. Its ``Lq`` queries are the *last* ``Lq`` of its ``Lk`` positions (5 new
queries over 300 cached keys work), so query ``i`` of the row sits at key index
``p(i) = i + cu_k[s+1] - cu_q[s+1]`` and sees keys ``j`` of the same sequence with
``p(i) - left <= j <= p(i) + right`` (``right = 0`` when causal; ``None`` = unbounded)::

    cu_q = [0, 1, 3], cu_k = [0, 3, 5]    k0 k1 k2 k3 k4
                          q0 (seq 0)       1  1  1  .  .
                          q1 (seq 1)       .  .  .  1  .
                          q2 (seq 1)       .  .  .  1  1

Held per token, never per pair: ``seq_q (T,)`` and ``pos (T,)``; ``seq_k (S,)`` is built only
when a backend evaluates tiles. Block summaries are interval arithmetic (the sequence of a
block's first and last key by binary search), so building the plan costs O(T + blocks) and
chunked never visits a cross-sequence block.
Shape letters as in :mod:`attnkit.masks`; ``N`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import MaskMod
from .row_ranges import span


def check_cu_seqlens(name: str, cu, total: int | None = None) -> Tensor:
    """``cu`` as a 1-D long tensor ``[0, l1, l1+l2, ..., total]``.

    Raises:
        TypeError: not integers.
        ValueError: not 1-D with at least 2 entries, not starting at 0, decreasing, or (when
            ``total`` is given) not ending at ``total``; each message names ``name``.
    """
    if isinstance(cu, Tensor):
        if cu.is_floating_point() or cu.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (int32 or int64), got {cu.dtype}")
        cu = cu.long()
    else:
        try:
            cu = torch.as_tensor(cu, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} must be a 1-D integer tensor or list, got "
                            f"{type(cu).__name__}") from exc
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [0, l1, l1+l2, ..., total] with at least 2 "
                         f"entries, got shape {tuple(cu.shape)}")
    if int(cu[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {cu.tolist()[:8]}")
    if bool((cu.diff() < 0).any()):
        i = int((cu.diff() < 0).nonzero()[0])
        raise ValueError(f"{name} must be non-decreasing (lengths >= 0), got {name}[{i}] = "
                         f"{int(cu[i])} > {name}[{i + 1}] = {int(cu[i + 1])}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"{name} must end at the packed length {total}, got last entry "
                         f"{int(cu[-1])}")
    return cu


def _seq_of(cu: Tensor, length: int) -> Tensor:
    """``(length,)`` sequence index of every packed position (empty sequences skipped)."""
    pos = torch.arange(length, device=cu.device)
    return torch.searchsorted(cu[1:], pos, right=True)


@dataclass(frozen=True, eq=False)
class Varlen(MaskMod):
    """Packed sequences, flash-attn's varlen convention (see the module docstring).

    Attributes:
        cu_q: ``(N + 1,)`` long, cumulative query lengths.
        cu_k: ``(N + 1,)`` long, cumulative key lengths.
        left: keys visible before the query's position (None = all).
        right: keys visible after it (0 = causal, None = all).
    """

    cu_q: Tensor
    cu_k: Tensor
    left: int | None = None
    right: int | None = 0
    seq_q: Tensor = field(init=False, repr=False)
    pos: Tensor = field(init=False, repr=False)
    _seq_k: Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        cu_q = check_cu_seqlens("cu_seqlens_q", self.cu_q)
        cu_k = check_cu_seqlens("cu_seqlens_k", self.cu_k).to(cu_q.device)
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                             f"sequences, got {cu_q.numel() - 1} and {cu_k.numel() - 1}")
        for name in ("left", "right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"window {name} must be a non-negative int or None "
                                 f"(unbounded), got {val!r}")
        T = int(cu_q[-1])
        seq_q = _seq_of(cu_q, T)  # (T,)
        shift = cu_k[1:] - cu_q[1:]  # (N,) key index of a sequence's query 0 minus its row index
        pos = torch.arange(T, device=cu_q.device) + shift[seq_q] if T else seq_q
        for name, val in (("cu_q", cu_q), ("cu_k", cu_k), ("seq_q", seq_q), ("pos", pos)):
            object.__setattr__(self, name, val)

    @property
    def seq_k(self) -> Tensor:
        """``(S,)`` sequence of every key, built on first use (tiles and grids need it)."""
        if self._seq_k is None:
            object.__setattr__(self, "_seq_k", _seq_of(self.cu_k, int(self.cu_k[-1])))
        return self._seq_k

    @property
    def num_sequences(self) -> int:
        return self.cu_q.numel() - 1

    def _window(self, p, k):
        ok = None
        if self.left is not None:
            ok = k >= p - self.left
        if self.right is not None:
            ok = (k <= p + self.right) if ok is None else ok & (k <= p + self.right)
        return ok

    def grid(self, b, h, q, k):
        ok = self.seq_q[q] == self.seq_k[k]
        win = self._window(self.pos[q], k)
        return ok if win is None else ok & win

    def tile(self, B, H, q0, q1, k0, k1, device):
        sq = self.seq_q[q0:q1].view(1, 1, -1, 1)  # (1, 1, nq, 1)
        sk = self.seq_k[k0:k1].view(1, 1, 1, -1)  # (1, 1, 1, nk)
        k = torch.arange(k0, k1, device=sk.device).view(1, 1, 1, -1)  # (1, 1, 1, nk)
        win = self._window(self.pos[q0:q1].view(1, 1, -1, 1), k)
        return (sq == sk) if win is None else (sq == sk) & win

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        cu_k, pos = self.cu_k, self.pos
        sql, sqh = self.seq_q[q_lo], self.seq_q[q_hi]  # (nQ, 1)
        ends = cu_k[1:]
        skl = torch.searchsorted(ends, k_lo.contiguous(), right=True)  # (1, nK)
        skh = torch.searchsorted(ends, k_hi.contiguous(), right=True)
        # Lowest and highest key any query of the block may see: its own sequence's keys,
        # narrowed by the window for the first / last sequence (pos rises within one).
        lo = cu_k[sql] if self.left is None else torch.minimum(
            torch.maximum(cu_k[sql], pos[q_lo] - self.left), cu_k[sql + 1])
        hi = cu_k[sqh + 1] - 1 if self.right is None else torch.maximum(
            torch.minimum(cu_k[sqh + 1] - 1, pos[q_hi] + self.right), cu_k[sqh] - 1)
        some = (sql <= skh) & (skl <= sqh) & (k_lo <= hi) & (k_hi >= lo)  # (nQ, nK)
        every = (sql == sqh) & (skl == skh) & (sql == skl)
        if self.left is not None:
            every = every & (k_lo >= pos[q_hi] - self.left)
        if self.right is not None:
            every = every & (k_hi <= pos[q_lo] + self.right)
        return some, every

    def intervals(self, B, H, q0, q1):
        """The row's own sequence's keys, narrowed by the window around its position."""
        s, p = self.seq_q[q0:q1], self.pos[q0:q1]  # (nq,)
        lo, hi = self.cu_k[s], self.cu_k[s + 1]
        if self.left is not None:
            lo = torch.maximum(lo, p - self.left)
        if self.right is not None:
            hi = torch.minimum(hi, p + self.right + 1)
        return span(lo.view(1, 1, -1), hi.view(1, 1, -1))

    def validate(self, B, H, T, S):
        if int(self.cu_q[-1]) != T:
            raise ValueError(f"cu_seqlens_q must end at the packed query length T = {T}, got "
                             f"{int(self.cu_q[-1])}")
        if int(self.cu_k[-1]) != S:
            raise ValueError(f"cu_seqlens_k must end at the packed key length S = {S}, got "
                             f"{int(self.cu_k[-1])}")

    def describe(self):
        kind = "causal" if self.right == 0 and self.left is None else \
            f"window(left={self.left}, right={self.right})"
        return f"varlen({self.num_sequences} seqs, {kind}, bottom_right)"

    def tensors(self):
        # The per-query arrays are listed too: they are shaped by T, which tells flex not to
        # evaluate this description at padded (bucketed) positions.
        return (self.cu_q, self.cu_k, self.seq_q, self.pos)
