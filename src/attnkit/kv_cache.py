"""A preallocated key/value cache with an explicit position, for incremental decoding.

Autoregressive generation computes the keys and values of each token once and keeps them:
step ``t`` projects only the new token and attends over everything cached so far. The
buffers are allocated once at full size ``(B, Hkv, max_seq_len, D)`` and written in place,
because

* growing a tensor with ``torch.cat`` allocates a new one and copies the whole history on
  every step (O(n^2) bytes over a generation);
* a fixed buffer plus an integer position keeps memory flat, and a compiled decode step is
  reused: the position becomes a symbolic integer after the first recompile, so the number
  of compilations stays bounded however many tokens are generated.

Attention reads only the filled slots ``[0, pos + T)``, not the whole buffer under a mask:
O(pos) work per token instead of O(max_seq_len).

One :class:`KVCache` serves one attention layer. Make it with
:meth:`attnkit.MultiHeadAttention.init_cache` so its heads, head dim, dtype and device match
the layer. The position is explicit (``cache.pos``): it is the number of filled slots, the
position the next token is written at, and the offset rotary embeddings use.

Cross-attention needs no growing cache: its keys and values come from a context (an encoder
output) that is fixed for the whole decode. :class:`ContextKV` holds them projected once, from
:meth:`attnkit.MultiHeadAttention.cache_context`, so each decode step projects only its query.

Shape letters: ``B`` batch, ``Hkv`` key/value heads, ``T`` new positions, ``S`` context
length, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ContextKV", "KVCache"]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class KVCache:
    """Keys and values of the positions decoded so far, in preallocated buffers.

    Slots ``[0, pos)`` hold the cached keys/values; slots from ``pos`` on are free and never
    read. Every position is kept, also for sliding-window layers (there is no ring buffer), so
    ``max_seq_len`` must cover the whole sequence. Decoding is meant to run under ``torch.no_grad()`` or ``torch.inference_mode()``
    (allocate the cache inside the same mode you decode in): gradients do flow through
    in-place writes, but the autograd graph would then span the whole generation.

    Args:
        batch_size: ``B``, sequences decoded together.
        num_kv_heads: ``Hkv``, key/value heads of the layer.
        max_seq_len: capacity in positions (prompt plus generated tokens).
        head_dim: ``D``.
        dtype: buffer dtype; must equal the dtype of the keys written.
        device: buffer device.

    Attributes:
        k: key buffer ``(B, Hkv, max_seq_len, D)``.
        v: value buffer ``(B, Hkv, max_seq_len, D)``.
        pos: number of filled positions (the next write starts here).

    Raises:
        ValueError: a size that is not a positive int.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = tuple(_positive_int(name, value) for name, value in (
            ("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
            ("max_seq_len", max_seq_len), ("head_dim", head_dim)))
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, max_seq_len, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, Hkv, max_seq_len, D)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
                f"max_seq_len={self.max_seq_len}, head_dim={self.head_dim}, pos={self.pos}, "
                f"dtype={self.k.dtype}, device={self.k.device})")

    def reset(self) -> None:
        """Forget every cached position (the buffers are kept; old slots are never read)."""
        self.pos = 0

    def check_write(self, batch_size: int, length: int) -> None:
        """Raise unless ``length`` new positions of a batch of ``batch_size`` fit.

        Raises:
            ValueError: ``batch_size`` differs from the cache's.
            RuntimeError: the write would pass ``max_seq_len``.
        """
        if batch_size != self.batch_size:
            raise ValueError(f"the cache holds batch_size={self.batch_size} sequences but the "
                             f"input has batch size {batch_size}; make a cache for this batch "
                             f"with init_cache(batch_size={batch_size}, max_seq_len=...)")
        if self.pos + length > self.max_seq_len:
            raise RuntimeError(
                f"KVCache is full: writing {length} position(s) at pos={self.pos} needs "
                f"{self.pos + length} slots but its capacity is max_seq_len={self.max_seq_len}; "
                f"make a larger cache with init_cache(batch_size, max_seq_len=...) or call "
                f"cache.reset() to start a new sequence")

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write new keys/values at ``pos``, advance ``pos``, return everything cached.

        Args:
            k_new: keys of the new positions ``(B, Hkv, T, D)``.
            v_new: values of the new positions ``(B, Hkv, T, D)``.

        Returns:
            ``(k, v)``: views of the filled slots, each ``(B, Hkv, pos + T, D)`` (``pos`` as it
            was before the call). They alias the buffers: later writes land past them, but
            after :meth:`reset` new writes overwrite them.

        Raises:
            ValueError: shapes that do not match the cache, or another device.
            TypeError: a dtype other than the cache's.
            RuntimeError: not enough room (the message gives the capacity).
        """
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.dim() != 4 or t.shape[1] != self.num_kv_heads or t.shape[3] != self.head_dim:
                raise ValueError(f"{name} must be (B, Hkv={self.num_kv_heads}, T, "
                                 f"D={self.head_dim}) to fit this cache, got {tuple(t.shape)}")
            if t.dtype != self.k.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {self.k.dtype}; "
                                f"make the cache with init_cache(..., dtype={t.dtype})")
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.k.device}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"k_new and v_new must have the same shape, got "
                             f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
        start, length = self.pos, k_new.shape[2]
        self.check_write(k_new.shape[0], length)
        # Slice assignment writes in place; under torch.compile `start` becomes a symbolic
        # int after one recompile, so later steps reuse the same graph.
        self.k[:, :, start:start + length] = k_new
        self.v[:, :, start:start + length] = v_new
        self.pos = start + length
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]  # (B, Hkv, pos + T, D) each

    def at_positions(self, mask_mod, num_new: int):
        """A mask description for the whole sequence, placed at this step's positions.

        Call it after :meth:`update` wrote ``num_new`` positions: the step's queries are
        positions ``pos - num_new .. pos - 1`` and the keys ``0 .. pos - 1``, so a
        description written for the full sequence (``documents(ids)`` with ids of the whole
        sequence, ``prefix_lm(n)``, windows) masks the step exactly as it masks a full
        forward; pass the result as ``attention(..., mask_mod=...)``.

        Raises:
            ValueError: ``num_new`` is not between 1 and ``pos``.
        """
        from .masks import at_positions  # masks imports nothing from here; kept lazy anyway

        if not isinstance(num_new, int) or not 1 <= num_new <= self.pos:
            raise ValueError(f"num_new must be the positions just written, 1..pos={self.pos}, "
                             f"got {num_new!r}")
        return at_positions(mask_mod, q_offset=self.pos - num_new, kv_offset=0)


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class ContextKV:
    """A cross-attention context's keys and values, projected once and reused every step.

    Make it with :meth:`attnkit.MultiHeadAttention.cache_context` (which applies that layer's
    k/v projection) and pass it as ``cache=`` to the same layer's forward in place of
    ``context=``: the output is the same, without re-projecting the context. It is read-only
    (nothing is appended while decoding) and holds whatever autograd graph produced it.

    Args:
        k: keys ``(B, Hkv, S, D)``, already projected.
        v: values ``(B, Hkv, S, D)``, already projected.

    Raises:
        TypeError: ``k`` or ``v`` not a tensor, or their dtypes differ.
        ValueError: ``k`` not 4-D, ``v``'s shape other than ``k``'s, or another device.
    """

    k: Tensor
    v: Tensor

    def __post_init__(self):
        for name, t in (("k", self.k), ("v", self.v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"ContextKV.{name} must be a torch.Tensor, got {type(t).__name__}")
        if self.k.dim() != 4:
            raise ValueError(f"ContextKV.k must be (B, Hkv, S, D), got shape {tuple(self.k.shape)}")
        if self.v.shape != self.k.shape:
            raise ValueError(f"ContextKV.v must have k's shape {tuple(self.k.shape)}, got "
                             f"{tuple(self.v.shape)}")
        if self.v.dtype != self.k.dtype:
            raise TypeError(f"ContextKV.k has dtype {self.k.dtype} but v has {self.v.dtype}")
        if self.v.device != self.k.device:
            raise ValueError(f"ContextKV.k is on {self.k.device} but v is on {self.v.device}")

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """``S``, the number of context positions (keys)."""
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def __repr__(self) -> str:
        return (f"ContextKV(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
                f"length={self.length}, head_dim={self.head_dim}, dtype={self.k.dtype}, "
                f"device={self.k.device})")
