r"""Ring attention: exact attention over a sequence split across ``P`` processes.

Each rank keeps its query shard and passes its key/value shard around the ring: at step
``s`` rank ``r`` holds the keys and values of rank ``src = (r - s) mod P``, attends to them
and merges the partial result into its running output by log-sum-exp
(:func:`attnkit.functional.merge_partial_attention`). After ``P`` steps every query has seen
every key, and no rank ever held more than two key/value shards: memory per rank is O(T/P).

Keys and values travel as one packed buffer, with exactly one ``isend`` and one ``irecv``
outstanding per step; the transfer of the next block is posted before the current block is
computed so the two can overlap (NCCL progresses in the background; gloo mostly does the work
inside ``wait()``, so expect little overlap on CPU).

Backward is a second ring: dQ accumulates at home, while dK/dV ride in the same packed buffer
as the K/V they belong to, each rank adding its contribution as the block passes. Each block
backward uses the *global* output and log-sum-exp (FlashAttention-2 style), which makes the
sum over blocks exact. After ``P`` steps the gradient of block ``r`` sits on rank ``r - 1``,
one last hop sends it home.

Causal masking by block (``\`` = causal mask, ``#`` = all visible, ``.`` = skipped)::

    contiguous, P=2        keys of rank 0   keys of rank 1
        rank 0 queries          \                .
        rank 1 queries          #                \

    zigzag, P=2: rank 0 holds chunks c0 c3, rank 1 holds c1 c2
                     keys:  c0 c3 | c1 c2
        rank 0 queries c0    \  . | .  .
                       c3    #  \ | #  #
        rank 1 queries c1    #  . | \  .
                       c2    #  . | #  \

Own block: one causal mask (a zigzag shard is in position order, so one mask covers both
chunks). A block from an earlier rank: every query against the *first* chunk only. A block
from a later rank: only the *second* query chunk, against both chunks. Every zigzag step costs
the same, which is what balances the ring.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``,
``T`` local (per-rank) length, ``D`` head dim, ``P`` world size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import chunked
from ..backends.chunked import chunked_block_backward
from ..engine import attention
from ..functional import merge_partial_attention
from ..masks import Causal, MaskSpec, and_masks, as_mask_mod, at_positions
from .sharding import (LAYOUTS, check_layout, check_same_on_all_ranks, check_shard_length,
                       check_shards, rank_and_size, resolve_group)

__all__ = ["ring_attention"]

class _Ring:
    """This rank's neighbours in ``group`` and the packed-buffer exchange with them."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = rank_and_size(group)
        # isend/irecv take global ranks, not ranks inside the group.
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send: Tensor, what: str):
        """Post ``send`` to the next rank and a receive from the previous one."""
        recv = torch.empty_like(send)
        try:  # gloo raises here already when a peer's connection is gone
            works = [dist.isend(send, self.next, group=self.group),
                     dist.irecv(recv, self.prev, group=self.group)]
        except RuntimeError as err:
            raise self._failed(what, err) from err
        return recv, works

    def finish(self, works, what: str) -> None:
        """Wait for both requests."""
        try:
            for work in works:
                work.wait()
        except RuntimeError as err:
            raise self._failed(what, err) from err

    def _failed(self, what: str, err: Exception) -> RuntimeError:
        """The error to raise when a transfer fails: name the step and the neighbours."""
        return RuntimeError(
            f"ring_attention: {what} failed on rank {self.rank} of {self.size} while "
            f"receiving from global rank {self.prev} and sending to {self.next}; another "
            f"rank has probably raised or died (see its error), or the process group "
            f"timed out: {err}")

    def exchange(self, send: Tensor, what: str) -> Tensor:
        """Send ``send`` on, return what the previous rank sent, both finished."""
        recv, works = self.start(send, what)
        self.finish(works, what)
        return recv


def _pack(*tensors: Tensor) -> Tensor:
    """One flat contiguous buffer, so a block travels as a single message."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buf: Tensor, *shapes) -> list[Tensor]:
    """Views into ``buf`` with the given shapes (writes go through to ``buf``)."""
    views, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(buf[start:start + n].view(shape))
        start += n
    return views


def _runs(layout: str, rank: int, size: int, n: int):
    """``(local slice, global start)`` of each position-contiguous run of a rank's shard."""
    if layout == "contiguous":
        return [(slice(0, n), rank * n)]
    h = n // 2
    return [(slice(0, h), rank * h), (slice(h, n), (2 * size - 1 - rank) * h)]


def _described_pieces(mod, layout: str, rank: int, src: int, size: int, n: int):
    """Pieces for a mask description at global positions: every pair of contiguous runs,
    with the description shifted to them (:func:`attnkit.masks.at_positions`), skipping
    pairs its block summary proves empty."""
    pieces = []
    for rows, q0 in _runs(layout, rank, size, n):
        for keys, k0 in _runs(layout, src, size, n):
            nq, nk = rows.stop - rows.start, keys.stop - keys.start
            local = at_positions(mod, q0, k0).resolve(nq, nk)
            some, _ = local.blocks(torch.tensor([[0]]), torch.tensor([[nq - 1]]),
                                   torch.tensor([[0]]), torch.tensor([[nk - 1]]))
            if bool(some.all()):
                pieces.append((rows, keys, MaskSpec(mask_mod=local)))
    return pieces


def _pieces(layout: str, causal: bool, rank: int, src: int, n: int, size: int = 1,
            mod=None):
    """The visible sub-blocks when rank ``rank`` holds the keys of rank ``src``.

    Returns a list of ``(query rows, key rows, MaskSpec)``; empty if nothing is visible.
    ``n`` is the local length (zigzag: two chunks of ``n // 2``). With a mask description
    ``mod`` (global positions), see :func:`_described_pieces`.
    """
    if mod is not None:
        return _described_pieces(and_masks(mod, Causal()) if causal else mod, layout, rank,
                                 src, size, n)
    every = slice(None)
    if not causal:
        return [(every, every, MaskSpec())]
    if src == rank:
        return [(every, every, MaskSpec(mask_mod=Causal()))]
    if layout == "contiguous":
        return [(every, every, MaskSpec())] if src < rank else []
    half = n // 2
    if src < rank:  # its early chunk precedes both of ours, its late chunk follows both
        return [(every, slice(0, half), MaskSpec())]
    # Both its chunks lie between ours: only our late chunk sees them, and all of them.
    return [(slice(half, None), every, MaskSpec())]


def _ring_forward(q, k, v, ring: _Ring, causal: bool, layout: str, scale: float, mod=None):
    B, H, T, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Merge in float32 (or float64) so P merges do not round P times in half precision.
    out = torch.zeros(B, H, T, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((B, H, T), float("-inf"), dtype=acc, device=q.device)
    kv = _pack(k, v)
    for step in range(ring.size):
        more = step + 1 < ring.size
        if more:  # post the next block's transfer first so it can overlap this compute
            incoming, works = ring.start(kv, f"forward step {step + 1} of {ring.size - 1}")
        k_s, v_s = _unpack(kv, k.shape, v.shape)
        src = (ring.rank - step) % ring.size
        for rows, keys, spec in _pieces(layout, causal, ring.rank, src, T, ring.size, mod):
            o, l = attention(q[:, :, rows], k_s[:, :, keys], v_s[:, :, keys], spec=spec,
                             scale=scale, backend="chunked", return_lse=True)
            out[:, :, rows], lse[:, :, rows] = merge_partial_attention(
                out[:, :, rows], lse[:, :, rows], o, l)
        if more:
            ring.finish(works, f"forward step {step + 1} of {ring.size - 1}")
            kv = incoming
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, ring: _Ring, causal: bool, layout: str,
                   scale: float, mod=None):
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, H, T): the softmax backward's row term
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # K/V go in the accumulation dtype (a lossless cast) so their gradients can share the buffer.
    buf = _pack(k.to(acc), v.to(acc), torch.zeros(k.shape, dtype=acc, device=k.device),
                torch.zeros(v.shape, dtype=acc, device=v.device))
    n_kv = k.numel() + v.numel()
    for step in range(ring.size):
        k_s, v_s, dk_s, dv_s = _unpack(buf, k.shape, v.shape, k.shape, v.shape)
        src = (ring.rank - step) % ring.size
        for rows, keys, spec in _pieces(layout, causal, ring.rank, src, q.shape[2],
                                        ring.size, mod):
            # dk_s/dv_s are views into buf: the gradient travels on with its block.
            grads = (dq[:, :, rows], dk_s[:, :, keys], dv_s[:, :, keys])
            chunked_block_backward(dout[:, :, rows], q[:, :, rows], k_s[:, :, keys],
                                   v_s[:, :, keys], lse[:, :, rows], delta[:, :, rows],
                                   spec, scale=scale, grads=grads,
                                   block_q=chunked.BLOCK_Q, block_k=chunked.BLOCK_K)
        if step + 1 < ring.size:
            buf = ring.exchange(buf, f"backward step {step + 1} of {ring.size}")
    dkv = buf[n_kv:]
    if ring.size > 1:  # the finished gradient of block r + 1 is here: one hop home
        dkv = ring.exchange(dkv.contiguous(), f"backward step {ring.size} of {ring.size}")
    dk, dv = _unpack(dkv, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, layout, scale, mod):
        out, lse = _ring_forward(q, k, v, ring, causal, layout, scale, mod)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (ring, causal, layout, scale, mod)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, group=None,
                   layout: str = "zigzag", scale: float | None = None,
                   mask_mod=None) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Call it on every rank of the group with that rank's shard (see
    :func:`attnkit.distributed.shard`); it is a collective, like ``all_reduce``. Under
    autograd every rank must also run backward through its output.

    Args:
        q: this rank's queries ``(B, H, T/P, D)``.
        k: this rank's keys ``(B, Hkv, T/P, D)``; ``H % Hkv == 0`` (grouped-query attention).
        v: this rank's values ``(B, Hkv, T/P, Dv)``.
        causal: each token sees only tokens at or before its global position.
        group: process group or 1-D DeviceMesh; default: the world group.
        layout: how the sequence was sharded, ``"zigzag"`` (balanced for causal) or
            ``"contiguous"``; must match the sharding (it decides the causal masks).
        scale: score multiplier, default ``1/sqrt(D)``.
        mask_mod: a mask description from :mod:`attnkit.masks` written for the *whole*
            sequence (global positions: ``documents(ids)`` with ids ``(B, T)``,
            ``prefix_lm(n)``, windows ...); every rank must pass the same one. Each block
            sees it shifted to its positions, and blocks it leaves empty are skipped.

    Returns:
        This rank's output shard ``(B, H, T/P, Dv)`` in the input dtype.

    Raises:
        RuntimeError: no process group (call ``torch.distributed.init_process_group`` or
            pass ``group``); a peer failed or timed out during the ring.
        ValueError: unknown layout; shapes that differ across ranks or do not fit; an odd
            shard length with zigzag (the full length must be divisible by ``2P``).
        TypeError: non-tensor, non-float or mixed-dtype inputs.
    """
    check_layout(layout)
    group = resolve_group(group)
    check_shards(q, k, v, causal)
    # Shapes, dtype size and flags must agree before the first message: a mismatch would
    # otherwise surface as a hang or a garbled receive.
    check_same_on_all_ranks(group, {
        "B": q.shape[0], "H": q.shape[1], "Hkv": k.shape[1], "T/P": q.shape[2],
        "S/P": k.shape[2], "D": q.shape[3], "Dv": v.shape[3], "itemsize": q.element_size(),
        "causal": int(bool(causal)), "layout": LAYOUTS.index(layout),
        "mask_mod": int(mask_mod is not None),
    }, q.device, "ring_attention")
    check_shard_length(layout, q.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mod = None if mask_mod is None else as_mask_mod(mask_mod)
    return _RingAttentionFn.apply(q, k, v, _Ring(group), bool(causal), layout, scale, mod)
