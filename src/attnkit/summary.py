""":class:`BlockSummary`: which tiles of the ``T x S`` grid a mask leaves empty, full or partial.

Built once per call and block size from the mask description's interval arithmetic
(:meth:`attnkit.masks.MaskMod.blocks`: never a ``T x S`` tensor), it is the one object every
reader of block sparsity uses: the ``chunked`` backend plans its key blocks from it, the cost
rules count the pairs it visits, ``flex`` gets a ``BlockMask`` from it
(:meth:`BlockSummary.to_block_mask`), :func:`attnkit.create_block_mask` keeps it
(``BlockMask.summary``), and the explorer draws it. For kinds without interval arithmetic (a
mask function that cannot be read, :mod:`attnkit.masks.traced`) every tile is partial, unless
``refine=True`` evaluates the tiles, one row of tiles at a time.

Shape letters: ``T`` queries, ``S`` keys, ``nQ`` query tiles, ``nK`` key blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _display

__all__ = ["BlockSummary", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_GLYPHS = {EMPTY: ".", PARTIAL: "+", FULL: "#"}


def _bounds(n: int, block: int, device, query: bool):
    """Inclusive first/last index of every block: ``(nB, 1)`` for queries, ``(1, nB)``."""
    lo = torch.arange(0, n, block, device=device)
    hi = (lo + block).clamp(max=n) - 1
    shape = (-1, 1) if query else (1, -1)
    return lo.view(shape), hi.view(shape)


@dataclass(frozen=True, eq=False)
class BlockSummary:
    """Per (query tile, key block): ``EMPTY`` (no visible pair: skip it), ``FULL`` (every pair
    visible: no mask needed) or ``PARTIAL`` (evaluate the mask on it).

    Attributes:
        T, S: queries and keys.
        block_q, block_k: tile sizes (the last tile of each axis may be shorter).
        kind: ``(nQ, nK)`` int8 on the CPU, one of ``EMPTY``, ``PARTIAL``, ``FULL``.
    """

    T: int
    S: int
    block_q: int
    block_k: int
    kind: Tensor

    @classmethod
    def build(cls, mask, T: int, S: int, block_q: int, block_k: int, *,
              refine: bool = False) -> "BlockSummary":
        """Summarise ``mask`` (a resolved description, or None for every key visible).

        Args:
            refine: evaluate the partial tiles of kinds whose interval arithmetic cannot
                decide (mask functions), ``block_q`` query rows at a time, so they become
                empty or full where they are; costs one evaluation of the mask.
        """
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, "
                             f"block_k={block_k}")
        nq, nk = -(-T // block_q), -(-S // block_k)
        if mask is None:
            return cls(T, S, block_q, block_k, torch.full((nq, nk), FULL, dtype=torch.int8))
        tensors = mask.tensors()
        device = tensors[0].device if tensors else None
        q_lo, q_hi = _bounds(T, block_q, device, query=True)
        k_lo, k_hi = _bounds(S, block_k, device, query=False)
        some, every = mask.blocks(q_lo, q_hi, k_lo, k_hi)
        some = torch.broadcast_to(some, (nq, nk))
        every = torch.broadcast_to(every, (nq, nk))
        kind = (some.to(torch.int8) + (some & every).to(torch.int8)).cpu()  # (nQ, nK)
        out = cls(T, S, block_q, block_k, kind)
        return out._refined(mask) if refine else out

    def _refined(self, mask) -> "BlockSummary":
        kind = self.kind.clone()
        for i in range(kind.shape[0]):
            cols = (kind[i] == PARTIAL).nonzero().flatten().tolist()
            if not cols:
                continue
            q0, q1 = i * self.block_q, min((i + 1) * self.block_q, self.T)
            k0, k1 = cols[0] * self.block_k, min((cols[-1] + 1) * self.block_k, self.S)
            m = mask.tile(1, 1, q0, q1, k0, k1, None)
            m = m.reshape(-1, *m.shape[-2:]).expand(-1, q1 - q0, k1 - k0)  # (B*H|1, nq, nk)
            for j in cols:
                a, b = j * self.block_k - k0, min((j + 1) * self.block_k, self.S) - k0
                block = m[..., a:b]
                kind[i, j] = FULL if bool(block.all()) else EMPTY if not bool(block.any()) \
                    else PARTIAL
        return BlockSummary(self.T, self.S, self.block_q, self.block_k, kind)

    def _sizes(self) -> Tensor:
        """``(nQ, nK)`` query-key pairs in each tile."""
        rows = torch.full((self.kind.shape[0],), self.block_q)
        rows[-1:] = self.T - self.block_q * (self.kind.shape[0] - 1)
        cols = torch.full((self.kind.shape[1],), self.block_k)
        cols[-1:] = self.S - self.block_k * (self.kind.shape[1] - 1)
        return rows.view(-1, 1) * cols.view(1, -1)

    def visited_fraction(self) -> float:
        """Fraction of the ``T x S`` pairs in tiles that are not empty."""
        if self.T * self.S == 0:
            return 0.0
        return float((self._sizes() * (self.kind != EMPTY)).sum()) / (self.T * self.S)

    def counts(self) -> dict[str, int]:
        """How many tiles are ``empty``, ``partial`` and ``full``."""
        return {name: int((self.kind == code).sum())
                for name, code in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))}

    def runs(self, i: int, max_block: int | None = None) -> list[tuple[int, int, bool]]:
        """Key ranges of query tile ``i``: ``(k0, k1, partial)`` for every run of non-empty
        blocks of one kind, cut into pieces of at most ``max_block`` keys."""
        row = self.kind[i].tolist()
        out, j = [], 0
        while j < len(row):
            if row[j] == EMPTY:
                j += 1
                continue
            end = j
            while end + 1 < len(row) and row[end + 1] == row[j]:
                end += 1
            k0, k1 = j * self.block_k, min((end + 1) * self.block_k, self.S)
            step = max_block or (k1 - k0)
            out += [(c, min(c + step, k1), row[j] == PARTIAL) for c in range(k0, k1, step)]
            j = end + 1
        return out

    def tiles(self, max_block: int | None = None):
        """``(q0, q1, runs)`` for every query tile (see :meth:`runs`)."""
        return [(i * self.block_q, min((i + 1) * self.block_q, self.T), self.runs(i, max_block))
                for i in range(self.kind.shape[0])]

    def to_block_mask(self, mask_mod, device=None):
        """torch's ``BlockMask`` with this sparsity and ``mask_mod`` for the partial tiles."""
        from torch.nn.attention.flex_attention import BlockMask

        def listing(sel):  # (nQ, nK) bool -> counts (1, 1, nQ), indices (1, 1, nQ, nK)
            order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
            return (sel.sum(-1).to(torch.int32)[None, None].to(device),
                    order.to(torch.int32)[None, None].to(device))

        kv_num, kv_idx = listing(self.kind == PARTIAL)
        full_num, full_idx = listing(self.kind == FULL)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                        BLOCK_SIZE=(self.block_q, self.block_k),
                                        mask_mod=mask_mod, seq_lengths=(self.T, self.S))

    # In a notebook: a picture (attnkit._display); str() stays the text everywhere else.
    _repr_html_ = _display.summary_html
    _repr_png_ = _display.summary_png

    def __str__(self) -> str:
        head = (f"BlockSummary(T={self.T}, S={self.S}, tiles {self.block_q}x{self.block_k}: "
                f"{self.counts()}, visited {self.visited_fraction():.1%})")
        if self.kind.numel() > 64 * 64:
            return head
        rows = ["".join(_GLYPHS[c] for c in r) for r in self.kind.tolist()]
        return "\n".join([head, *rows])
