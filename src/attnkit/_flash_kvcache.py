"""flash-attn's ``flash_attn_with_kvcache`` on attnkit (exported by :mod:`attnkit.flash_attn`).

One decoding step over a KV cache, dense ``(batch_size_cache, seqlen_cache, nheads_k,
headdim)`` or paged ``(num_blocks, page_block_size, nheads_k, headdim)`` with a
``block_table``: new keys/values ``k``/``v`` (rotated first when ``rotary_cos``/``rotary_sin``
are given) are written into the cache in place at ``cache_seqlens``, then the queries attend
over each sequence's ``cache_seqlens (+ new)`` positions, bottom-right aligned, from
``cache_leftpad`` on. Each sequence's cache is read in place through
:func:`attnkit.paged.attend_pages` (a dense cache row is one page); a batch whose sequences
all have the same length and no left padding is one :func:`attnkit.attention` call.

Shape letters: ``B`` batch, ``Sq`` queries, ``Sn`` new keys, ``Hk`` key/value heads, ``D``
head dim, ``Dv`` value head dim, ``R`` rotary dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._flash_args import (FlashAttnArgumentError, check_4d, check_alibi, engine_window,
                          flash_lse, softcap_arg, window_sides)
from .engine import attention
from .paged import attend_pages

__all__ = ["flash_attn_with_kvcache"]


def _ints(name: str, value, B: int, low: int, high: int) -> list[int]:
    """``value`` (an int or ``(B,)`` integer tensor) as ``B`` ints in ``[low, high]``."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = [value] * B
    elif isinstance(value, Tensor) and not value.is_floating_point() \
            and value.dtype != torch.bool and tuple(value.shape) == (B,):
        out = value.tolist()
    else:
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
        raise FlashAttnArgumentError(f"{name} must be an int or an integer tensor "
                                     f"(batch_size,) = ({B},), got {got}")
    bad = [x for x in out if not low <= x <= high]
    if bad:
        raise FlashAttnArgumentError(f"{name} must lie in [{low}, {high}], got {bad[0]}")
    return out


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``x (B, L, Hx, D)`` with its first ``R`` features rotated by per-token ``cos``/``sin``
    ``(B, L, R/2)``: pairs ``(2i, 2i+1)`` when ``interleaved`` (GPT-J), else ``(i, i + R/2)``
    (GPT-NeoX), flash-attn's two layouts."""
    R = cos.shape[-1] * 2
    work = torch.promote_types(x.dtype, torch.float32)
    ro = x[..., :R].to(work)
    cos, sin = cos.to(work).unsqueeze(2), sin.to(work).unsqueeze(2)  # (B, L, 1, R/2)
    if interleaved:
        x1, x2 = ro[..., 0::2], ro[..., 1::2]  # (B, L, Hx, R/2) each
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    else:
        x1, x2 = ro.chunk(2, dim=-1)  # (B, L, Hx, R/2) each
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (B, L, Hx, R)
    return torch.cat((rot.to(x.dtype), x[..., R:]), dim=-1)


def _rotary(q, k, cos, sin, seqlens, local: bool, interleaved: bool):
    """q and the new k rotated at their positions (flash-attn: the new keys at
    ``cache_seqlens + j``; the queries likewise when causal or local, else all at
    ``cache_seqlens``)."""
    if sin is None or not isinstance(cos, Tensor) or not isinstance(sin, Tensor):
        raise FlashAttnArgumentError("rotary_cos and rotary_sin go together: pass both "
                                     "(seqlen_ro, rotary_dim / 2) tensors")
    if k is None:
        raise FlashAttnArgumentError("rotary_cos/rotary_sin rotate the new keys: pass k and v "
                                     "to append to the KV cache (as flash-attn requires)")
    if cos.dim() != 2 or cos.shape != sin.shape or 2 * cos.shape[1] > q.shape[-1]:
        raise FlashAttnArgumentError(f"rotary_cos and rotary_sin must both be (seqlen_ro, "
                                     f"rotary_dim / 2) with rotary_dim <= headdim = "
                                     f"{q.shape[-1]}, got {tuple(cos.shape)} and "
                                     f"{tuple(sin.shape)}")
    base = torch.tensor(seqlens, device=cos.device).view(-1, 1)  # (B, 1)
    pos_k = base + torch.arange(k.shape[1], device=cos.device)  # (B, Sn)
    pos_q = base + torch.arange(q.shape[1], device=cos.device) if local else \
        base.expand(-1, q.shape[1])  # (B, Sq)
    longest = max(int(pos_k.max()), int(pos_q.max())) if pos_k.numel() else int(pos_q.max())
    if longest >= cos.shape[0]:
        raise FlashAttnArgumentError(f"rotary_cos/rotary_sin have {cos.shape[0]} positions but "
                                     f"position {longest} is needed (cache_seqlens + new "
                                     f"tokens); make the tables longer")
    return (_rotate(q, cos[pos_q], sin[pos_q], interleaved),
            _rotate(k, cos[pos_k], sin[pos_k], interleaved))


def _page_table(block_table, B: int, num_blocks: int) -> Tensor:
    if not isinstance(block_table, Tensor) or block_table.is_floating_point() \
            or block_table.dim() != 2 or block_table.shape[0] != B:
        got = (f"{block_table.dtype} {tuple(block_table.shape)}"
               if isinstance(block_table, Tensor) else type(block_table).__name__)
        raise FlashAttnArgumentError(f"block_table must be an integer tensor (batch_size, "
                                     f"max_num_blocks_per_seq) with batch_size = {B}, got {got}")
    table = block_table.long().cpu()
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_blocks):
        raise FlashAttnArgumentError(f"block_table holds page ids outside the pool of "
                                     f"{num_blocks} pages (valid 0..{num_blocks - 1})")
    return table


def _write(cache: Tensor, new: Tensor, rows, seqlens, table, page_size: int) -> None:
    """Write ``new (B, Sn, Hk, D)`` into ``cache`` in place at positions ``seqlens[b] + j``."""
    B, Sn = new.shape[:2]
    pos = torch.tensor(seqlens).view(-1, 1) + torch.arange(Sn)  # (B, Sn)
    if table is None:
        r = torch.tensor(rows).view(-1, 1).expand(B, Sn)  # (B, Sn)
        index = (r.to(cache.device), pos.to(cache.device))
    else:
        page = table.gather(1, pos // page_size)  # (B, Sn)
        index = (page.to(cache.device), (pos % page_size).to(cache.device))
    with torch.no_grad():  # the cache is state, as in flash-attn (no backward)
        cache.index_put_(index, new.to(cache.dtype))


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache`` on attnkit (see the module docstring).

    Args:
        q: ``(B, Sq, H, D)``.
        k_cache, v_cache: ``(batch_size_cache, seqlen_cache, Hk, D|Dv)``, or with
            ``block_table`` the page pools ``(num_blocks, page_block_size, Hk, D|Dv)``.
        k, v: optional ``(B, Sn, Hk, D|Dv)`` written into the caches in place at
            ``cache_seqlens`` before attending (needs ``cache_seqlens``).
        rotary_cos, rotary_sin: ``(seqlen_ro, R / 2)``: rotate the first ``R`` features of
            ``k`` (and ``q``) by position; needs ``k``.
        cache_seqlens: int or ``(B,)``: positions already in each cache (default: all).
        cache_batch_idx: ``(B,)`` cache row of each sequence (dense caches only).
        cache_leftpad: ``(B,)`` first valid position of each cache row (dense caches only).
        block_table: ``(B, max_num_blocks_per_seq)`` page ids.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as
            :func:`attnkit.flash_attn.flash_attn_func`, bottom-right.
        rotary_interleaved: pairs ``(2i, 2i+1)`` (True) or ``(i, i + R/2)``.
        num_splits: accepted (flash-attn's split-KV tuning); changes nothing.
        return_softmax_lse: also return ``softmax_lse (B, H, Sq)`` (``+inf`` where a
            query sees no key).

    Returns:
        ``out (B, Sq, H, Dv)``, or ``(out, softmax_lse)``.

    Raises:
        TypeError: non-tensor inputs; what :func:`attnkit.attention` refuses as types.
        FlashAttnArgumentError: (a ValueError and RuntimeError) shapes that do not fit,
            ``k`` without ``v`` or without ``cache_seqlens``, new tokens past the cache's
            capacity (for a paged cache: what ``block_table`` addresses), page ids outside
            the pool, ``cache_batch_idx``/``cache_leftpad`` with ``block_table``, lengths
            out of range, bad rotary tables, window, softcap or slopes.
    """
    check_4d(q=q, k_cache=k_cache, v_cache=v_cache)
    B, H = q.shape[0], q.shape[2]
    cache = _Cache.of(B, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
                      block_table)
    check_alibi(alibi_slopes, B, H)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise FlashAttnArgumentError(f"num_splits must be an int >= 0, got {num_splits!r}")
    left, right = window_sides(window_size, causal, cache.capacity)
    common = dict(left=left, right=right, softcap=softcap_arg(softcap), scale=softmax_scale)
    if rotary_cos is not None or rotary_sin is not None:  # every check is done: now change
        q, k = _rotary(q, k, rotary_cos, rotary_sin, cache.seqlens,
                       left is not None or right is not None, rotary_interleaved)
    if cache.new:
        _write(k_cache, k, cache.rows, cache.seqlens, cache.table, cache.page_size)
        _write(v_cache, v, cache.rows, cache.seqlens, cache.table, cache.page_size)
    out, lse = _attend(q, k_cache, v_cache, cache, alibi_slopes, common)
    out = out.transpose(1, 2).contiguous()  # (B, Sq, H, Dv)
    return (out, flash_lse(lse)) if return_softmax_lse else out


@dataclass
class _Cache:
    """The checked bookkeeping of one call: page table (None for a dense cache), cache row
    of each sequence, positions held before and after the append, first visible position."""

    table: Tensor | None
    page_size: int
    capacity: int
    rows: list[int]
    seqlens: list[int]
    new: int
    starts: list[int]

    @property
    def lengths(self) -> list[int]:
        return [s + self.new for s in self.seqlens]

    @classmethod
    def of(cls, B, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad,
           block_table) -> "_Cache":
        paged = block_table is not None
        if paged and cache_batch_idx is not None:
            raise FlashAttnArgumentError("Paged KVcache does not support cache_batch_idx (as "
                                         "in flash-attn): index block_table's rows instead")
        if paged and cache_leftpad is not None:
            raise FlashAttnArgumentError("cache_leftpad cannot be combined with block_table "
                                         "(as in flash-attn): start each block table at the "
                                         "first valid page instead")
        if k_cache.shape[:3] != v_cache.shape[:3]:
            raise FlashAttnArgumentError(f"k_cache and v_cache must agree on all but the head "
                                         f"dim, got {tuple(k_cache.shape)} and "
                                         f"{tuple(v_cache.shape)}")
        page_size = k_cache.shape[1]
        table = _page_table(block_table, B, k_cache.shape[0]) if paged else None
        capacity = table.shape[1] * page_size if paged else k_cache.shape[1]
        if not paged and cache_batch_idx is None and k_cache.shape[0] < B:
            raise FlashAttnArgumentError(f"k_cache holds {k_cache.shape[0]} sequences but q "
                                         f"has batch_size {B}; pass cache_batch_idx or a larger "
                                         f"cache")
        rows = list(range(B)) if cache_batch_idx is None else \
            _ints("cache_batch_idx", cache_batch_idx, B, 0, k_cache.shape[0] - 1)
        new = _new_tokens(B, k_cache, v_cache, k, v, cache_seqlens)
        seqlens = [capacity] * B if cache_seqlens is None else \
            _ints("cache_seqlens", cache_seqlens, B, 0, capacity)
        if max(seqlens) + new > capacity:
            where = ("the capacity addressable by block_table (max_num_blocks_per_seq * "
                     "page_block_size" if paged else "the capacity of k_cache (seqlen_cache")
            raise FlashAttnArgumentError(f"max(cache_seqlens) + seqlen_new = "
                                         f"{max(seqlens) + new} exceeds {where} = {capacity})")
        starts = [0] * B if cache_leftpad is None else \
            _ints("cache_leftpad", cache_leftpad, B, 0, capacity)
        lengths = [s + new for s in seqlens]
        if any(s > n for s, n in zip(starts, lengths)):
            raise FlashAttnArgumentError(f"cache_leftpad must not pass cache_seqlens (+ new "
                                         f"tokens), got {starts} and {lengths}")
        return cls(table, page_size, capacity, rows, seqlens, new, starts)


def _new_tokens(B, k_cache, v_cache, k, v, cache_seqlens) -> int:
    """How many new keys ``k``/``v`` append (0 without them), after checking them."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        raise FlashAttnArgumentError("k and v go together: pass both to append to the cache, "
                                     "or neither")
    check_4d(k=k, v=v)
    if cache_seqlens is None:
        raise FlashAttnArgumentError("k and v are appended at cache_seqlens: pass "
                                     "cache_seqlens (as flash-attn requires)")
    if k.shape[0] != B or k.shape[:3] != v.shape[:3] or k.shape[2:] != k_cache.shape[2:] \
            or v.shape[3] != v_cache.shape[3]:
        raise FlashAttnArgumentError(f"k and v must be (batch_size, seqlen_new, nheads_k, "
                                     f"headdim) like the cache, got {tuple(k.shape)} and "
                                     f"{tuple(v.shape)} for caches {tuple(k_cache.shape)}")
    return k.shape[1]


def _attend(q, k_cache, v_cache, cache: _Cache, slopes, common):
    """``(out (B, H, Sq, Dv), lse (B, H, Sq))`` over each sequence's cache."""
    B, Sq, H, _ = q.shape
    qt = q.transpose(1, 2)  # (B, H, Sq, D)
    lengths, L = cache.lengths, cache.lengths[0]
    if cache.table is None and len(set(lengths)) == 1 and not any(cache.starts) and L and \
            (slopes is None or slopes.dim() == 1):  # one call for the whole batch
        rows = cache.rows
        pick = slice(0, B) if rows == list(range(B)) else torch.tensor(rows, device=q.device)
        kt = k_cache[pick, :L].transpose(1, 2)  # (B, Hk, L, D)
        vt = v_cache[pick, :L].transpose(1, 2)  # (B, Hk, L, Dv)
        return attention(qt, kt, vt, window=engine_window(common["left"], common["right"]),
                         causal_align="bottom_right", alibi_slopes=slopes,
                         softcap=common["softcap"], scale=common["scale"], return_lse=True)
    Hk, page_size = k_cache.shape[2], cache.page_size
    if cache.table is not None:  # the pools as attend_pages reads them: (Hk, pages * ps, D)
        k_pool = k_cache.reshape(-1, Hk, k_cache.shape[-1]).transpose(0, 1)
        v_pool = v_cache.reshape(-1, Hk, v_cache.shape[-1]).transpose(0, 1)
    outs, lses = [], []
    for b in range(B):
        if cache.table is None:  # one cache row is one page
            row = cache.rows[b]
            k_pool, v_pool, pages = k_cache[row].transpose(0, 1), v_cache[row].transpose(0, 1), [0]
        else:
            pages = cache.table[b, :-(-lengths[b] // page_size)].tolist()
        o, l_ = attend_pages(qt[b:b + 1], k_pool, v_pool, pages, lengths[b], page_size,
                             start=cache.starts[b], alibi_slopes=None if slopes is None else
                             slopes if slopes.dim() == 1 else slopes[b], **common)
        if o is None:  # no visible key: zeros, lse -inf (flash: +inf, set by the caller)
            o = q.new_zeros(1, H, Sq, v_cache.shape[-1])
            l_ = torch.full((1, H, Sq), float("-inf"), device=q.device,
                            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        outs.append(o)
        lses.append(l_)
    return torch.cat(outs, 0), torch.cat(lses, 0)
