"""``BlockMask``: torch's block-sparse mask format, carrying attnkit's description too.

torch's FlexAttention describes a mask by a *listing* of tiles: for every row of
``BLOCK_SIZE[0]`` queries, the blocks of ``BLOCK_SIZE[1]`` keys to visit, split into partial
ones (``kv_num_blocks``/``kv_indices``: ``mask_mod`` decides inside) and full ones
(``full_kv_num_blocks``/``full_kv_indices``: every pair visible), plus their transposes
(``q_*``) for the backward. :class:`BlockMask` subclasses torch's class, so it *is* one:
every attribute and method (``shape``, ``sparsity()``, ``to_dense()``, ``to_string()``,
indexing, ``as_tuple()``, ``from_kv_blocks``) is torch's, and torch's own ``flex_attention``
(eager or compiled) takes it. What it adds is the description behind the listing, so
attnkit's backends keep its interval arithmetic:

* built by :func:`attnkit.create_block_mask`, the listing is a sound summary of the
  description (an empty tile is empty, a full tile full), so the engine runs the description
  itself (plain causal reaches SDPA's ``is_causal``; chunked plans at its own tile sizes);
* built from a listing (``from_kv_blocks``, indexing, ``to``, ``_adjust``, or torch's own
  ``BlockMask``), the listing is the truth, as in torch's kernels: an unlisted tile is hidden,
  a full tile visible, and ``mask_mod`` decides only inside partial tiles (:class:`BlockGrid`).

A mask is never stretched: its ``seq_lengths`` must equal the call's lengths
(:func:`check_block_mask`, torch's ``block_mask was created for ...`` errors).
:meth:`BlockMask._adjust` crops it to a shorter call explicitly, as in torch, but exactly
(torch's recount is right only when each row's visible blocks form a prefix).

Shape letters: ``B`` batch, ``H`` query heads, ``T`` queries, ``S`` keys, ``nQ``/``nK`` query
and key tiles, ``Bg``/``Hg`` the batch and heads a listing has (1 = shared).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _torch_flex

from . import _display
from .masks.base import MaskMod
from .summary import EMPTY, FULL, PARTIAL, BlockSummary

__all__ = ["BlockGrid", "BlockMask", "check_block_mask", "run_mask"]

_TorchBlockMask = _torch_flex.BlockMask
NOOP_BLOCK = getattr(_torch_flex, "_LARGE_SPARSE_BLOCK_SIZE", 1 << 30)  # torch's "no mask"
_sliced_error = getattr(_torch_flex, "_sliced_mask_mod_error", None)


# --- listings <-> per-tile kinds ------------------------------------------------------------

def listing(sel: Tensor) -> tuple[Tensor, Tensor]:
    """torch's ordered listing of the tiles ``sel (..., nQ, nK)`` marks: ``counts (..., nQ)``
    and ``indices (..., nQ, nK)``, int32, the listed columns first in ascending order, then
    the rest (what torch's ``_dense_to_ordered``, a stable argsort, gives), in ``O(nQ x nK)``:
    each column's slot is the number of columns of its kind before it."""
    taken = sel.to(torch.int64)
    counts = taken.sum(-1, keepdim=True)  # (..., nQ, 1)
    slot = torch.where(sel, taken.cumsum(-1) - 1, counts + (1 - taken).cumsum(-1) - 1)
    columns = torch.arange(sel.shape[-1], dtype=torch.int32, device=sel.device)
    indices = torch.empty(sel.shape, dtype=torch.int32, device=sel.device)
    indices.scatter_(-1, slot, columns.expand(sel.shape))  # (..., nQ, nK)
    return counts.squeeze(-1).to(torch.int32), indices


def kinds_of(bm, device=None) -> Tensor:
    """The per-tile kinds of any ``BlockMask``'s listing: ``(Bg, Hg, nQ, nK)`` int8, EMPTY /
    PARTIAL / FULL, with ``nQ, nK`` covering its ``seq_lengths`` (rows or columns the listing
    lacks are empty, entries past the count or out of range are ignored).

    Raises:
        ValueError: a listing with more than two leading (batch, head) dims.
    """
    bq, bk = bm.BLOCK_SIZE
    T, S = bm.seq_lengths
    nq, nk = -(-T // bq), -(-S // bk)
    num = bm.kv_num_blocks
    if num.dim() > 3:
        raise ValueError(f"block_mask.kv_num_blocks has shape {tuple(num.shape)}: at most "
                         f"(B, H, nQ) is supported")
    lead, rows = num.shape[:-1], num.shape[-1]
    kind = torch.zeros(*lead, rows, nk + 1, dtype=torch.int8, device=num.device)

    def mark(counts, indices, code):
        if counts is None:
            return
        slots = torch.arange(indices.shape[-1], device=indices.device)
        ok = (slots < counts[..., None]) & (indices >= 0) & (indices < nk)
        idx = torch.where(ok, indices.long(), nk)  # unlisted -> the dump column
        kind.scatter_(-1, idx, code)

    mark(bm.kv_num_blocks, bm.kv_indices, PARTIAL)
    mark(bm.full_kv_num_blocks, bm.full_kv_indices, FULL)
    kind = kind[..., :nk][..., :nq, :]  # (..., min(rows, nQ), nK)
    if kind.shape[-2] < nq:  # rows the listing lacks see nothing
        kind = torch.nn.functional.pad(kind, (0, 0, 0, nq - kind.shape[-2]), value=EMPTY)
    while kind.dim() < 4:
        kind = kind.unsqueeze(0)
    kind = kind.contiguous()  # (Bg, Hg, nQ, nK)
    return kind if device is None else kind.to(device)


# --- a mask read through a tile grid --------------------------------------------------------

def _prefix(x: Tensor) -> Tensor:
    """2-D inclusive prefix sums with a zero row and column in front: ``(nQ+1, nK+1)``."""
    out = torch.zeros(x.shape[0] + 1, x.shape[1] + 1, dtype=torch.int64, device=x.device)
    out[1:, 1:] = x.to(torch.int64).cumsum(0).cumsum(1)
    return out


class _Everything(MaskMod):
    """Every key visible (the mask of ``noop_mask``'s partial tiles)."""

    def grid(self, b, h, q, k):
        return torch.ones_like(q >= k)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        shape = (q_lo.shape[0], k_lo.shape[-1])
        ones = torch.ones(shape, dtype=torch.bool, device=q_lo.device)
        return ones, ones

    def describe(self):
        return "noop_mask"


@dataclass(frozen=True, eq=False)
class BlockGrid(MaskMod):
    """``mod`` read through a per-tile grid ``kind (Bg, Hg, nQ, nK)`` of EMPTY / PARTIAL /
    FULL at ``block_q x block_k`` (``Bg``, ``Hg`` are 1 or the call's B, H).

    With ``authoritative`` (a listing) the grid decides, as in FlexAttention's kernels:
    unlisted tiles are hidden, full tiles visible, ``mod`` is evaluated only in partial
    tiles. Without it the grid is a summary of ``mod`` itself (:func:`create_block_mask`),
    so it only narrows the block plan and ``mod`` is evaluated as is. :meth:`blocks` answers
    for any tile size from prefix sums over the grid, ANDed with ``mod``'s own interval
    arithmetic when that is valid. ``mod_lengths`` are the lengths ``mod`` describes (those
    of the mask it came from, longer than ``seq_lengths`` after ``_adjust``).
    """

    mod: MaskMod
    kind: Tensor
    block_q: int
    block_k: int
    seq_lengths: tuple
    authoritative: bool = True
    mod_lengths: tuple | None = None
    _sums: dict = field(default_factory=dict, repr=False)

    def _counts(self):
        sums = {} if torch.compiler.is_compiling() else self._sums  # no side effect traced
        if not sums:
            k = self.kind
            sums["some"] = _prefix((k != EMPTY).flatten(0, -3).any(0))
            sums["full"] = _prefix((k == FULL).flatten(0, -3).all(0))
            sums["partial"] = _prefix((k == PARTIAL).flatten(0, -3).all(0))
        return sums

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
        if not torch.compiler.is_compiling():  # (a host sync: not inside a graph)
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
        """Raises ValueError: other lengths (torch's texts) or a batch/heads that differ."""
        check_lengths((*self.kind.shape[:2], *self.seq_lengths), T, S)
        Bg, Hg = self.kind.shape[:2]
        if Bg not in (1, B) or Hg not in (1, H):
            raise ValueError(f"block_mask has B={Bg}, H={Hg}; the call has B={B}, H={H} "
                             f"(create it with B and H equal to those, or None to broadcast)")
        self.mod.validate(B, H, *(self.mod_lengths or self.seq_lengths))

    def describe(self):
        c = {n: int((self.kind == v).sum()) for n, v in (("partial", PARTIAL), ("full", FULL))}
        return (f"block_mask({self.mod.describe()}, {self.block_q}x{self.block_k}, "
                f"{c['partial']} partial + {c['full']} full tiles)")

    def tensors(self):
        return (self.kind, *self.mod.tensors())


def _merged(kind: Tensor, seq_lengths, block_size) -> BlockSummary:
    """One :class:`BlockSummary` over every (b, h) of a grid: a tile is empty only if empty
    for all, full only if full for all."""
    k = kind.flatten(0, -3).cpu()  # (Bg*Hg, nQ, nK)
    merged = torch.where((k == FULL).all(0), FULL,
                         torch.where((k == EMPTY).all(0), EMPTY, PARTIAL)).to(torch.int8)
    return BlockSummary(*seq_lengths, *block_size, merged)


# --- the mask format ------------------------------------------------------------------------

_LISTING = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
            "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


class _Same:
    """An object compared by identity inside a key (a ``mask_mod`` may define ``==``, and
    an id alone may be reused once its object is gone: this keeps it alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def listing_key(bm) -> tuple:
    """What a cache of anything derived from a ``BlockMask``'s listing must compare: its
    listing tensors and ``mask_mod`` (the objects, kept alive, and their in-place versions),
    lengths and block size."""
    ts = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices)
    return (tuple(None if t is None else (_Same(t), t._version) for t in ts),
            _Same(bm.mask_mod), tuple(bm.seq_lengths), tuple(bm.BLOCK_SIZE))


def _listed(name: str) -> property:
    """A listing attribute of :class:`BlockMask`: computed from the tiles on first read (the
    engine never needs it: ``create_block_mask`` stays ``O(nQ x nK)`` interval arithmetic),
    and every assignment counted, so that a mask whose listing was replaced is noticed."""

    def get(self):
        values = self.__dict__
        if name not in values:
            lazy = values.get("_lazy")
            if lazy is None:
                raise AttributeError(name)
            tensors = {n: t for n, t in _listings(*lazy).items() if n not in values}
            if torch.compiler.is_compiling():  # no side effect inside a traced graph
                return tensors[name]
            values.update(tensors)
            values["_born"] = {n: t._version for n, t in tensors.items() if t is not None}
            del values["_lazy"]
        return values[name]

    def set(self, value):
        self.__dict__[name] = value
        self.__dict__["_edits"] = self.__dict__.get("_edits", 0) + 1

    return property(get, set, doc=f"torch's ``{name}`` (computed on first read)")


def _listings(listed: Tensor, separate_full_blocks: bool) -> dict:
    """torch's eight listing tensors for ``listed (B, H, nQ, nK)`` kinds (what
    ``from_kv_blocks`` computes, the ``q_*`` being the transposed listings)."""
    out = dict.fromkeys(_LISTING)
    for prefix, code in (("", PARTIAL), ("full_", FULL)):
        if code == FULL and not separate_full_blocks:
            continue
        sel = listed == code
        out[f"{prefix}kv_num_blocks"], out[f"{prefix}kv_indices"] = listing(sel)
        out[f"{prefix}q_num_blocks"], out[f"{prefix}q_indices"] = listing(sel.transpose(-1, -2))
    return out


class BlockMask(_TorchBlockMask):
    """torch's ``BlockMask`` (a subclass: every attribute and method, accepted by torch's
    ``flex_attention``) that also knows the attnkit description its listing came from.

    Build one with :func:`attnkit.create_block_mask` (or torch's ``from_kv_blocks``);
    :meth:`as_mask` is what attnkit's engine runs for it, :attr:`summary` its tiles, and
    :meth:`to_torch` a plain torch ``BlockMask`` with the same listing and ``mask_mod``.
    Replacing its tensors or ``mask_mod`` (as torch's own code does after indexing) is
    noticed: the listing and the new ``mask_mod`` are then read as torch reads them. The
    listing tensors of a mask made from a description are computed when first read.
    """

    # (mask_mod, MaskMod, lengths): what partial tiles run, for as long as ``mask_mod`` is
    # the object it was made for; and (listing key, MaskMod or None, BlockSummary): what the
    # engine runs, for as long as the listing is the one it was made for.
    _inner = None
    _plan = None

    def _key(self):
        values = self.__dict__
        # a listing still to be computed counts as unmodified, as it will be when read
        born = values.get("_born", {})
        versions = tuple(values[n]._version - born.get(n, 0) if values.get(n) is not None
                         else (0 if n not in values else None) for n in _LISTING[:4])
        return (values.get("_edits", 0), versions, tuple(self.seq_lengths),
                tuple(self.BLOCK_SIZE), _Same(self.mask_mod))

    @classmethod
    def _described(cls, description, kind: Tensor, summary: BlockSummary, *, mask_mod, B: int,
                   H: int, device, separate_full_blocks: bool = True) -> "BlockMask":
        """The block mask of ``description`` (resolved; None = every key visible), whose
        tiles are ``kind (Bg, Hg, nQ, nK)``: listed as torch lists them (a tile holding
        padding past a ragged length is never full), with ``mask_mod`` as its attribute."""
        T, S, bq, bk = summary.T, summary.S, summary.block_q, summary.block_k
        listed = kind.clone()
        if T % bq:
            row = listed[..., -1, :]
            row[row == FULL] = PARTIAL
        if S % bk:
            col = listed[..., -1]
            col[col == FULL] = PARTIAL
        if not separate_full_blocks:
            listed[listed == FULL] = PARTIAL
        listed = listed.expand(B, H, *listed.shape[-2:]).to(device)  # (B, H, nQ, nK)
        bm = cls.__new__(cls)
        for name in getattr(_TorchBlockMask, "_TENSOR_ATTRS", ()):  # torch's other metadata
            if name not in _LISTING:
                bm.__dict__[name] = None
        bm.__dict__.update(seq_lengths=(T, S), BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                           dq_kv_order_spt=None, _lazy=(listed, separate_full_blocks))
        if not separate_full_blocks:  # known now: no full tiles listed
            bm.__dict__.update(dict.fromkeys(n for n in _LISTING if n.startswith("full_")))
        inner = _Everything() if description is None else description
        bm._inner = (bm.mask_mod, inner, (T, S))
        run = description
        if description is not None and _opaque(description):
            run = BlockGrid(description, kind, bq, bk, (T, S), authoritative=False)
        bm._plan = (bm._key(), run, summary)
        return bm

    # -- what attnkit runs -------------------------------------------------------------------

    def _partial_mod(self) -> tuple:
        """``(MaskMod, lengths)`` that decides inside partial tiles."""
        inner = self._inner
        if inner is not None and inner[0] is self.mask_mod:
            return inner[1], inner[2]
        return partial_mod_of(self.mask_mod), tuple(self.seq_lengths)

    def _current_plan(self):
        plan = self._plan
        if plan is not None and (torch.compiler.is_compiling() or plan[0] == self._key()):
            return plan
        return None

    def as_mask(self) -> MaskMod | None:
        """What attnkit's engine runs for this mask (None = every key visible): the
        description when the listing came from it, else the listing read through
        :class:`BlockGrid`, as torch's kernels read it."""
        plan = self._current_plan()
        if plan is not None:
            return plan[1]
        return grid_of(self)

    @property
    def summary(self) -> BlockSummary:
        """The tiles at ``BLOCK_SIZE`` as a :class:`~attnkit.summary.BlockSummary`, over
        every batch and head (empty only if empty for all, full only if full for all). From
        a description, ragged edge tiles may be full where torch's listing calls them
        partial (finer, never coarser)."""
        plan = self._current_plan()
        if plan is not None and plan[2] is not None:
            return plan[2]
        return _merged(kinds_of(self), self.seq_lengths, self.BLOCK_SIZE)

    # In a notebook: a picture (attnkit._display); str() stays torch's text everywhere else.
    _repr_html_ = _display.block_mask_html
    _repr_png_ = _display.block_mask_png

    def to_torch(self) -> _TorchBlockMask:
        """A plain torch ``BlockMask`` with the same tensors and ``mask_mod``."""
        out = _TorchBlockMask.__new__(_TorchBlockMask)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        out.__dict__.update({n: getattr(self, n) for n in _LISTING})
        return out

    # -- torch's methods that build new masks, kept in this class ---------------------------

    def _rewrap(self, bm) -> "BlockMask":
        out = type(self).__new__(type(self))
        out.__dict__.update(bm.__dict__)  # torch's attributes, the listing among them
        out._inner = self._inner if self._inner is not None else (
            self.mask_mod, *self._partial_mod())
        out._plan = None  # a new listing: read as torch reads it
        return out

    def __getitem__(self, index) -> "BlockMask":
        """torch's indexing (``bm[b]``, ``bm[b, h]``, slices, query-row tensors), kept an
        attnkit ``BlockMask``; as in torch its ``mask_mod`` is reset and must be set again
        from the original's (which brings the original's description back)."""
        return self._rewrap(super().__getitem__(index))

    def to(self, device) -> "BlockMask":
        """torch's ``to``, kept an attnkit ``BlockMask``."""
        out = self._rewrap(super().to(device))
        plan = self._current_plan()
        if plan is not None and (plan[1] is None or not plan[1].tensors()):
            out._plan = (out._key(), plan[1], plan[2])  # a description without tensors
        return out

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """This mask cropped to its upper-left ``new_q_len x new_kv_len`` corner, the
        explicit way to use it for a shorter call (torch's method, computed exactly: every
        listed tile inside the corner stays listed as it was, every other is dropped;
        ``mask_mod`` is unchanged, so this is right for masks that do not depend on the
        lengths, as in torch).

        Raises:
            ValueError: a length above the one the mask was created for, or below 1.
        """
        T, S = self.seq_lengths
        for name, new, old in (("new_q_len", new_q_len, T), ("new_kv_len", new_kv_len, S)):
            if isinstance(new, bool) or not isinstance(new, int) or not 1 <= new <= old:
                raise ValueError(f"_adjust crops a block mask to its upper-left corner: {name} "
                                 f"must be an int in [1, {old}] (it was created for "
                                 f"seq_lengths={(T, S)}), got {new!r}; for a longer call "
                                 f"create a new block mask")
        bq, bk = self.BLOCK_SIZE
        rows, cols = -(-new_q_len // bq), -(-new_kv_len // bk)
        lead = self.kv_num_blocks.shape[:-1]
        kind = kinds_of(self)[..., :rows, :cols]
        kind = kind.reshape(*lead, rows, cols)  # (..., rows, cols), the listing's own dims
        kv_num, kv_idx = listing(kind == PARTIAL)
        full_num = full_idx = None
        if self.full_kv_num_blocks is not None:
            full_num, full_idx = listing(kind == FULL)
        out = type(self).from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                        BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                                        seq_lengths=(new_q_len, new_kv_len),
                                        compute_q_blocks=self.q_indices is not None)
        out._inner = (self.mask_mod, *self._partial_mod())
        return out


def _opaque(mod) -> bool:
    """Whether some leaf of ``mod`` has no interval arithmetic of its own."""
    parts = getattr(mod, "parts", None)
    if parts:
        return any(_opaque(p) for p in parts)
    inner = getattr(mod, "mod", None)
    if isinstance(inner, MaskMod):
        return _opaque(inner)
    return type(mod).blocks is MaskMod.blocks


def partial_mod_of(mask_mod) -> MaskMod:
    """The description a ``BlockMask``'s ``mask_mod`` stands for inside partial tiles."""
    if isinstance(mask_mod, MaskMod):
        return mask_mod
    if mask_mod is _torch_flex.noop_mask:
        return _Everything()
    from .flex_api import TorchMaskFn  # flex's calling convention (vmap for scalar code)

    return TorchMaskFn(mask_mod)


def grid_of(bm) -> BlockGrid:
    """Any ``BlockMask`` (torch's or attnkit's) read as torch's kernels read it: its listing
    authoritative, its ``mask_mod`` inside partial tiles (nothing evaluated here)."""
    mod, lengths = bm._partial_mod() if isinstance(bm, BlockMask) else (
        partial_mod_of(bm.mask_mod), tuple(bm.seq_lengths))
    bq, bk = bm.BLOCK_SIZE
    return BlockGrid(mod, kinds_of(bm), bq, bk, tuple(bm.seq_lengths), authoritative=True,
                     mod_lengths=lengths)


# --- the checks torch's flex_attention makes, with its texts ---------------------------------

def check_lengths(shape, q_len: int, kv_len: int) -> None:
    """torch's length check: a block mask of ``shape (..., T, S)`` is used only at the
    lengths it was created for.

    Raises:
        ValueError: torch's ``block_mask was created for ...`` (longer or shorter call).
    """
    shape = tuple(int(n) for n in shape)
    T, S = shape[-2:]
    if q_len > T or kv_len > S:
        raise ValueError(
            f"block_mask was created for block_mask.shape={shape} but got q_len={q_len} and "
            f"kv_len={kv_len}. As the block mask was created for a smaller length than you're "
            f"using it for, you likely need to create a new block mask.")
    if q_len < T or kv_len < S:
        raise ValueError(
            f"block_mask was created for block_mask.shape={shape} but got q_len={q_len} and "
            f"kv_len={kv_len}. As the block mask was created for a larger length than you're "
            f"using it for, you can either 1. create a new block mask with the correct length, "
            f"or 2. 'adjust' the existing block mask to the correct length by calling "
            f"block_mask._adjust(q_len, kv_len). This essentially 'crops' the block mask to "
            f"the upper left corner, which does not work for all mask_mods!")


def is_block_mask(obj) -> bool:
    """A torch or attnkit ``BlockMask`` (or a look-alike with its listing attributes)."""
    return all(hasattr(obj, a) for a in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE",
                                        "seq_lengths", "mask_mod"))


def check_block_mask(block_mask, q: Tensor, k: Tensor) -> None:
    """The checks torch's ``flex_attention`` makes on a block mask, with its texts.

    Raises:
        TypeError: not a ``BlockMask``.
        RuntimeError: a sliced mask whose ``mask_mod`` was not set again, or a mask on
            another device than ``q`` (torch's texts).
        ValueError: other lengths (torch's ``block_mask was created for ...``).
    """
    if not is_block_mask(block_mask):
        raise TypeError(f"block_mask must be a BlockMask (torch's or attnkit's "
                        f"create_block_mask) or None, got {type(block_mask).__name__}")
    if _sliced_error is not None and block_mask.mask_mod is _sliced_error:
        raise RuntimeError("Cannot use mask_mod from a sliced BlockMask")
    if tuple(block_mask.BLOCK_SIZE) != (NOOP_BLOCK, NOOP_BLOCK):
        check_lengths(block_mask.shape, q.shape[-2], k.shape[-2])
    if q.device != block_mask.kv_num_blocks.device:
        raise RuntimeError(f"Expect q/k/v and block_mask to be on the same device but got "
                           f"{q.device} and {block_mask.kv_num_blocks.device}.")


def run_mask(block_mask, B: int, H: int) -> MaskMod | None:
    """What attnkit's engine runs for a (checked) block mask: its description, or its
    listing read through :class:`BlockGrid` (recognised as causal or a window where it is
    exactly one); None for torch's no-op mask."""
    if tuple(block_mask.BLOCK_SIZE) == (NOOP_BLOCK, NOOP_BLOCK):
        return None
    from .flex_api import _from_torch  # recognition of known kinds lives with the tracer

    if isinstance(block_mask, BlockMask):
        plan = block_mask._current_plan()
        if plan is not None:  # the description; an opaque one may still be causal/a window
            run = plan[1]
            return _from_torch(block_mask, B, H, run) if isinstance(run, BlockGrid) else run
    return _from_torch(block_mask, B, H)


for _name in _LISTING:
    setattr(BlockMask, _name, _listed(_name))
