"""How a sequence is cut across ranks, and the process-group plumbing ring and Ulysses share.

Sequence parallelism gives each of ``P`` ranks ``T / P`` of the ``T`` tokens. Two layouts:

``contiguous``: rank ``r`` holds tokens ``[r*T/P, (r+1)*T/P)``. Simple, but with causal
attention rank ``P-1`` sees every key and rank 0 only its own, so in a lock-step ring the
last rank does ``2P-1`` times the work of the first::

    P=2, T=8    rank 0: t0 t1 t2 t3        rank 1: t4 t5 t6 t7

``zigzag`` (head-tail): the sequence is cut into ``2P`` chunks and rank ``r`` holds chunks
``r`` and ``2P-1-r``. Every rank then owns one early and one late chunk, so causal work is the
same on every rank. Needs ``T % 2P == 0``::

    P=2, T=8    chunks c0=t0 t1 | c1=t2 t3 | c2=t4 t5 | c3=t6 t7
                rank 0: c0 c3 = t0 t1 t6 t7    rank 1: c1 c2 = t2 t3 t4 t5

A rank's shard keeps its chunks in increasing position order, which is what lets ring
attention treat its own shard with one ordinary causal mask. Position-dependent layers (RoPE)
must use :func:`position_ids`, not ``arange(T / P)``.

Shape letters: ``B`` batch, ``H`` heads, ``T`` full sequence length, ``P`` world size,
``D`` head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import check_qkv

__all__ = ["LAYOUTS", "position_ids", "shard", "unshard"]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    """Raise ValueError unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def resolve_group(group=None):
    """The process group to use: ``group``, a 1-D DeviceMesh's group, or the default one.

    Raises:
        RuntimeError: ``group`` is None and no default process group exists.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "no torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the "
                "environment for it) or pass group=")
        return dist.group.WORLD
    if hasattr(group, "get_group"):  # a 1-D DeviceMesh
        return group.get_group()
    return group


def rank_and_size(group) -> tuple[int, int]:
    """``(rank, world_size)`` of this process inside ``group``."""
    return dist.get_rank(group), dist.get_world_size(group)


def _chunk_bounds(T: int, layout: str, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` token ranges rank ``rank`` holds, in position order."""
    check_layout(layout)
    parts = world_size if layout == "contiguous" else 2 * world_size
    if T % parts != 0:
        need = "world_size" if layout == "contiguous" else "2 * world_size"
        raise ValueError(f"layout {layout!r} needs the sequence length divisible by {need} = "
                         f"{parts}, got T={T}; pad the sequence to a multiple of {parts}")
    size = T // parts
    chunks = [rank] if layout == "contiguous" else [rank, 2 * world_size - 1 - rank]
    return [(c * size, (c + 1) * size) for c in chunks]


def position_ids(seq_len: int, *, layout: str = "zigzag", group=None, rank: int | None = None,
                 world_size: int | None = None, device=None) -> Tensor:
    """Global positions ``(T/P,)`` of the tokens this rank holds, for RoPE and friends.

    Args:
        seq_len: full sequence length ``T``.
        layout: ``"contiguous"`` or ``"zigzag"``.
        group: process group (default: the world); unused if ``rank`` and ``world_size``
            are both given, so the function also works without a process group.
        rank, world_size: compute the positions for this rank of that many.
        device: device of the result.

    Returns:
        int64 tensor, e.g. ``[0, 1, 6, 7]`` for rank 0 of 2 with zigzag and ``T=8``.

    Raises:
        ValueError: unknown layout or ``T`` not divisible by ``P`` (contiguous) / ``2P``
            (zigzag).
        RuntimeError: no process group and ``rank``/``world_size`` not given.
    """
    check_layout(layout)
    if rank is None or world_size is None:
        group_rank, group_size = rank_and_size(resolve_group(group))
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
    bounds = _chunk_bounds(seq_len, layout, rank, world_size)
    return torch.cat([torch.arange(a, b, device=device) for a, b in bounds])


def shard(x: Tensor, *, layout: str = "zigzag", dim: int = 2, group=None) -> Tensor:
    """This rank's part of a full-sequence tensor.

    Args:
        x: the full tensor, identical on every rank, e.g. ``(B, H, T, D)``.
        layout: ``"contiguous"`` or ``"zigzag"``.
        dim: the sequence dimension (2 for ``(B, H, T, D)``, 1 for ``(B, T, E)``).
        group: process group (default: the world).

    Returns:
        ``x`` with ``T/P`` entries along ``dim`` (a view for contiguous, a copy for
        zigzag); differentiable.

    Raises:
        ValueError: unknown layout, or ``T`` not divisible by ``P`` / ``2P``.
        RuntimeError: no process group.
    """
    check_layout(layout)
    rank, world_size = rank_and_size(resolve_group(group))
    bounds = _chunk_bounds(x.shape[dim], layout, rank, world_size)
    pieces = [x.narrow(dim, a, b - a) for a, b in bounds]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(x: Tensor, *, layout: str = "zigzag", dim: int = 2, group=None) -> Tensor:
    """Gather every rank's shard back into the full sequence, on every rank.

    The inverse of :func:`shard`; meant for checking and evaluation (it is not
    differentiable: backpropagate through the per-rank shards instead).

    Args:
        x: this rank's shard, ``T/P`` long along ``dim``; same shape on every rank.
        layout: the layout it was sharded with.
        dim: the sequence dimension.
        group: process group (default: the world).

    Returns:
        The full tensor, ``T`` long along ``dim``.

    Raises:
        ValueError: unknown layout, or an odd shard length for zigzag.
        RuntimeError: no process group.
    """
    check_layout(layout)
    group = resolve_group(group)
    _, world_size = rank_and_size(group)
    x = x.detach().contiguous()
    gathered = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(gathered, x, group=group)
    if layout == "contiguous":
        return torch.cat(gathered, dim=dim)
    if x.shape[dim] % 2 != 0:
        raise ValueError(f"a zigzag shard holds two equal chunks, so its length along dim "
                         f"{dim} must be even, got {x.shape[dim]}")
    heads = [g.chunk(2, dim=dim)[0] for g in gathered]  # chunk r of rank r
    tails = [g.chunk(2, dim=dim)[1] for g in gathered]  # chunk 2P-1-r of rank r
    return torch.cat(heads + tails[::-1], dim=dim)


def check_shards(q, k, v, causal: bool) -> None:
    """Local checks on one rank's q/k/v shards (before any communication).

    Raises:
        TypeError: non-tensor, non-float or mixed-dtype inputs.
        ValueError: not 4-D, mismatched batch/head_dim/heads, ``H % Hkv != 0``, or q and
            k/v shards of different lengths with ``causal=True``.
    """
    check_qkv(q, k, v, expected="this rank's shard (B, heads, T/P, head_dim)",
              fix="cut the full (B, H, T, D) tensor with attnkit.distributed.shard")
    T, S = q.shape[2], k.shape[2]
    if causal and S != T:
        raise ValueError(f"causal attention needs q and k/v shards of the same length, got "
                         f"{T} and {S}")


def check_shard_length(layout: str, n: int) -> None:
    """A zigzag shard is two equal chunks, so its length ``T/P`` must be even.

    Raises:
        ValueError: odd ``n`` with layout ``"zigzag"``.
    """
    if layout == "zigzag" and n % 2 != 0:
        raise ValueError(f"layout 'zigzag' needs the full sequence length divisible by "
                         f"2 * world_size, so an even shard length, got T/P={n}; pad the "
                         f"sequence or use layout='contiguous'")


def check_same_on_all_ranks(group, fields: dict[str, int], device, caller: str) -> None:
    """All-gather a few integers once and raise the same error on every rank if they differ.

    Every rank gets every rank's values, so either all raise or none does: no rank is left
    waiting in the next collective.

    Raises:
        ValueError: the fields differ between ranks (the message lists them per rank).
        RuntimeError: the all-gather failed (a peer died or the group timed out).
    """
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as err:
        raise RuntimeError(f"{caller}: comparing input shapes across ranks failed; another "
                           f"rank has probably raised or died (see its error), or the process "
                           f"group timed out: {err}") from err
    table = torch.stack(gathered).tolist()  # (P, fields)
    if any(row != table[0] for row in table):
        names = ", ".join(fields)
        rows = "; ".join(f"rank {r}: {tuple(row)}" for r, row in enumerate(table))
        raise ValueError(f"{caller}: inputs differ across ranks ({names}): {rows}; every rank "
                         f"must pass its own equal-sized shard of the same sequence")
