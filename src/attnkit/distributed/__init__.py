"""Sequence-parallel attention on ``torch.distributed``: one long sequence, ``P`` processes.

* :func:`ring_attention` - key/value blocks travel around a ring, partial results merge by
  log-sum-exp; memory per rank O(T/P); layouts ``contiguous`` and ``zigzag``.
* :func:`ulysses_attention` - all-to-all over heads around any local backend
  (``H % P == 0``); a second method and a cross-check.
* :func:`shard`, :func:`unshard`, :func:`position_ids` - cut a sequence into per-rank
  shards, gather it back, and the global positions of a shard's tokens (for RoPE).

Both attention functions are collectives: every rank of the group calls them with its shard,
under any launcher (``torchrun``, ``torch.multiprocessing``) and backend (``gloo`` on CPU,
``nccl`` on GPU). See ``docs/distributed.md``.
"""

from .ring import ring_attention
from .sharding import LAYOUTS, position_ids, shard, unshard
from .ulysses import ulysses_attention

__all__ = ["LAYOUTS", "position_ids", "ring_attention", "shard", "ulysses_attention", "unshard"]
