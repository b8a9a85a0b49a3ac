"""torch's FlexAttention API (``torch.nn.attention.flex_attention``), run by attnkit's engine:
no compile, no recompiles, gradients on CPU, and the same names, arguments, defaults and
errors as torch, so code written for FlexAttention runs unchanged::

    from attnkit.flex_api import create_block_mask, flex_attention   # or torch's create_block_mask
    block_mask = create_block_mask(causal, None, None, T, T)
    out = flex_attention(q, k, v, score_mod=softcap, block_mask=block_mask)
    out.sum().backward()                                      # exact, on CPU

* :func:`flex_attention` checks its arguments as torch does (torch's error texts), then is
  ``attnkit.attention(q, k, v, block_mask=..., score_mod=..., scale=...)``: the cheapest
  backend ``auto`` picks runs it, and :func:`attnkit.explain` with the same ``block_mask=``
  and ``score_mod=`` says which. A key/value batch of 1 serves a larger query batch (with a
  block mask of the query batch, as torch requires); keys and values of another dtype are
  read in the query's (torch's eager rule); ``return_aux=AuxRequest(lse=..., max_scores=...)``
  and the deprecated ``return_lse`` work, on every device. Inside ``torch.compile`` (even
  ``fullgraph=True``) it traces into one graph with no break.
* :func:`create_block_mask` returns a :class:`~attnkit.block_mask.BlockMask`: torch's
  ``BlockMask`` (a subclass; torch's ``flex_attention`` takes it) that keeps the description,
  so attnkit's backends keep its interval arithmetic. A description from
  :mod:`attnkit.masks` is summarised by interval arithmetic (``O(nQ x nK)``, no ``T x S``
  tensor); a flex ``mask_mod`` has its undecided tiles evaluated, one row of tiles at a time.
* A block mask is used only at the lengths it was created for (torch's errors); ``_adjust``
  crops it explicitly. torch's own ``BlockMask`` is read as its kernels read it: the listing
  decides, ``mask_mod`` only inside partial tiles; one that amounts to causal or a sliding
  window (verified exactly, :func:`_recognise`) runs as that kind.
* :func:`create_mask`, :func:`and_masks`, :func:`or_masks`, :func:`noop_mask`,
  :class:`AuxRequest`, :class:`AuxOutput` as in torch (``and_masks``/``or_masks`` of attnkit
  descriptions stay descriptions).
* ``mask_mod`` and ``score_mod`` are called on broadcast index tensors (``b (B,1,1,1)``,
  ``h (1,H,1,1)``, ``q_idx (1,1,nq,1)``, ``kv_idx (1,1,1,nk)``); one that only works on
  scalars runs under ``torch.vmap`` as in torch (:class:`TorchMaskFn`,
  :class:`TorchScoreFn`); tensors a ``score_mod`` captures (a learnable bias) get gradients.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries
(torch's ``L``), ``S`` keys, ``D`` head dim, ``Dv`` value head dim, ``nQ``/``nK`` query/key
tiles.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _torch_flex

from .block_mask import (BlockGrid, BlockMask, _merged, _opaque, grid_of, is_block_mask,
                         listing_key, partial_mod_of, run_mask)
from .flex_checks import (aux_wanted, check_batch, check_inputs, check_kernel_options,
                          in_query_layout, max_scores)
from .masks.base import (And, MaskFn, MaskMod, Or, _index, broadcast_shape, reads_scalars,
                         vmap_grid)
from .masks.traced import TracedMask
from .scores import ScoreFn, ScoreMod, vmap_scores
from .summary import EMPTY, FULL, PARTIAL, BlockSummary

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "BlockGrid",
    "BlockMask",
    "FlexKernelOptions",
    "TorchMaskFn",
    "TorchScoreFn",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "noop_mask",
    "or_masks",
]

noop_mask = _torch_flex.noop_mask  # torch's own function: identity checks keep working
FlexKernelOptions = getattr(_torch_flex, "FlexKernelOptions", dict)  # accepted, checked
_identity = getattr(_torch_flex, "_identity", None)
_NOOP_BLOCK = getattr(_torch_flex, "_LARGE_SPARSE_BLOCK_SIZE", 1 << 30)


if hasattr(_torch_flex, "AuxRequest"):
    AuxRequest = _torch_flex.AuxRequest
    AuxOutput = _torch_flex.AuxOutput
else:  # torch < 2.9: the same named tuples
    from typing import NamedTuple

    class AuxRequest(NamedTuple):
        """Which auxiliary outputs :func:`flex_attention` returns (torch's ``AuxRequest``)."""

        lse: bool = False
        max_scores: bool = False

    class AuxOutput(NamedTuple):
        """The auxiliary outputs asked for, None for the others (torch's ``AuxOutput``)."""

        lse: Tensor | None = None
        max_scores: Tensor | None = None


# --- torch-style functions ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TorchMaskFn(MaskFn):
    """A FlexAttention ``mask_mod``: called on broadcast index tensors (fast, works for most
    ``&``/``|``/indexing code); if that raises or returns something else than a bool tensor
    of the grid's shape, run under ``torch.vmap`` over scalars, as torch does. Resolved for
    a call, it is read like any :class:`~attnkit.masks.MaskFn` (a native kind when it is
    one, else block summaries from its traced program)."""

    _vmap: list = field(default_factory=lambda: [False], repr=False)

    def grid(self, b, h, q, k):
        if not self._vmap[0] and not reads_scalars(self._seen):
            try:
                out = self.fn(b, h, q, k)
                if isinstance(out, Tensor) and out.dtype == torch.bool and out.dim() <= 4:
                    broadcast_shape(out.shape, b.shape, h.shape, q.shape, k.shape)
                    return out
            except Exception:  # noqa: BLE001, S110 - written for scalars: vmap below
                pass
            self._vmap[0] = True
        out = vmap_grid(self.fn, b, h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"mask_mod {self.describe()!r} must return a bool tensor (True = "
                            f"may attend), got {got}; combine conditions with &, |, ~ or "
                            f"torch.where, not Python if/and/or")
        return out


@dataclass(frozen=True, eq=False)
class TorchScoreFn(ScoreFn):
    """A FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``; broadcast first, ``vmap``
    if needed. The tensors it reads are found by running it (:class:`ScoreFn`), so the
    chunked backend differentiates through them: a bias reached as ``self.bias``, in a
    list, a dict or a ``ParameterList``, or through nested functions."""

    _vmap: list = field(default_factory=lambda: [False], repr=False)

    def apply(self, score, b, h, q, k):
        if not self._vmap[0] and not reads_scalars(self._seen):
            try:
                out = self.fn(score, b, h, q, k)
                if isinstance(out, Tensor) and out.shape == score.shape:
                    return out
                if isinstance(out, Tensor) and out.dim() <= 4:
                    return out.expand(score.shape)
            except Exception:  # noqa: BLE001, S110 - written for scalars: vmap below
                pass
            self._vmap[0] = True
        return vmap_scores(self.fn, score, b, h, q, k)


def _recognise(grid: BlockGrid, B: int, H: int) -> MaskMod | None:
    """The native kind a torch ``BlockMask`` amounts to, or None.

    Its ``mask_mod`` is read (:mod:`attnkit.masks.traced`): when that is a native kind
    (causal, a window, documents, a key prefix, chunks, and/or of them), it equals the
    ``BlockMask`` exactly if its block summary calls every empty tile of the grid empty and
    every full tile full (the partial tiles run ``mask_mod``, which the kind equals). A
    ``mask_mod`` that cannot be read is probed instead: a causal or window candidate read
    off its first and last query rows, verified on every partial tile, for every batch and
    head of the call. Then the engine's lowering sees a kind it knows (plain causal reaches
    SDPA's ``is_causal``; windows and documents get chunked's tight plans) instead of an
    opaque function.
    """
    T, S = grid.seq_lengths
    if grid.mod_lengths not in (None, (T, S)):
        return None  # a cropped mask (``_adjust``): its description is of other lengths
    mod = grid.mod.resolve(T, S)
    if not isinstance(mod, (MaskFn, TracedMask)):
        bq, bk = grid.block_q, grid.block_k
        q_lo = torch.arange(0, T, bq).view(-1, 1)
        k_lo = torch.arange(0, S, bk).view(1, -1)
        some, every = mod.blocks(q_lo, (q_lo + bq).clamp(max=T) - 1, k_lo,
                                 (k_lo + bk).clamp(max=S) - 1)
        kind = grid.kind.cpu()
        some, every = (torch.broadcast_to(x.cpu(), kind.shape[-2:]) for x in (some, every))
        ok = not bool((some & (kind == EMPTY)).any()) and \
            not bool((~every & (kind == FULL)).any())
        return mod if ok else None
    return _recognise_by_rows(grid, B, H)


def _recognise_by_rows(grid: BlockGrid, B: int, H: int) -> MaskMod | None:
    """Causal or a window, read off an opaque ``mask_mod``'s first and last query rows and
    verified exactly on every partial tile (see :func:`_recognise`)."""
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



_recognised: dict = {}  # (id(BlockMask), B, H) -> (BlockMask, listing key, MaskMod), a few


def _from_torch(bm, B: int, H: int, grid: BlockGrid | None = None) -> MaskMod:
    """A ``BlockMask`` as the engine runs it: ``grid`` (default: its listing read as torch's
    kernels read it, :func:`~attnkit.block_mask.grid_of`), or the kind that amounts to
    (:func:`_recognise`), cached while the listing and ``mask_mod`` are the same objects,
    unmodified."""
    if torch.compiler.is_compiling():  # recognition reads values: not inside a graph
        return grid_of(bm) if grid is None else grid
    key, listed = (id(bm), B, H), listing_key(bm)
    hit = _recognised.get(key)
    if hit is not None and hit[0] is bm and hit[1] == listed:
        return hit[2]
    grid = grid_of(bm) if grid is None else grid
    try:
        mod = _recognise(grid, B, H) or grid
    except Exception:  # noqa: BLE001 - a mask_mod the probe cannot run: keep it opaque
        mod = grid
    _recognised[key] = (bm, listed, mod)
    while len(_recognised) > 8:
        _recognised.pop(next(iter(_recognised)))
    return mod


# --- mask functions ---------------------------------------------------------------------------

def _positional(fn) -> int | None:
    """How many positional parameters without a default ``fn`` takes (a bound method's
    ``self`` not counted), or None when Python cannot say."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def _flex_mask(mask_mod) -> MaskMod | None:
    """A flex ``mask_mod`` as a description: attnkit's as is, torch's ``noop_mask`` as None
    (every key visible), any other callable in flex's calling convention."""
    if isinstance(mask_mod, MaskMod):
        return mask_mod
    if mask_mod is noop_mask:
        return None
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable mask_mod(b, h, q_idx, kv_idx) -> bool "
                        f"tensor or an attnkit mask description, got "
                        f"{type(mask_mod).__name__}")
    n = _positional(mask_mod)
    if n == 5:
        raise AssertionError(f"create-block_mask requires a mask_mod function! Got {mask_mod}")
    if n is not None and n != 4:
        raise AssertionError(f"Expected 4 or 5 positional args, got {n}")
    return TorchMaskFn(mask_mod)


def _part(mask_mod) -> MaskMod:
    mod = _flex_mask(mask_mod)
    return partial_mod_of(noop_mask) if mod is None else mod


def _no_key(b, h, q_idx, kv_idx):
    return b.new_zeros((), dtype=torch.bool)


def and_masks(*mask_mods):
    """torch's ``and_masks``: a ``mask_mod`` that is the intersection of ``mask_mods`` (none:
    every key visible). The result is an attnkit description (``And``; callables keep
    flex's calling convention), so attnkit's ``create_block_mask`` still uses the interval
    arithmetic of the attnkit kinds among them; torch's functions take it as a
    ``mask_mod`` too.

    Raises:
        RuntimeError: an argument that is not callable (torch's text).
    """
    if not all(callable(m) for m in mask_mods):
        raise RuntimeError(f"All inputs should be callable mask_mods: {mask_mods}")
    if not mask_mods:
        return noop_mask
    return And(tuple(_part(m) for m in mask_mods))


def or_masks(*mask_mods):
    """torch's ``or_masks``: the union of ``mask_mods`` (none: no key visible), as an
    attnkit description (``Or``) torch's functions take too.

    Raises:
        RuntimeError: an argument that is not callable (torch's text).
    """
    if not all(callable(m) for m in mask_mods):
        raise RuntimeError(f"All inputs should be callable mask_mods: {mask_mods}")
    if not mask_mods:
        return TorchMaskFn(_no_key)
    return Or(tuple(_part(m) for m in mask_mods))


def _default_device(device, mod):
    """torch's default (the current accelerator, else the CPU), unless the description
    holds tensors: then theirs."""
    if device is not None:
        return torch.device(device)
    tensors = mod.tensors() if mod is not None else ()
    if tensors:
        return tensors[0].device
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    return current or torch.device("cpu")


def create_mask(mod_fn, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                device=None) -> Tensor:
    """torch's ``create_mask``: the dense mask ``(B, H, Q_LEN, KV_LEN)`` bool (True = may
    attend) of a ``mask_mod``, an attnkit description, or a ``score_mod`` (a score it sends
    to ``-inf`` is masked). Costs ``B x H x Q_LEN x KV_LEN``: for inspection and tests.

    Raises:
        AssertionError: a callable that takes neither 4 nor 5 positional arguments (torch's).
        TypeError: something else than a callable or a description.
    """
    B, H = B or 1, H or 1
    if callable(mod_fn) and not isinstance(mod_fn, MaskMod) and _positional(mod_fn) == 5:
        device = _default_device(device, None)
        score = TorchScoreFn(mod_fn)
        zeros = torch.zeros(B, H, Q_LEN, KV_LEN, device=device)
        out = score.apply(zeros, *_index(B, H, 0, Q_LEN, 0, KV_LEN, device))
        return ~torch.isneginf(torch.broadcast_to(out, zeros.shape))
    mod = _flex_mask(mod_fn)
    device = _default_device(device, mod)
    if mod is None:
        return torch.ones(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    out = mod.resolve(Q_LEN, KV_LEN).tile(B, H, 0, Q_LEN, 0, KV_LEN, device)
    out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
    return out.expand(B, H, Q_LEN, KV_LEN).contiguous()  # (B, H, Q_LEN, KV_LEN)


# --- create_block_mask -------------------------------------------------------------------------

def _evaluate_partial(mod: MaskMod, summary: BlockSummary, B: int, H: int, device) -> Tensor:
    """``(Bg, Hg, nQ, nK)``: the summary's partial tiles decided by evaluating ``mod`` one
    row of tiles at a time (``B x H x block_q x span`` bools at most), per batch and head
    where ``mod`` depends on them (``Bg``, ``Hg`` are 1 where it does not)."""
    kind = summary.kind[None, None].clone()  # (1, 1, nQ, nK), widened below if needed
    bq, bk, T, S = summary.block_q, summary.block_k, summary.T, summary.S
    for i in range(kind.shape[-2]):
        cols = (summary.kind[i] == PARTIAL).nonzero().flatten()
        if cols.numel() == 0:
            continue
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        q0, q1, k0, k1 = i * bq, min((i + 1) * bq, T), c0 * bk, min(c1 * bk, S)
        m = mod.tile(B, H, q0, q1, k0, k1, device)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        m = torch.broadcast_to(m, (*m.shape[:2], q1 - q0, k1 - k0))  # (Bm, Hm, nq, nk)
        pad = (c1 - c0) * bk - (k1 - k0)  # the last key block may be short
        shape = (*m.shape[:2], q1 - q0, c1 - c0, bk)  # (Bm, Hm, nq, blocks, bk)
        pad_with = torch.nn.functional.pad
        some = pad_with(m, (0, pad), value=False).view(shape).any(-1).any(-2)
        every = pad_with(m, (0, pad), value=True).view(shape).all(-1).all(-2)
        new = torch.where(every, FULL, torch.where(some, PARTIAL, EMPTY)).to(torch.int8).cpu()
        Bn, Hn = max(kind.shape[0], new.shape[0]), max(kind.shape[1], new.shape[1])
        if (Bn, Hn) != tuple(kind.shape[:2]):
            kind = kind.expand(Bn, Hn, *kind.shape[2:]).clone()
        row = kind[:, :, i, c0:c1]
        kind[:, :, i, c0:c1] = torch.where(row == PARTIAL, new, row)
    if kind.shape[0] * kind.shape[1] > 1 and bool((kind == kind[:1, :1]).all()):
        kind = kind[:1, :1].contiguous()  # the same for every batch and head
    return kind


def create_block_mask(mask_mod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device=None, BLOCK_SIZE: int | tuple = 128, _compile: bool = False,
                      separate_full_blocks: bool = True, compute_dq_write_order: bool = False,
                      dq_kv_order: bool = True) -> BlockMask:
    """torch's ``create_block_mask``, from attnkit's block summaries.

    Args:
        mask_mod: an attnkit description (:mod:`attnkit.masks`: interval arithmetic, no mask
            evaluated), a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (its undecided
            tiles are evaluated, one row of tiles at a time; never a ``T x S`` tensor), or
            ``noop_mask``.
        B, H: batch and query heads; None = 1 (broadcast), as in torch.
        Q_LEN, KV_LEN: queries and keys; the mask serves calls of exactly these lengths.
        device: where the listing lives and an evaluated ``mask_mod`` runs (default: the
            description's tensors' device, else torch's default: the current accelerator,
            else the CPU).
        BLOCK_SIZE: tile size, an int or ``(block_q, block_k)``.
        _compile: accepted for torch compatibility, ignored (nothing is compiled).
        separate_full_blocks: list full tiles apart (torch's default); False lists every
            visited tile as partial.
        compute_dq_write_order, dq_kv_order: torch's deterministic-backward metadata for
            CUDA kernels, computed by torch when asked for.

    Returns:
        A :class:`~attnkit.block_mask.BlockMask` (torch's ``BlockMask`` with the description).

    Raises:
        ValueError: a length or block size below 1, or a ``dq_kv_order`` that is not a bool.
        AssertionError: a ``score_mod`` (5 arguments) or another arity (torch's texts).
        TypeError: a ``mask_mod`` that is neither a description nor a callable.
    """
    bq, bk = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    for name, val in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN), ("BLOCK_SIZE", bq),
                      ("BLOCK_SIZE", bk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not isinstance(dq_kv_order, bool):
        raise ValueError("dq_kv_order must be a bool when using create_block_mask")
    mod = _flex_mask(mask_mod)
    if mod is not None:
        mod = mod.resolve(Q_LEN, KV_LEN)
    B, H = B or 1, H or 1
    device = _default_device(device, mod)
    if isinstance(mod, TracedMask):
        # per batch index and head, as torch lists them (a summary is their union)
        kind = mod.classify(B, H, bq, bk)  # (B | 1, H | 1, nQ, nK)
        summary = _merged(kind, (Q_LEN, KV_LEN), (bq, bk))
    else:
        summary = BlockSummary.build(mod, Q_LEN, KV_LEN, bq, bk)
        kind = summary.kind[None, None]  # (1, 1, nQ, nK)
    # an opaque leaf, or kinds combined (whose summaries combine tile by tile, so two
    # intervals that never meet in a row still leave the tile partial): decide by evaluating
    if mod is not None and not isinstance(mod, TracedMask) \
            and (_opaque(mod) or isinstance(mod, (And, Or))) \
            and bool((summary.kind == PARTIAL).any()):
        kind = _evaluate_partial(mod, summary, B, H, device)
        summary = _merged(kind, (Q_LEN, KV_LEN), (bq, bk))
    attr = mask_mod if mod is None or not isinstance(mask_mod, MaskMod) else mod
    bm = BlockMask._described(mod, kind, summary, mask_mod=attr, B=B, H=H, device=device,
                              separate_full_blocks=separate_full_blocks)
    if compute_dq_write_order:
        order = _torch_flex._compute_dq_write_order_from_block_mask(bm, dq_kv_order=dq_kv_order)
        bm.dq_write_order, bm.dq_write_order_full = order
        bm.dq_kv_order, bm.dq_kv_order_spt = None, dq_kv_order
    return bm


# --- flex_attention ----------------------------------------------------------------------------

def _as_score(score_mod):
    if score_mod is None or score_mod is _identity or isinstance(score_mod, ScoreMod):
        return None if score_mod is _identity else score_mod
    if callable(score_mod):
        return TorchScoreFn(score_mod)
    raise TypeError(f"score_mod must be a callable score_mod(score, b, h, q_idx, kv_idx) or "
                    f"an attnkit score description, got {type(score_mod).__name__}")


def flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod=None, block_mask=None,
                   scale: float | None = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options=None, *, return_aux=None):
    """``torch.nn.attention.flex_attention.flex_attention``, run by attnkit's engine.

    Args:
        query: ``(B, H, T, D)``; key ``(B | 1, Hkv, S, D)``; value ``(B | 1, Hkv, S, Dv)``.
            Keys and values of another float dtype are read in the query's (torch's eager
            rule); a key/value batch of 1 serves every query (with a block mask of batch B).
        score_mod: ``fn(score, b, h, q_idx, kv_idx) -> score`` or an attnkit score kind.
        block_mask: torch's ``BlockMask`` or attnkit's (:func:`create_block_mask`), made for
            exactly ``(T, S)``; an attnkit mask description; or None (every key visible).
        scale: score multiplier, default ``1/sqrt(D)``.
        enable_gqa: allow ``H != Hkv`` (query head ``h`` reads kv head ``h // (H // Hkv)``).
        return_lse: deprecated (a FutureWarning, once), as in torch: also return the
            log-sum-exp ``(B, H, T)``.
        kernel_options: torch's kernel options; checked as torch checks them, else ignored.
        return_aux: ``AuxRequest(lse=..., max_scores=...)``.

    Returns:
        ``out (B, H, T, Dv)`` in the query's dtype and memory layout; ``(out, lse)`` with
        ``return_lse``;
        ``(out, AuxOutput(lse, max_scores))`` with ``return_aux`` (float32, float64 for
        float64 queries; natural log; ``-inf`` where a row sees no key). Rows that see no
        key are zeros. Differentiable (``out`` and ``lse``) on every device.

    Raises:
        ValueError: mismatched devices, head dims or heads (``enable_gqa``), a batch that
            does not broadcast, a block mask made for other lengths, both ``return_lse``
            and ``return_aux``, an invalid ``BACKEND`` kernel option (torch's texts).
        NotImplementedError: tensors that are not 4-D, or nested (torch's texts).
        RuntimeError: a block mask on another device, or sliced without its ``mask_mod``
            set again (torch's texts).
        TypeError: a ``block_mask`` or ``score_mod`` of another type.
    """
    from . import engine

    check_inputs(query, key, value, enable_gqa)
    described = isinstance(block_mask, MaskMod)
    if block_mask is not None and not described and not is_block_mask(block_mask):
        raise TypeError(f"block_mask must be a BlockMask (torch's or attnkit's "
                        f"create_block_mask), an attnkit mask description, or None; got "
                        f"{type(block_mask).__name__}")
    check_batch(query, key, value, block_mask)
    want_lse, want_max = aux_wanted(return_lse, return_aux)
    check_kernel_options(kernel_options)
    if key.dtype != query.dtype and key.is_floating_point():
        key = key.to(query.dtype)
    if value.dtype != query.dtype and value.is_floating_point():
        value = value.to(query.dtype)
    if key.size(0) != query.size(0):  # a key/value batch of 1 for every query
        key = key.expand(query.size(0), *key.shape[1:])  # (B, Hkv, S, D)
        value = value.expand(query.size(0), *value.shape[1:])  # (B, Hkv, S, Dv)
    score = _as_score(score_mod)
    mask = {"mask_mod": block_mask} if described else {"block_mask": block_mask}
    result = engine.attention(query, key, value, score_mod=score, scale=scale,
                              return_lse=want_lse, **mask)
    out, lse = result if want_lse else (result, None)
    out = in_query_layout(out, query)
    if return_aux is None:
        return (out, lse) if return_lse else out
    maxes = None
    if want_max:
        if described:
            run = block_mask.resolve(query.size(-2), key.size(-2))
        else:
            run = None if block_mask is None else run_mask(block_mask, *query.shape[:2])
        s = query.size(-1) ** -0.5 if scale is None else scale
        maxes = max_scores(query, key, run, score, s)
    return out, AuxOutput(lse=lse, max_scores=maxes)
