"""FlexAttention's front end, run eagerly by attnkit: no compile, no recompiles, gradients
on CPU.

:func:`flex_attention` has ``torch.nn.attention.flex_attention``'s signature and semantics,
so code written for FlexAttention runs unchanged on attnkit's backends (``chunked`` for long
or sparse calls, ``sdpa``/``math`` for small ones; never the compiled ``flex`` backend)::

    from torch.nn.attention.flex_attention import create_block_mask   # or attnkit's
    block_mask = create_block_mask(causal, None, None, T, T, device="cpu")
    out = attnkit.flex_attention(q, k, v, score_mod=softcap, block_mask=block_mask)
    out.sum().backward()                                      # exact, on CPU

What each argument becomes:

* a torch ``BlockMask`` is read as the plan: its ``kv_num_blocks``/``kv_indices`` (partial
  tiles) and ``full_kv_*`` (full tiles) become a per-tile grid (:class:`BlockGrid`) at its
  ``BLOCK_SIZE``; tiles it does not list are skipped, its full tiles get no mask, and its
  ``mask_mod`` is evaluated only on the partial tiles, exactly torch's semantics. One that
  amounts to causal or a sliding window (verified exactly, :func:`_recognise`) runs as that
  kind, so plain causal reaches SDPA's ``is_causal``. The
  ``mask_mod`` is called on broadcast index tensors (``b (B,1,1,1)``, ``h (1,H,1,1)``,
  ``q_idx (1,1,nq,1)``, ``kv_idx (1,1,1,nk)``); one that only works on scalars is run under
  ``torch.vmap`` as torch does (:class:`TorchMaskFn`);
* an attnkit :class:`BlockMask` (from :func:`create_block_mask`) keeps the description, so
  the backend also sees its interval arithmetic at its own tile sizes;
* ``score_mod(score, b, h, q_idx, kv_idx)`` is a score function (:class:`TorchScoreFn`);
  tensors it captures (a learnable bias table) get gradients.

:func:`create_block_mask` builds the block summary from the description's interval
arithmetic where the kind has one (causal, windows, documents, prefix-LM, dilated, ...:
``O(nQ x nK)`` work, no ``T x S`` tensor) and evaluates the tiles of an opaque mask function
one row of tiles at a time otherwise.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries
(torch's ``L``), ``S`` keys, ``D`` head dim, ``nQ``/``nK`` query/key tiles.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _display
from .masks.base import MaskFn, MaskMod, as_mask_mod
from .scores import ScoreFn, ScoreMod
from .spec import MaskSpec
from .summary import EMPTY, FULL, PARTIAL, BlockSummary

__all__ = [
    "BlockGrid",
    "BlockMask",
    "TorchMaskFn",
    "TorchScoreFn",
    "create_block_mask",
    "flex_attention",
]


# --- torch-style functions ------------------------------------------------------------------

def _flat(*idx):
    return tuple(t.reshape(-1) for t in idx)


@dataclass(frozen=True, eq=False)
class TorchMaskFn(MaskFn):
    """A FlexAttention ``mask_mod``: called on broadcast index tensors (fast, works for most
    ``&``/``|``/indexing code); if that raises or returns something else than a bool tensor
    of the grid's shape, run under ``torch.vmap`` over scalars, as torch does."""

    _vmap: list = field(default_factory=lambda: [False], repr=False)

    def grid(self, b, h, q, k):
        if not self._vmap[0]:
            try:
                out = self.fn(b, h, q, k)
                if isinstance(out, Tensor) and out.dtype == torch.bool and out.dim() <= 4:
                    torch.broadcast_shapes(out.shape, torch.broadcast_shapes(
                        b.shape, h.shape, q.shape, k.shape))
                    return out
            except Exception:  # noqa: BLE001, S110 - written for scalars: vmap below
                pass
            self._vmap[0] = True
        from torch.nn.attention.flex_attention import _vmap_for_bhqkv

        fn = _vmap_for_bhqkv(self.fn, prefix=())
        out = fn(*_flat(b, h, q, k))
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"mask_mod {self.describe()!r} must return a bool tensor (True = "
                            f"may attend), got {got}; combine conditions with &, |, ~ or "
                            f"torch.where, not Python if/and/or")
        return out.view(b.shape[0], h.shape[1], q.shape[2], k.shape[3])


def _captured_tensors(fn) -> tuple:
    """Tensors a function closes over or reads as globals (a learnable bias table)."""
    try:
        cv = inspect.getclosurevars(fn)
    except (TypeError, ValueError):
        return ()
    found = [v for v in (*cv.nonlocals.values(), *cv.globals.values()) if isinstance(v, Tensor)]
    return tuple({id(t): t for t in found}.values())


@dataclass(frozen=True, eq=False)
class TorchScoreFn(ScoreFn):
    """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``; broadcast first, ``vmap``
    if needed. The tensors it captures are reported by :meth:`tensors`, so the chunked
    backend differentiates through them."""

    _vmap: list = field(default_factory=lambda: [False], repr=False)

    def apply(self, score, b, h, q, k):
        if not self._vmap[0]:
            try:
                out = self.fn(score, b, h, q, k)
                if isinstance(out, Tensor) and out.shape == score.shape:
                    return out
                if isinstance(out, Tensor) and out.dim() <= 4:
                    return out.expand(score.shape)
            except Exception:  # noqa: BLE001, S110 - written for scalars: vmap below
                pass
            self._vmap[0] = True
        from torch.nn.attention.flex_attention import _vmap_for_bhqkv

        fn = _vmap_for_bhqkv(self.fn, prefix=(0,))
        B, H, nq, nk = score.shape
        idx = [t.expand(n).contiguous() if t.numel() == 1 else t.reshape(-1)
               for t, n in zip((b, h, q, k), (B, H, nq, nk))]
        return fn(score, *idx)

    def tensors(self):
        return _captured_tensors(self.fn)


# --- a mask read through a block grid -------------------------------------------------------

def _prefix(x: Tensor) -> Tensor:
    """2-D inclusive prefix sums with a zero row and column in front: ``(nQ+1, nK+1)``."""
    out = torch.zeros(x.shape[0] + 1, x.shape[1] + 1, dtype=torch.int64, device=x.device)
    out[1:, 1:] = x.to(torch.int64).cumsum(0).cumsum(1)
    return out


@dataclass(frozen=True, eq=False)
class BlockGrid(MaskMod):
    """``mod`` read through a per-tile grid ``kind (Bg, Hg, nQ, nK)`` of EMPTY / PARTIAL /
    FULL at ``block_q x block_k`` (``Bg``, ``Hg`` are 1 or the call's B, H).

    With ``authoritative`` (a torch ``BlockMask``) the grid decides, as in FlexAttention:
    unlisted tiles are hidden, full tiles visible, ``mod`` is evaluated only in partial
    tiles. Without it the grid is a summary of ``mod`` itself (:func:`create_block_mask`),
    so it only narrows the block plan and ``mod`` is evaluated as is. :meth:`blocks` answers
    for any tile size from prefix sums over the grid, ANDed with ``mod``'s own interval
    arithmetic when that is valid.
    """

    mod: MaskMod
    kind: Tensor
    block_q: int
    block_k: int
    seq_lengths: tuple
    authoritative: bool = True
    _sums: dict = field(default_factory=dict, repr=False)

    def _counts(self):
        if not self._sums:
            k = self.kind
            self._sums["some"] = _prefix((k != EMPTY).flatten(0, -3).any(0))
            self._sums["full"] = _prefix((k == FULL).flatten(0, -3).all(0))
            self._sums["partial"] = _prefix((k == PARTIAL).flatten(0, -3).all(0))
        return self._sums

    def _range(self, name, q_lo, q_hi, k_lo, k_hi):
        """How many tiles of the grid touched by each block are of ``name``, and how many
        tiles the block touches."""
        nq, nk = self.kind.shape[-2:]
        r0, r1 = (q_lo // self.block_q).clamp(max=nq - 1), (q_hi // self.block_q).clamp(max=nq - 1)
        c0, c1 = (k_lo // self.block_k).clamp(max=nk - 1), (k_hi // self.block_k).clamp(max=nk - 1)
        P = self._counts()[name]
        got = P[r1 + 1, c1 + 1] - P[r0, c1 + 1] - P[r1 + 1, c0] + P[r0, c0]
        return got, (r1 - r0 + 1) * (c1 - c0 + 1)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        dev = self.kind.device
        q_lo, q_hi, k_lo, k_hi = (t.to(dev) for t in (q_lo, q_hi, k_lo, k_hi))
        some, _ = self._range("some", q_lo, q_hi, k_lo, k_hi)
        full, area = self._range("full", q_lo, q_hi, k_lo, k_hi)
        some, every = some > 0, full == area
        if not self.authoritative:
            s, e = self.mod.blocks(q_lo, q_hi, k_lo, k_hi)
            some, every = some & s, every | e
        return some, every

    def _lookup(self, b, h, q, k) -> Tensor:
        """The grid's kind at each (b, h, q, k), broadcast."""
        Bg, Hg = self.kind.shape[:2]
        b = b if Bg > 1 else torch.zeros_like(b)
        h = h if Hg > 1 else torch.zeros_like(h)
        return self.kind[b, h, q // self.block_q, k // self.block_k]

    def grid(self, b, h, q, k):
        if not self.authoritative:
            return self.mod.grid(b, h, q, k)
        kd = self._lookup(b, h, q, k)
        return (kd == FULL) | ((kd == PARTIAL) & self.mod.grid(b, h, q, k))

    def tile(self, B, H, q0, q1, k0, k1, device):
        inner = self.mod.tile(B, H, q0, q1, k0, k1, device)
        if not self.authoritative:
            return inner
        bounds = [torch.tensor([[x]], device=self.kind.device) for x in (q0, q1 - 1, k0, k1 - 1)]
        partial, area = self._range("partial", *bounds)
        if int(partial) == int(area):  # inside partial tiles only: the mask_mod decides
            return inner
        bq, bk = self.block_q, self.block_k
        r0, c0 = q0 // bq, k0 // bk
        kd = self.kind[..., r0:(q1 - 1) // bq + 1, c0:(k1 - 1) // bk + 1]  # a few tiles
        kd = kd.repeat_interleave(bq, -2)[..., q0 - r0 * bq:q1 - r0 * bq, :]
        kd = kd.repeat_interleave(bk, -1)[..., k0 - c0 * bk:k1 - c0 * bk].to(device)
        return (kd == FULL) | ((kd == PARTIAL) & inner)  # (Bg, Hg, nq, nk)

    def validate(self, B, H, T, S):
        Bg, Hg = self.kind.shape[:2]
        if tuple(self.seq_lengths) != (T, S):
            raise ValueError(f"block_mask was made for (Q_LEN, KV_LEN) = "
                             f"{tuple(self.seq_lengths)}, but the call has T={T} queries and "
                             f"S={S} keys; create it with Q_LEN={T}, KV_LEN={S}")
        if Bg not in (1, B) or Hg not in (1, H):
            raise ValueError(f"block_mask has B={Bg}, H={Hg}; the call has B={B}, H={H} "
                             f"(create it with B and H equal to those, or None to broadcast)")
        self.mod.validate(B, H, T, S)

    def describe(self):
        c = {n: int((self.kind == v).sum()) for n, v in (("partial", PARTIAL), ("full", FULL))}
        return (f"block_mask({self.mod.describe()}, {self.block_q}x{self.block_k}, "
                f"{c['partial']} partial + {c['full']} full tiles)")

    def tensors(self):
        return (self.kind, *self.mod.tensors())


def _grid_from_torch(bm) -> BlockGrid:
    """A torch ``BlockMask`` as a :class:`BlockGrid` (nothing evaluated)."""
    bq, bk = bm.BLOCK_SIZE
    T, S = bm.seq_lengths
    nq, nk = -(-T // bq), -(-S // bk)
    num = bm.kv_num_blocks
    Bg, Hg = num.shape[:2]
    kind = torch.zeros(Bg, Hg, num.shape[2], nk + 1, dtype=torch.int8, device=num.device)

    def mark(counts, indices, code):
        if counts is None:
            return
        slots = torch.arange(indices.shape[-1], device=indices.device)
        idx = torch.where(slots < counts[..., None], indices.long(), nk)  # unused -> dump column
        kind.scatter_(-1, idx.clamp(max=nk), code)

    mark(bm.kv_num_blocks, bm.kv_indices, PARTIAL)
    mark(bm.full_kv_num_blocks, bm.full_kv_indices, FULL)
    kind = kind[..., :nk][..., :nq, :].contiguous()  # (Bg, Hg, nQ, nK)
    mod = bm.mask_mod
    mod = mod if isinstance(mod, MaskMod) else TorchMaskFn(mod)
    return BlockGrid(mod, kind, bq, bk, (T, S), authoritative=True)


def _recognise(grid: BlockGrid, B: int, H: int) -> MaskMod | None:
    """The structural kind (causal or a window) a torch ``BlockMask`` amounts to, or None.

    A candidate is read off the first and last query rows of ``mask_mod``, then verified
    exactly: its
    interval arithmetic must call every empty tile of the grid empty and every full tile
    full, and it must equal ``mask_mod`` on every partial tile, for every batch and head of
    the call. Then the engine's lowering sees a kind it knows (plain causal reaches SDPA's
    ``is_causal``; windows get chunked's tight plans) instead of an opaque function.
    """
    from .masks.structural import Causal, Window

    kind = grid.kind
    if kind.shape[:2] != (1, 1):
        return None
    T, S = grid.seq_lengths
    ends = []
    for q in (0, T - 1):  # the first row bounds the right side, the last row the left
        row = grid.mod.tile(1, 1, q, q + 1, 0, S, None).reshape(-1)
        if row.numel() != S or not bool(row.any()):
            return None
        seen = row.nonzero().flatten()
        lo, hi = int(seen[0]), int(seen[-1])
        if int(seen.numel()) != hi - lo + 1:
            return None
        ends.append((lo, hi))
    right = None if ends[0][1] == S - 1 else ends[0][1]
    left = None if ends[1][0] == 0 else T - 1 - ends[1][0]
    if left is None and right is None or left is not None and left < 0:
        return None
    cand = Causal(offset=0) if left is None and right == 0 else \
        Window(left=left, right=right, offset=0)
    bq, bk = grid.block_q, grid.block_k
    q_lo = torch.arange(0, T, bq).view(-1, 1)
    k_lo = torch.arange(0, S, bk).view(1, -1)
    some, every = cand.blocks(q_lo, (q_lo + bq).clamp(max=T) - 1, k_lo,
                              (k_lo + bk).clamp(max=S) - 1)
    k2 = kind[0, 0].cpu()
    some, every = torch.broadcast_to(some, k2.shape), torch.broadcast_to(every, k2.shape)
    if bool((some & (k2 == EMPTY)).any()) or bool((~every & (k2 == FULL)).any()):
        return None
    for i in range(k2.shape[0]):
        cols = (k2[i] == PARTIAL).nonzero().flatten()
        if cols.numel() == 0:
            continue
        q0, q1 = i * bq, min((i + 1) * bq, T)
        k0, k1 = int(cols[0]) * bk, min((int(cols[-1]) + 1) * bk, S)
        want = grid.mod.tile(B, H, q0, q1, k0, k1, kind.device)
        got = cand.tile(B, H, q0, q1, k0, k1, kind.device)
        inside = (k2[i, torch.arange(k0, k1) // bk] == PARTIAL).to(kind.device)  # (nk,)
        if not bool(((want == got) | ~inside).all()):
            return None
    return cand


_recognised: dict = {}  # id(torch BlockMask) -> (BlockMask, kind or None), a few recent


def _from_torch(bm, B: int, H: int) -> MaskMod:
    key = (id(bm), B, H)
    hit = _recognised.get(key)
    if hit is not None and hit[0] is bm:
        return hit[1]
    grid = _grid_from_torch(bm)
    try:
        mod = _recognise(grid, B, H) or grid
    except Exception:  # noqa: BLE001 - a mask_mod the probe cannot run: keep it opaque
        mod = grid
    _recognised[key] = (bm, mod)
    while len(_recognised) > 8:
        _recognised.pop(next(iter(_recognised)))
    return mod


# --- attnkit's BlockMask and create_block_mask ---------------------------------------------

@dataclass(frozen=True, eq=False)
class BlockMask:
    """What :func:`create_block_mask` returns: the mask description and its block summary
    (no ``T x S`` tensor). Pass it to :func:`flex_attention`, or :meth:`to_torch` for
    torch's ``flex_attention``.

    Attributes:
        mask_mod: the description, resolved for ``seq_lengths``.
        summary: the :class:`~attnkit.summary.BlockSummary` at ``BLOCK_SIZE``.
        B, H: the batch and heads it was built for (1 = broadcast).
    """

    mask_mod: MaskMod
    summary: BlockSummary
    B: int = 1
    H: int = 1

    @property
    def BLOCK_SIZE(self) -> tuple:
        return (self.summary.block_q, self.summary.block_k)

    @property
    def seq_lengths(self) -> tuple:
        return (self.summary.T, self.summary.S)

    @property
    def shape(self) -> tuple:
        return (self.B, self.H, *self.seq_lengths)

    def sparsity(self) -> float:
        """Percent of tiles that are skipped (torch's ``BlockMask.sparsity``)."""
        return 100.0 * float((self.summary.kind == EMPTY).float().mean())

    def as_mask(self) -> MaskMod:
        """What :func:`flex_attention` runs: the description itself when it has interval
        arithmetic of its own (the engine's lowering and block plans see it, so causal
        reaches SDPA's ``is_causal``), else the description read through this summary."""
        if not _opaque(self.mask_mod):
            return self.mask_mod
        return BlockGrid(self.mask_mod, self.summary.kind[None, None], self.summary.block_q,
                         self.summary.block_k, self.seq_lengths, authoritative=False)

    def to_torch(self, device=None):
        """torch's ``BlockMask`` with this sparsity, for ``torch``'s ``flex_attention``."""
        return self.summary.to_block_mask(self.mask_mod, device)

    # In a notebook: a picture (attnkit._display); str() stays the text everywhere else.
    _repr_html_ = _display.block_mask_html
    _repr_png_ = _display.block_mask_png

    def __str__(self):
        return f"attnkit.BlockMask(shape={self.shape}, sparsity={self.sparsity():.1f}%)\n" \
            f"{self.summary}"


def _opaque(mod) -> bool:
    """Whether some leaf of ``mod`` has no interval arithmetic of its own."""
    parts = getattr(mod, "parts", None)
    if parts:
        return any(_opaque(p) for p in parts)
    inner = getattr(mod, "mod", None)
    if isinstance(inner, MaskMod):
        return _opaque(inner)
    return type(mod).blocks is MaskMod.blocks


def _evaluate_partial(mod: MaskMod, summary: BlockSummary, B: int, H: int, device) -> Tensor:
    """The summary's partial tiles decided by evaluating ``mod`` one row of tiles at a time
    (``B x H x block_q x span`` bools at most)."""
    kind = summary.kind.clone()
    bq, bk, T, S = summary.block_q, summary.block_k, summary.T, summary.S
    for i in range(kind.shape[0]):
        cols = (kind[i] == PARTIAL).nonzero().flatten()
        if cols.numel() == 0:
            continue
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        q0, q1, k0, k1 = i * bq, min((i + 1) * bq, T), c0 * bk, min(c1 * bk, S)
        m = mod.tile(B, H, q0, q1, k0, k1, device)
        m = torch.broadcast_to(m, (*m.shape[:-2], q1 - q0, k1 - k0)).reshape(-1, q1 - q0, k1 - k0)
        pad = (c1 - c0) * bk - (k1 - k0)  # the last key block may be short
        shape = (m.shape[0], q1 - q0, c1 - c0, bk)  # (BH, nq, blocks, bk)
        pad_with = torch.nn.functional.pad
        some = pad_with(m, (0, pad), value=False).view(shape).any(-1).any(1).any(0)
        every = pad_with(m, (0, pad), value=True).view(shape).all(-1).all(1).all(0)
        new = torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8)
        row = kind[i, c0:c1]
        kind[i, c0:c1] = torch.where(row == PARTIAL, new.cpu(), row)
    return kind


def create_block_mask(mask_mod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE: int | tuple = 128, _compile: bool = False,
                      **_ignored) -> BlockMask:
    """torch's ``create_block_mask`` from attnkit's block summaries.

    Args:
        mask_mod: an attnkit description (:mod:`attnkit.masks`: interval arithmetic, no mask
            evaluated) or a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (its partial
            tiles are evaluated, one row of tiles at a time; never a ``T x S`` tensor).
        B, H: batch and heads the mask depends on; None = 1 (broadcast), as in torch.
        Q_LEN, KV_LEN: queries and keys.
        device: where an evaluated ``mask_mod`` runs (default: its tensors' device or CPU).
        BLOCK_SIZE: tile size, an int or ``(block_q, block_k)``.
        _compile: accepted for torch compatibility, ignored (nothing is compiled).

    Raises:
        ValueError: a length or block size below 1.
        TypeError: a ``mask_mod`` that is neither a description nor a callable.
    """
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    for name, val in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    mod = mask_mod if isinstance(mask_mod, MaskMod) else (
        TorchMaskFn(mask_mod) if callable(mask_mod) else as_mask_mod(mask_mod))
    mod = mod.resolve(Q_LEN, KV_LEN)
    B, H = B or 1, H or 1
    summary = BlockSummary.build(mod, Q_LEN, KV_LEN, bq, bk)
    if _opaque(mod) and bool((summary.kind == PARTIAL).any()):
        summary = BlockSummary(Q_LEN, KV_LEN, bq, bk,
                               _evaluate_partial(mod, summary, B, H, device))
    return BlockMask(mod, summary, B, H)


# --- flex_attention -------------------------------------------------------------------------

def _as_mask(block_mask, B: int, H: int):
    if block_mask is None:
        return None
    if isinstance(block_mask, BlockMask):
        return block_mask.as_mask()
    if isinstance(block_mask, MaskMod):
        return block_mask
    if hasattr(block_mask, "kv_num_blocks") and hasattr(block_mask, "BLOCK_SIZE"):
        return _from_torch(block_mask, B, H)
    raise TypeError(f"block_mask must be a BlockMask (torch's or attnkit's create_block_mask), "
                    f"an attnkit mask description, or None; got {type(block_mask).__name__}")


def _as_score(score_mod):
    if score_mod is None or isinstance(score_mod, ScoreMod):
        return score_mod
    if callable(score_mod):
        return TorchScoreFn(score_mod)
    raise TypeError(f"score_mod must be a callable score_mod(score, b, h, q_idx, kv_idx) or "
                    f"an attnkit score description, got {type(score_mod).__name__}")


def flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod=None, block_mask=None,
                   scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options=None, *, return_aux=None):
    """``torch.nn.attention.flex_attention.flex_attention``, run eagerly by attnkit.

    Args:
        query: ``(B, H, T, D)``; key ``(B, Hkv, S, D)``; value ``(B, Hkv, S, Dv)``.
        score_mod: ``fn(score, b, h, q_idx, kv_idx) -> score`` or an attnkit score kind.
        block_mask: torch's ``BlockMask``, attnkit's (:func:`create_block_mask`), an attnkit
            mask description, or None (every key visible).
        scale: score multiplier, default ``1/sqrt(D)``.
        enable_gqa: allow ``H != Hkv`` (query head ``h`` reads kv head ``h // (H // Hkv)``).
        return_lse: also return the log-sum-exp ``(B, H, T)`` (natural log, float32;
            float64 for float64 inputs; ``-inf`` where a row sees no key).
        kernel_options: accepted and ignored (no kernel is compiled).
        return_aux: torch's ``AuxRequest``; only ``lse`` is served.

    Returns:
        ``out (B, H, T, Dv)``, or ``(out, lse)``, or ``(out, AuxOutput)`` with ``return_aux``.
        Rows that see no key are zeros. Differentiable on every device.

    Raises:
        ValueError: ``H != Hkv`` without ``enable_gqa``, ``H % Hkv != 0``, a block mask made
            for other lengths, ``return_aux`` asking for ``max_scores``, or both
            ``return_lse`` and ``return_aux``.
        TypeError: a ``block_mask`` or ``score_mod`` of another type.
    """
    from . import engine

    engine.check_qkv(query, key, value)
    H, Hkv = query.shape[1], key.shape[1]
    if H != Hkv and not enable_gqa:
        raise ValueError(f"query has {H} heads and key/value {Hkv}: pass enable_gqa=True for "
                         f"grouped-query attention (as torch's flex_attention requires)")
    want_lse = return_lse
    if return_aux is not None:
        if return_lse:
            raise ValueError("pass return_lse or return_aux, not both")
        if getattr(return_aux, "max_scores", False):
            raise ValueError("attnkit.flex_attention serves return_aux=AuxRequest(lse=True); "
                             "max_scores is not computed")
        want_lse = bool(getattr(return_aux, "lse", False))
    spec = MaskSpec(mask_mod=_as_mask(block_mask, query.shape[0], H),
                    score_mod=_as_score(score_mod))
    # The cheapest backend auto would run, never the compiled flex (no compile, no
    # recompiles): explain() prices every backend that can serve the call.
    estimates = engine.explain(query, key, value, spec=spec, scale=scale,
                               return_lse=want_lse).estimates
    name = min((n for n in estimates if n != "flex"), key=estimates.__getitem__)
    result = engine.attention(query, key, value, spec=spec, scale=scale, backend=name,
                              return_lse=want_lse)
    if return_aux is not None:
        from torch.nn.attention.flex_attention import AuxOutput

        out, lse = result if want_lse else (result, None)
        return out, AuxOutput(lse=lse)
    return result


