"""``attnkit.flash_attn``: flash-attn 2's public functions, running on attnkit's engine.

Code written for ``flash_attn`` runs unchanged after ``from attnkit.flash_attn import
flash_attn_func`` (or ``import attnkit.flash_attn as flash_attn``): the same functions, the
same signatures and defaults (``causal=False``, ``window_size=(-1, -1)``, ``softcap=0.0``
meaning off, positional ``dropout_p, softmax_scale, causal``), flash-attn's layouts
(``(batch, seqlen, nheads, headdim)``; packed ``(total, nheads, headdim)`` with
``cu_seqlens``; paged caches ``(num_blocks, page_block_size, nheads_k, headdim)`` with a
``block_table``) and its return conventions (``out``; ``(out, softmax_lse, S_dmask)`` with
``return_attn_probs``; ``(out, softmax_lse)`` with ``return_softmax_lse``). Every function is
a thin translation into :func:`attnkit.attention`, :func:`attnkit.varlen_attention` or
:func:`attnkit.paged.attend_pages`; there is no second engine.

flash-attn's semantics, kept here: causal masks and windows are aligned bottom-right (query
``i`` of ``Sq`` sits at key position ``i + Sk - Sq``; a window keeps keys ``[p - left, p +
right]``); ALiBi adds ``-slope * |p - j|`` with slopes ``(nheads,)`` or ``(batch, nheads)``;
``softcap > 0`` caps the scaled scores at ``softcap * tanh(s / softcap)``; the window goes
through flash-attn's kernel rule (:func:`attnkit._flash_args.window_sides`: a side ``>=
seqlen_k`` is dropped, an unbounded side next to a bounded one is ``seqlen_k``); rows that see
no key give zeros and a log-sum-exp of ``+inf``. ``(batch, nheads)`` slopes run one call per
sample.

Where attnkit differs (see docs/serving.md, "flash-attn interface"): any float dtype and
device runs (flash-attn: fp16/bf16 on CUDA), head dims need no rounding and ``v`` may have
its own head dim; the log-sum-exp is float64 for float64 inputs; dropout draws from torch's
RNG (same distribution, not flash-attn's bits); ``return_attn_probs`` with ``dropout_p > 0``
is refused (flash-attn returns its dropout-encoded ``S_dmask``, which attnkit does not
produce); ``deterministic`` and ``num_splits`` are accepted and change nothing (attnkit's CPU
backward is deterministic). ``flash_attn_with_kvcache`` writes ``k``/``v`` into the cache in
place and, like flash-attn, gives no gradient to the cache.

Shape letters here follow flash-attn: ``B`` batch, ``Sq``/``Sk`` query/key lengths, ``H``
query heads, ``Hk`` key/value heads, ``D`` head dim, ``Dv`` value head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._flash_args import (FlashAttnArgumentError, check_4d, check_alibi, check_options,
                          engine_window, int_arg, returns, shape_of, softcap_arg, window_sides)
from ._flash_kvcache import flash_attn_with_kvcache
from .engine import attention
from .varlen import varlen_attention

__all__ = ["FlashAttnArgumentError", "flash_attn_func", "flash_attn_kvpacked_func",
           "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache"]


# --- dense batches --------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """flash-attn's ``flash_attn_func`` on attnkit (see the module docstring).

    Args:
        q: ``(B, Sq, H, D)``.
        k: ``(B, Sk, Hk, D)``; ``H`` a multiple of ``Hk`` (MQA/GQA).
        v: ``(B, Sk, Hk, Dv)``.
        dropout_p: dropout on the attention weights, applied whenever > 0 (flash-attn:
            "set to 0.0 during evaluation").
        softmax_scale: score scale, default ``1 / sqrt(D)``.
        causal: bottom-right causal mask.
        window_size: ``(left, right)`` keys on each side of the query's position, -1 =
            unbounded.
        softcap: ``> 0`` caps the scaled scores (``softcap * tanh(s / softcap)``); 0 = off.
        alibi_slopes: ``(H,)`` or ``(B, H)``: adds ``-slope * |i + Sk - Sq - j|``.
        deterministic: accepted; attnkit's backward is deterministic.
        return_attn_probs: also return ``softmax_lse (B, H, Sq)`` and an empty ``S_dmask``.

    Returns:
        ``out (B, Sq, H, Dv)``, or ``(out, softmax_lse, S_dmask)``.

    Raises:
        TypeError: non-tensor inputs, and the dtype errors of :func:`attnkit.attention`.
        FlashAttnArgumentError: (a ValueError and RuntimeError) non-4-D inputs, a bad
            ``window_size``/``softcap``/``alibi_slopes``, ``return_attn_probs`` with dropout.
        ValueError: what :func:`attnkit.attention` refuses (heads, head dims, scale).
    """
    check_4d(q=q, k=k, v=v)
    check_options(dropout_p, return_attn_probs, deterministic)
    B, Sq, H, _ = q.shape
    check_alibi(alibi_slopes, B, H)
    left, right = window_sides(window_size, causal, k.shape[1])
    common = dict(window=engine_window(left, right), causal_align="bottom_right",
                  softcap=softcap_arg(softcap), scale=softmax_scale, dropout_p=dropout_p,
                  return_lse=return_attn_probs)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|Hk, S, D): views
    if alibi_slopes is not None and alibi_slopes.dim() == 2:  # a slope row per sample
        parts = [attention(qt[b:b + 1], kt[b:b + 1], vt[b:b + 1], alibi_slopes=alibi_slopes[b],
                           **common) for b in range(B)]
        res = [torch.cat(p, 0) for p in zip(*parts)] if return_attn_probs else \
            torch.cat(parts, 0)
    else:
        res = attention(qt, kt, vt, alibi_slopes=alibi_slopes, **common)
    out, lse = res if return_attn_probs else (res, None)  # (B, H, Sq, Dv), (B, H, Sq)
    return returns(out.transpose(1, 2).contiguous(), lse, return_attn_probs)  # (B, Sq, H, Dv)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv (B, S, 3, H, D)``; otherwise as
    :func:`flash_attn_func` (gradients reach ``qkv``).

    Raises:
        FlashAttnArgumentError: ``qkv`` not ``(B, S, 3, H, D)``; and as :func:`flash_attn_func`.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise FlashAttnArgumentError(f"qkv must be (batch_size, seqlen, 3, nheads, headdim), "
                                     f"got {shape_of(qkv)}")
    q, k, v = qkv.unbind(2)  # (B, S, H, D) each
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: ``q (B, Sq, H, D)``, ``kv (B, Sk, 2, Hk,
    D)``; otherwise as :func:`flash_attn_func`.

    Raises:
        FlashAttnArgumentError: ``kv`` not ``(B, Sk, 2, Hk, D)``; and as
            :func:`flash_attn_func`.
    """
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise FlashAttnArgumentError(f"kv must be (batch_size, seqlen, 2, nheads_k, headdim), "
                                     f"got {shape_of(kv)}")
    k, v = kv.unbind(2)  # (B, Sk, Hk, D) each
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# --- packed variable-length batches ---------------------------------------------------------

def _page_index(pages: Tensor, block_table, cu_seqlens_k) -> Tensor:
    """``(total_k,)`` row of every packed key in ``pages (num_blocks, page_block_size, Hk, D)``
    flattened: sequence ``b``'s keys are the first ones of the pages ``block_table[b]``."""
    if not isinstance(block_table, Tensor) or block_table.dim() != 2 \
            or block_table.is_floating_point():
        raise FlashAttnArgumentError(f"block_table must be an integer tensor (batch_size, "
                                     f"max_num_blocks_per_seq), got {shape_of(block_table)}")
    if pages.dim() != 4:
        raise FlashAttnArgumentError(f"with block_table, k and v must be the page pools "
                                     f"(num_blocks, page_block_size, nheads_k, headdim), got "
                                     f"shape {tuple(pages.shape)}")
    nb, ps = pages.shape[0], pages.shape[1]
    cu = torch.as_tensor(cu_seqlens_k).long().cpu()
    lens = cu.diff()
    if block_table.shape[0] != lens.numel():
        raise FlashAttnArgumentError(f"block_table has {block_table.shape[0]} rows but "
                                     f"cu_seqlens_k describes {lens.numel()} sequences")
    cap = block_table.shape[1] * ps
    if lens.numel() and int(lens.max()) > cap:
        raise FlashAttnArgumentError(f"a sequence of {int(lens.max())} keys exceeds the "
                                     f"capacity addressable by block_table (max_num_blocks_"
                                     f"per_seq * page_block_size = {cap})")
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens)  # (total_k,)
    pos = torch.arange(int(cu[-1])) - cu[:-1].repeat_interleave(lens)  # (total_k,)
    page = block_table.long().cpu()[seq, pos // ps]  # (total_k,) page of every key
    if page.numel() and (int(page.min()) < 0 or int(page.max()) >= nb):
        raise FlashAttnArgumentError(f"block_table points outside the pool of {nb} pages")
    return (page * ps + pos % ps).to(pages.device)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func`` on :func:`attnkit.varlen_attention`.

    Args:
        q: ``(total_q, H, D)``, the sequences back to back.
        k, v: ``(total_k, Hk, D)`` / ``(total_k, Hk, Dv)``; with ``block_table`` the page
            pools ``(num_blocks, page_block_size, Hk, D)``, sequence ``b``'s keys in the
            pages ``block_table[b]``.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` cumulative lengths (int32 or int64).
        max_seqlen_q, max_seqlen_k: the longest sequences (checked, not needed).
        block_table: ``(B, max_num_blocks_per_seq)`` page ids, or None.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs: as :func:`flash_attn_func`, per sequence
            (``alibi_slopes (B, H)`` one row per sequence).

    Returns:
        ``out (total_q, H, Dv)``, or ``(out, softmax_lse (H, total_q), S_dmask)``.

    Raises:
        FlashAttnArgumentError: a bad ``block_table``, window, softcap or slopes.
        ValueError, TypeError: what :func:`attnkit.varlen_attention` refuses.
    """
    check_options(dropout_p, return_attn_probs, deterministic)
    if block_table is not None:  # each sequence's pages gathered once, packed
        index = _page_index(k, block_table, cu_seqlens_k)  # (total_k,)
        k = k.flatten(0, 1).index_select(0, index)  # (total_k, Hk, D)
        v = v.flatten(0, 1).index_select(0, index)  # (total_k, Hk, Dv)
    if isinstance(q, Tensor) and q.dim() == 3:
        n = len(cu_seqlens_q) - 1
        check_alibi(alibi_slopes, n, q.shape[1])
    if max_seqlen_k is None:  # flash-attn requires it; attnkit can work it out
        max_seqlen_k = int(torch.as_tensor(cu_seqlens_k).diff().max())
    left, right = window_sides(window_size, causal, int_arg("max_seqlen_k", max_seqlen_k))
    res = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal=causal, window=engine_window(left, right),
                           softcap=softcap_arg(softcap), alibi_slopes=alibi_slopes,
                           scale=softmax_scale, dropout_p=dropout_p,
                           return_lse=return_attn_probs)
    out, lse = res if return_attn_probs else (res, None)
    return returns(out, lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: ``qkv (total, 3, H, D)`` with one
    ``cu_seqlens``; otherwise as :func:`flash_attn_varlen_func`.

    Raises:
        FlashAttnArgumentError: ``qkv`` not ``(total, 3, H, D)``; and as
            :func:`flash_attn_varlen_func`.
    """
    if not isinstance(qkv, Tensor) or qkv.dim() != 4 or qkv.shape[1] != 3:
        raise FlashAttnArgumentError(f"qkv must be (total, 3, nheads, headdim), got "
                                     f"{shape_of(qkv)}")
    q, k, v = qkv.unbind(1)  # (total, H, D) each
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: ``kv (total_k, 2, Hk, D)``;
    otherwise as :func:`flash_attn_varlen_func`.

    Raises:
        FlashAttnArgumentError: ``kv`` not ``(total_k, 2, Hk, D)``; and as
            :func:`flash_attn_varlen_func`.
    """
    if not isinstance(kv, Tensor) or kv.dim() != 4 or kv.shape[1] != 2:
        raise FlashAttnArgumentError(f"kv must be (total_k, 2, nheads_k, headdim), got "
                                     f"{shape_of(kv)}")
    k, v = kv.unbind(1)  # (total_k, Hk, D) each
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs)

