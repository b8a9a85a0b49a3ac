"""A paged KV cache: fixed-size pages in one shared pool, a block table per sequence.

Serving many sequences of different lengths from one preallocated buffer: each sequence owns
a list of pages (its *block table*); page ``p`` holds ``page_size`` consecutive positions of
that sequence in pool slots ``p * page_size .. (p + 1) * page_size - 1``. Sequences grow page
by page and give their pages back when they finish, so memory follows the tokens actually
held, not ``batch x max_len``.

Attention reads the pages **in place**: the block table is cut into runs of consecutive pool
pages, each run is a view of the pool (no copy), attention runs on each run through
:func:`attnkit.attention` with ``return_lse`` (so any backend that serves it, and the decode
backend when present, does the work), and the partial results are merged by log-sum-exp
(:func:`attnkit.functional.merge_partial_attention`). :meth:`PagedKVCache.allocate` hands a
sequence contiguous pages when it can, so a sequence reserved up front is one run.

Shape letters: ``H`` query heads, ``Hkv`` key/value heads, ``Lq`` new queries, ``n`` tokens
written, ``D`` head dim, ``P`` pages in the pool, ``ps`` page size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import attention
from .functional import merge_partial_attention

__all__ = ["MemoryReport", "PagedKVCache", "attend_pages", "page_runs", "paged_attention"]


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def page_runs(block_table: list[int], seq_len: int, page_size: int) -> list[tuple[int, int, int]]:
    """``[(first pool slot, first position, tokens), ...]``: the filled part of a block table
    cut into runs of consecutive pool pages."""
    runs: list[list[int]] = []
    for i in range(math.ceil(seq_len / page_size)):
        page = block_table[i]
        if runs and page == runs[-1][3] + 1:
            runs[-1][3] = page
        else:
            runs.append([page * page_size, i * page_size, 0, page])
    for run in runs:
        run[2] = min(seq_len - run[1], (run[3] + 1) * page_size - run[0])
    return [(slot, pos, n) for slot, pos, n, _ in runs]


def _check_table(block_table, seq_len: int, page_size: int, num_pages: int) -> list[int]:
    table = block_table.tolist() if isinstance(block_table, Tensor) else list(block_table)
    for i, page in enumerate(table):
        if not isinstance(page, int) or not 0 <= page < num_pages:
            raise ValueError(f"block_table[{i}] = {page!r} points past the pool of {num_pages} "
                             f"pages (valid pages 0..{num_pages - 1})")
    if not 0 <= seq_len <= len(table) * page_size:
        raise ValueError(f"seq_len = {seq_len} is longer than its {len(table)} pages of "
                         f"{page_size} tokens in block_table (at most {len(table) * page_size})")
    return table


def attend_pages(q: Tensor, k_pool: Tensor, v_pool: Tensor, table: list[int], seq_len: int,
                 page_size: int, *, start: int = 0, left: int | None = None,
                 right: int | None = 0, alibi_slopes: Tensor | None = None,
                 softcap: float | None = None, scale: float | None = None,
                 backend: str = "auto") -> tuple[Tensor | None, Tensor | None]:
    """The building block of paged attention: ``(out, lse)`` of ``q`` over the positions
    ``start .. seq_len - 1`` of a block table, read in place run by run and merged by
    log-sum-exp (no sinks).

    Query ``i`` sits at position ``seq_len - Lq + i`` (bottom-right; negative when there are
    more queries than positions) and sees key position ``j`` iff ``p - left <= j <= p +
    right`` (``None`` = unbounded; ``right = 0`` is causal). ALiBi distances are between
    those positions.

    Args:
        q: ``(1, H, Lq, D)``.
        k_pool, v_pool: ``(Hkv, P * page_size, D)`` / ``(Hkv, P * page_size, Dv)``.
        table: the sequence's pages, checked by the caller.
        seq_len: positions held.
        page_size: positions per page.
        start: first visible position (flash-attn's ``cache_leftpad``).
        left, right: the window's sides.
        alibi_slopes: ``(H,)``.
        softcap, scale, backend: as :func:`attnkit.attention`.

    Returns:
        ``(out (1, H, Lq, Dv), lse (1, H, Lq))``, or ``(None, None)`` when no run holds a
        visible key.
    """
    Lq = q.shape[2]
    first_q = seq_len - Lq  # position of query 0
    out = lse = None
    for slot, pos, n in page_runs(table, seq_len, page_size):
        if pos + n <= start:
            continue  # wholly before the first visible position
        if pos < start:  # trim the run's head
            slot, n, pos = slot + start - pos, n - (start - pos), start
        if left is not None and pos + n - 1 < first_q - left:
            continue  # older than every query's window
        if right is not None and pos > first_q + Lq - 1 + right:
            continue  # newer than every query may look
        offset = first_q - pos  # run-local key j is at query i's distance i + offset - j
        k = k_pool[:, slot:slot + n].unsqueeze(0)  # (1, Hkv, n, D): a view of the pool
        v = v_pool[:, slot:slot + n].unsqueeze(0)  # (1, Hkv, n, Dv)
        window = None if left is None and right is None else (
            -1 if left is None else left, -1 if right is None else right)
        o, l_ = attention(q, k, v, window=window, causal_align=offset,
                          alibi_slopes=alibi_slopes, softcap=softcap, scale=scale,
                          backend=backend, return_lse=True)
        out, lse = (o, l_) if out is None else merge_partial_attention(out, lse, o, l_)
    return out, lse


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table, seq_len: int, *,
                    page_size: int, window: int | None = None, softcap: float | None = None,
                    sinks: Tensor | None = None, scale: float | None = None,
                    backend: str = "auto") -> Tensor:
    """One sequence's ``Lq`` newest queries over its keys in a paged pool, read in place.

    Args:
        q: ``(1, H, Lq, D)``: the queries of positions ``seq_len - Lq .. seq_len - 1``
            (causal aligned bottom-right: a prefill chunk or one decode token).
        k_pool: ``(Hkv, P * page_size, D)`` one layer's key pool.
        v_pool: ``(Hkv, P * page_size, Dv)`` its values.
        block_table: the sequence's pages in order (list or 1-D tensor of pool page ids).
        seq_len: positions held, the new ones included.
        page_size: positions per page.
        window: at most this many most recent keys per query (itself included).
        softcap, sinks, scale, backend: as :func:`attnkit.attention`.

    Returns:
        ``(1, H, Lq, Dv)`` in q's dtype.

    Raises:
        ValueError: a page id outside the pool, ``seq_len`` beyond the table's pages, more
            queries than positions, or a pool whose length is not a multiple of the page size.
    """
    if k_pool.dim() != 3 or k_pool.shape[1] % page_size:
        raise ValueError(f"k_pool must be (Hkv, num_pages * page_size, D) with page_size = "
                         f"{page_size}, got shape {tuple(k_pool.shape)}")
    table = _check_table(block_table, seq_len, page_size, k_pool.shape[1] // page_size)
    Lq = q.shape[2]
    if Lq > seq_len:
        raise ValueError(f"q has {Lq} queries but seq_len is {seq_len}: the queries must be "
                         f"the newest positions of the sequence, written before attending")
    if window is not None:
        _positive("window", window)
    out, lse = attend_pages(q, k_pool, v_pool, table, seq_len, page_size,
                            left=None if window is None else window - 1, right=0,
                            softcap=softcap, scale=scale, backend=backend)
    if out is None:
        return q.new_zeros(*q.shape[:3], v_pool.shape[-1])  # (1, H, Lq, Dv)
    if sinks is not None:  # one extra logit per head, counted once: out * e^lse / (e^lse + e^s)
        share = torch.sigmoid(lse - sinks.to(lse.dtype).view(1, -1, 1))  # (1, H, Lq)
        out = (out * share.unsqueeze(-1).to(out.dtype)).to(q.dtype)
    return out


@dataclass(frozen=True)
class MemoryReport:
    """What a :class:`PagedKVCache` holds.

    Attributes:
        bytes_per_token: key + value bytes of one position over all layers.
        pool_bytes: the whole pool.
        pages_in_use, pages_total: pages held by sequences / in the pool.
        sequences: sequences holding pages.
        tokens: positions reserved by all sequences.
        fragmentation: share of the held pages' slots not holding a position (the tail of
            each sequence's last page); 0 when every held slot is used.
        runs: runs of consecutive pool pages over all sequences (one per sequence is ideal:
            each run is one attention call per layer).
    """

    bytes_per_token: int
    pool_bytes: int
    pages_in_use: int
    pages_total: int
    sequences: int
    tokens: int
    fragmentation: float
    runs: int

    def __str__(self) -> str:
        return (f"{self.pages_in_use}/{self.pages_total} pages in use by {self.sequences} "
                f"sequences ({self.tokens} tokens, {self.bytes_per_token} B/token, pool "
                f"{self.pool_bytes / 2**20:.1f} MiB), fragmentation {self.fragmentation:.1%}, "
                f"{self.runs} runs")


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size pages.

    ::

        cache = PagedKVCache(num_pages=64, page_size=16, num_kv_heads=2, head_dim=32,
                             num_layers=4)
        cache.allocate("a", capacity=100)     # contiguous pages when the pool allows
        start = cache.reserve("a", 7)         # 7 new positions; pages added as needed
        for layer in range(4):
            cache.write(layer, "a", start, k, v)          # k, v (Hkv, 7, D)
            out = cache.attend(layer, "a", q)             # q (1, H, 7, D)
        cache.free("a")                       # its pages go back to the pool

    Args:
        num_pages: ``P``, pages in the pool.
        page_size: positions per page.
        num_kv_heads: ``Hkv``.
        head_dim: ``D``.
        num_layers: layers sharing the block tables (one pool slice each).
        dtype, device: of the pool.

    Raises:
        ValueError: a size that is not a positive int.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 num_layers: int = 1, dtype: torch.dtype = torch.float32, device=None):
        for name, val in (("num_pages", num_pages), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("num_layers", num_layers)):
            _positive(name, val)
        self.page_size, self.num_pages, self.num_layers = page_size, num_pages, num_layers
        shape = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, P * ps, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, Hkv, P * ps, D)
        self._used = [False] * num_pages
        self.block_tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    # --- pages -----------------------------------------------------------------------------
    def _take(self, n: int, after: int | None, seq_id) -> list[int]:
        """``n`` free pages, marked used (all or nothing): the page after ``after`` when
        ``n == 1`` and it is free, else the first contiguous run, else the lowest free."""
        if n == 0:
            return []  # an empty sequence holds no page, even in a full pool
        free = [p for p, used in enumerate(self._used) if not used]
        if n > len(free):
            raise RuntimeError(f"the page pool is full: sequence {seq_id!r} needs {n} more "
                               f"page(s) of {self.page_size} tokens, {len(free)} of "
                               f"{self.num_pages} are free; free() a finished sequence or "
                               f"make num_pages larger")
        if after is not None and n == 1 and after + 1 < self.num_pages \
                and not self._used[after + 1]:
            pages = [after + 1]  # keep the sequence's run going
        else:
            pages = free[:n]  # first fit of a contiguous run, else the lowest free pages
            for i in range(len(free) - n + 1):
                if free[i + n - 1] - free[i] == n - 1:
                    pages = free[i:i + n]
                    break
        for p in pages:
            self._used[p] = True
        return pages

    def allocate(self, seq_id, capacity: int = 0) -> None:
        """Start an empty sequence, reserving pages for ``capacity`` positions up front
        (contiguous when the pool allows).

        Raises:
            ValueError: ``seq_id`` already present or a negative capacity.
            RuntimeError: not enough free pages (nothing is taken).
        """
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id!r} is already in the cache; free() it first")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.block_tables[seq_id] = self._take(math.ceil(capacity / self.page_size), None,
                                               seq_id)
        self.lengths[seq_id] = 0

    def _seq(self, seq_id) -> list[int]:
        if seq_id not in self.block_tables:
            raise KeyError(f"sequence {seq_id!r} is not in the cache (allocate() it); "
                           f"present: {list(self.block_tables)[:8]}")
        return self.block_tables[seq_id]

    def reserve(self, seq_id, n: int) -> int:
        """Make room for ``n`` new positions of ``seq_id``; returns the first one.

        Raises:
            KeyError: an unknown sequence.
            ValueError: ``n`` not an int >= 0.
            RuntimeError: the pool has too few free pages (nothing is taken).
        """
        table = self._seq(seq_id)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0 (new positions), got {n!r}")
        start = self.lengths[seq_id]
        missing = math.ceil((start + n) / self.page_size) - len(table)
        while missing > 0:  # one page at a time, so each can continue the run
            table += self._take(1, table[-1] if table else None, seq_id) if missing == 1 else \
                self._take(missing, None, seq_id)
            missing = math.ceil((start + n) / self.page_size) - len(table)
        self.lengths[seq_id] = start + n
        return start

    def free(self, seq_id) -> None:
        """Give ``seq_id``'s pages back to the pool."""
        for p in self._seq(seq_id):
            self._used[p] = False
        del self.block_tables[seq_id], self.lengths[seq_id]

    # --- keys, values, attention -----------------------------------------------------------
    def write(self, layer: int, seq_id, start: int, k: Tensor, v: Tensor) -> None:
        """Store ``k, v (Hkv, n, D)`` at positions ``start .. start + n - 1`` of ``layer``.

        Raises:
            ValueError: positions beyond what :meth:`reserve` made room for, or shapes that
                do not fit the pool.
        """
        table, n = self._seq(seq_id), k.shape[1]
        if start < 0 or start + n > self.lengths[seq_id]:
            raise ValueError(f"writing positions {start}..{start + n - 1} of sequence "
                             f"{seq_id!r}, longer than its {self.lengths[seq_id]} reserved "
                             f"positions ({len(table)} pages): reserve() them first")
        if k.shape != v.shape or k.shape[0] != self.k.shape[1] or k.shape[2] != self.k.shape[3]:
            raise ValueError(f"k and v must be (Hkv, n, D) = ({self.k.shape[1]}, n, "
                             f"{self.k.shape[3]}), got {tuple(k.shape)} and {tuple(v.shape)}")
        pos = torch.arange(start, start + n)
        pages = torch.tensor(table, dtype=torch.long)[pos // self.page_size]
        slots = (pages * self.page_size + pos % self.page_size).to(self.k.device)  # (n,)
        self.k[layer].index_copy_(1, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(1, slots, v.to(self.v.dtype))

    def attend(self, layer: int, seq_id, q: Tensor, **kwargs) -> Tensor:
        """:func:`paged_attention` of ``q (1, H, Lq, D)``, the sequence's newest positions,
        over its pages of ``layer``; keyword arguments as there."""
        return paged_attention(q, self.k[layer], self.v[layer], self._seq(seq_id),
                               self.lengths[seq_id], page_size=self.page_size, **kwargs)

    def memory_report(self) -> MemoryReport:
        """Bytes per token, pages in use, fragmentation and runs (:class:`MemoryReport`)."""
        L, Hkv, _, D = self.k.shape
        per_token = 2 * L * Hkv * D * self.k.element_size()
        in_use = sum(len(t) for t in self.block_tables.values())
        tokens = sum(self.lengths.values())
        runs = sum(len(page_runs(t, len(t) * self.page_size, self.page_size))
                   for t in self.block_tables.values() if t)
        frag = 1.0 - tokens / (in_use * self.page_size) if in_use else 0.0
        return MemoryReport(per_token, per_token * self.num_pages * self.page_size, in_use,
                            self.num_pages, len(self.block_tables), tokens, frag, runs)
