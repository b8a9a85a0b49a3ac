"""Ulysses sequence parallelism: trade the sequence split for a head split, attend locally.

DeepSpeed-Ulysses (Jacobs et al. 2023) starts from the same shards as ring attention, each
rank holding ``T/P`` tokens of every head. One all-to-all turns that into *all* ``T`` tokens of
``H/P`` heads; heads are independent, so any single-process attention (here
:func:`attnkit.attention` with its choice of backend, the O(T)-memory ``chunked`` one
included) computes them exactly; a second all-to-all returns each rank's tokens::

    before:  rank r holds (B, H,   T/P, D)    tokens of its shard, every head
    after:   rank r holds (B, H/P, T,   D)    every token, heads r*H/P .. (r+1)*H/P - 1

It needs ``H % P == 0``. Key/value heads are split the same way when ``Hkv % P == 0``;
otherwise (GQA with few key/value heads) they are repeated up to ``H`` first, which costs
memory and bandwidth. Each rank sends about ``2 * B * (H + Hkv) * T/P * D`` elements per
forward (q, k, v and the output, each ``(P-1)/P`` of it), against the ring's
``2 * B * Hkv * T * D``; during attention a rank holds every token of ``H/P`` heads, which is
still ``1/P`` of the activations.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` full length,
``D`` head dim, ``P`` world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import repeat_kv
from ..engine import attention
from .sharding import (LAYOUTS, check_layout, check_same_on_all_ranks, check_shard_length,
                       check_shards, position_ids, rank_and_size, resolve_group)

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with equal splits along dim 0, differentiable.

    With equal splits, chunk ``i`` of rank ``r`` lands in slot ``r`` of rank ``i``; sending
    the gradient through the same exchange puts every chunk back where it came from, so the
    op is its own adjoint.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: Tensor, group) -> Tensor:
    x = x.contiguous()  # the collective splits the flat buffer: dim 0 must be outermost
    out = torch.empty_like(x)
    try:
        dist.all_to_all_single(out, x, group=group)
    except RuntimeError as err:
        raise RuntimeError(f"ulysses_attention: all-to-all failed on rank "
                           f"{dist.get_rank(group)}; another rank has probably raised or died "
                           f"(see its error), or the process group timed out: {err}") from err
    return out


def _seq_to_heads(x: Tensor, P: int, group) -> Tensor:
    """``(B, H, T/P, D)`` sequence shard -> ``(B, H/P, T, D)`` head shard."""
    B, H, n, D = x.shape
    send = x.reshape(B, P, H // P, n, D).transpose(0, 1)  # (P, B, H/P, T/P, D): by destination
    recv = _AllToAll.apply(send, group)  # (P, B, H/P, T/P, D): by source rank
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, D)  # (B, H/P, T, D)


def _heads_to_seq(x: Tensor, P: int, group) -> Tensor:
    """``(B, H/P, T, D)`` head shard -> ``(B, H, T/P, D)`` sequence shard."""
    B, h, T, D = x.shape
    send = x.reshape(B, h, P, T // P, D).permute(2, 0, 1, 3, 4)  # (P, B, H/P, T/P, D)
    recv = _AllToAll.apply(send, group)  # (P, B, H/P, T/P, D): head group of each source
    return recv.transpose(0, 1).reshape(B, P * h, T // P, D)  # (B, H, T/P, D)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, group=None,
                      backend: str = "auto", layout: str = "zigzag",
                      scale: float | None = None, mask_mod=None) -> Tensor:
    """Exact attention over a sequence sharded across ranks, by all-to-all over heads.

    Takes and returns the same shards as :func:`ring_attention`, so the two are
    interchangeable (and cross-check each other). A collective: call it on every rank.

    Args:
        q: this rank's queries ``(B, H, T/P, D)``; ``H`` divisible by the world size.
        k: this rank's keys ``(B, Hkv, T/P, D)``; ``H % Hkv == 0``.
        v: this rank's values ``(B, Hkv, T/P, Dv)``.
        causal: each token sees only tokens at or before its global position.
        group: process group or 1-D DeviceMesh; default: the world group.
        backend: the local engine, any name :func:`attnkit.attention` accepts.
        layout: how the sequence was sharded (``"zigzag"`` or ``"contiguous"``); with
            ``causal`` the gathered tokens are put in position order before attending.
        scale: score multiplier, default ``1/sqrt(D)``.
        mask_mod: a mask description for the whole sequence (global positions), as in
            :func:`attnkit.distributed.ring_attention`; each rank applies it to all ``T``
            positions of its heads (so ``h`` in a callable is the rank-local head index).

    Returns:
        This rank's output shard ``(B, H, T/P, Dv)`` in the input dtype.

    Raises:
        RuntimeError: no process group (call ``torch.distributed.init_process_group`` or
            pass ``group``); a peer failed or timed out during an all-to-all.
        ValueError: ``H`` not divisible by the world size; unknown layout; shapes that differ
            across ranks or do not fit; an odd shard length with zigzag; a backend that
            cannot serve the call.
        TypeError: non-tensor, non-float or mixed-dtype inputs.
    """
    check_layout(layout)
    group = resolve_group(group)
    check_shards(q, k, v, causal)
    _, P = rank_and_size(group)
    check_same_on_all_ranks(group, {
        "B": q.shape[0], "H": q.shape[1], "Hkv": k.shape[1], "T/P": q.shape[2],
        "S/P": k.shape[2], "D": q.shape[3], "Dv": v.shape[3], "itemsize": q.element_size(),
        "causal": int(bool(causal)), "layout": LAYOUTS.index(layout),
        "mask_mod": int(mask_mod is not None),
    }, q.device, "ulysses_attention")
    H, Hkv, n = q.shape[1], k.shape[1], q.shape[2]
    check_shard_length(layout, n)
    if H % P != 0:
        raise ValueError(f"ulysses_attention splits heads across ranks: num_heads ({H}) must be "
                         f"divisible by the world size ({P}); use ring_attention otherwise")
    if Hkv % P != 0:  # too few key/value heads to split: give every query head its own copy
        k, v = repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv)  # (B, H, T/P, D)
    q, k, v = (_seq_to_heads(t, P, group) for t in (q, k, v))  # (B, H/P, T, D)
    # Rank r's shard arrives in slot r, so the gathered order is the shards' order. Without
    # a causal mask the order is irrelevant (keys are a set, rows go back where they came
    # from); with one, sort into position order and undo it afterwards.
    order = None
    if (causal or mask_mod is not None) and layout != "contiguous" and P > 1:
        where = torch.cat([position_ids(n * P, layout=layout, rank=r, world_size=P)
                           for r in range(P)]).to(q.device)  # (T,): position of each slot
        order = torch.argsort(where)
        q, k, v = (t.index_select(2, order) for t in (q, k, v))  # (B, H/P, T, D), in order
    out = attention(q, k, v, causal=causal, backend=backend, scale=scale,
                    mask_mod=mask_mod)  # (B, H/P, T, Dv)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))  # back to the gathered order
    return _heads_to_seq(out, P, group)  # (B, H, T/P, Dv)
