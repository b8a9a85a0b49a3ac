"""The mask protocol and the structural kinds behind :mod:`attnkit.masks` (import them from
there); the kinds holding data (padding, documents, prefix, chunked-local) are in
:mod:`attnkit._mod_kinds`.

Every kind answers four questions, each in the form one backend needs:

* ``grid(b, h, q, k)``: bool on broadcast index tensors (math, flex's ``mask_mod``);
* ``tile(b, h, q0, q1, k0, k1)``: the same on one block, by slicing where it can (chunked);
* ``blocks(q_lo, q_hi, k_lo, k_hi)``: ``(some, every)`` for whole blocks at once, from interval
  arithmetic: ``some`` False means no pair in the block is visible (skip it), ``every`` True
  means all are (no mask needed). Both may err only on the safe side (some=True, every=False);
* ``describe()``: a short readable name for ``explain()``.

``resolve(T, S)`` fixes what depends on the call's lengths (the bottom-right offset);
``validate(B, H, T, S)`` checks tensors against them. Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

ALIGNMENTS = ("top_left", "bottom_right")


def check_broadcasts(name: str, t: Tensor, B: int, H: int, T: int, S: int) -> None:
    """Check that tensor argument ``name`` broadcasts to ``(B, H, T, S)``.

    Raises:
        ValueError: more than 4 dims, or a shape that does not broadcast (named in the message).
    """
    ok = t.dim() <= 4
    if ok:
        try:
            ok = torch.broadcast_shapes(t.shape, (B, H, T, S)) == torch.Size((B, H, T, S))
        except RuntimeError:
            ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to "
                         f"(B, H, T, S) = {(B, H, T, S)}")


def check_align(align) -> None:
    """``align`` is a name from :data:`ALIGNMENTS` or an explicit int offset."""
    if isinstance(align, bool) or not (align in ALIGNMENTS or isinstance(align, int)):
        raise ValueError(f"causal_align must be one of {ALIGNMENTS} or an int offset "
                         f"(query i sees key j <= i + offset), got {align!r}")


def offset_of(T: int, S: int, align) -> int:
    """How many keys precede query 0's own position: 0 top-left, S - T bottom-right."""
    if isinstance(align, int):
        return align
    return 0 if align == "top_left" else S - T


def _index(B: int, H: int, q0: int, q1: int, k0: int, k1: int, device):
    """Broadcast index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q (1,1,nq,1)``, ``k``."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)  # (1, 1, nq, 1)
    k = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)  # (1, 1, 1, nk)
    return b, h, q, k


class MaskMod:
    """Base of every mask description; subclasses override ``grid`` and, to let chunked
    skip work, ``blocks``. ``&`` and ``|`` compose."""

    def __call__(self, b, h, q_idx, kv_idx):
        return self.grid(b, h, q_idx, kv_idx)

    def grid(self, b, h, q, k) -> Tensor:
        raise NotImplementedError

    def tile(self, B: int, H: int, q0: int, q1: int, k0: int, k1: int, device) -> Tensor:
        """Bool broadcastable to ``(B, H, q1 - q0, k1 - k0)`` for one block."""
        return self.grid(*_index(B, H, q0, q1, k0, k1, device))

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        shape = (q_lo.shape[0], k_lo.shape[-1])  # (nQ, 1) with (1, nK)
        return (torch.ones(shape, dtype=torch.bool, device=q_lo.device),
                torch.zeros(shape, dtype=torch.bool, device=q_lo.device))

    def summary(self, T: int, S: int, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
        """``(some, every)``, bool ``(nQ, nK)``: whether some / every key of each block of
        ``block_q`` queries x ``block_k`` keys is visible, from :meth:`blocks` (interval
        arithmetic, never a ``T x S`` tensor), on the device of the description's tensors."""
        tensors = self.tensors()
        device = tensors[0].device if tensors else None
        q_lo = torch.arange(0, T, block_q, device=device).view(-1, 1)  # (nQ, 1)
        q_hi = (q_lo + block_q).clamp(max=T) - 1
        k_lo = torch.arange(0, S, block_k, device=device).view(1, -1)  # (1, nK)
        k_hi = (k_lo + block_k).clamp(max=S) - 1
        some, every = self.blocks(q_lo, q_hi, k_lo, k_hi)
        shape = (q_lo.shape[0], k_lo.shape[1])
        return torch.broadcast_to(some, shape), torch.broadcast_to(every, shape)

    def resolve(self, T: int, S: int) -> "MaskMod":
        return self

    def validate(self, B: int, H: int, T: int, S: int) -> None:
        return None

    def describe(self) -> str:
        return type(self).__name__.lower()

    def tensors(self) -> tuple:
        """Tensors the description holds (device checks, cache keys)."""
        return ()

    def __and__(self, other):
        return And((self, as_mask_mod(other)))

    def __or__(self, other):
        return Or((self, as_mask_mod(other)))


def as_mask_mod(mod) -> MaskMod:
    """A description as is; a callable ``fn(b, h, q_idx, kv_idx)`` wrapped in :class:`MaskFn`.

    Raises:
        TypeError: neither.
    """
    if isinstance(mod, MaskMod):
        return mod
    if callable(mod):
        return MaskFn(mod)
    raise TypeError(f"mask_mod must be a mask description from attnkit.masks or a callable "
                    f"fn(b, h, q_idx, kv_idx) -> bool tensor, got {type(mod).__name__}")


@dataclass(frozen=True, eq=False)
class MaskFn(MaskMod):
    """A user's ``fn(b, h, q_idx, kv_idx) -> bool`` written with broadcasting tensor ops."""

    fn: Callable

    def grid(self, b, h, q, k):
        return self.fn(b, h, q, k)

    def describe(self):
        return getattr(self.fn, "__name__", "mask_fn")


@dataclass(frozen=True, eq=False)
class Window(MaskMod):
    """Query at position ``p = i + offset`` sees keys ``p - left <= j <= p + right``."""

    left: int | None = None
    right: int | None = 0
    align: object = "top_left"
    offset: int | None = None

    def __post_init__(self):
        check_align(self.align)
        for name in ("left", "right"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"{name} must be a non-negative int (keys on that side of the "
                                 f"query) or None for unbounded, got {val!r}")
        if self.offset is not None and (not isinstance(self.offset, int)
                                        or isinstance(self.offset, bool)):
            raise ValueError(f"offset must be an int, got {self.offset!r}")

    def resolve(self, T, S):
        return self if self.offset is not None else replace(self, offset=offset_of(T, S, self.align))

    def _o(self):
        return 0 if self.offset is None else self.offset

    def grid(self, b, h, q, k):
        p = q + self._o()
        ok = None
        if self.left is not None:
            ok = k >= p - self.left
        if self.right is not None:
            ok = (k <= p + self.right) if ok is None else ok & (k <= p + self.right)
        return torch.ones_like(k - p, dtype=torch.bool) if ok is None else ok

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        o = self._o()
        shape = (q_lo.shape[0], k_lo.shape[-1])  # (nQ, 1) with (1, nK)
        some = every = torch.ones(shape, dtype=torch.bool, device=q_lo.device)  # narrowed below
        if self.left is not None:
            some = some & (k_hi >= q_lo + o - self.left)
            every = every & (k_lo >= q_hi + o - self.left)
        if self.right is not None:
            some = some & (k_lo <= q_hi + o + self.right)
            every = every & (k_hi <= q_lo + o + self.right)
        return some, every

    def describe(self):
        at = f", offset={self.offset}" if self.offset else ""
        return f"window(left={self.left}, right={self.right}{at})"


@dataclass(frozen=True, eq=False)
class Causal(Window):
    """``Window(left=None, right=0)``: no key after the query's own position."""

    def describe(self):
        if self.offset:
            return f"causal(offset={self.offset})"
        return "causal" if self.offset is not None or self.align == "top_left" else \
            f"causal({self.align})"


@dataclass(frozen=True, eq=False)
class Dense(MaskMod):
    """A bool tensor broadcastable to ``(B, H, T, S)``: the escape hatch."""

    mask: Tensor

    def __post_init__(self):
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool:
            got = self.mask.dtype if isinstance(self.mask, Tensor) else type(self.mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = attend), got {got}; convert a "
                            f"0/1 tensor with .bool()")

    def _m4(self) -> Tensor:
        m = self.mask
        return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() <= 4 else m

    def grid(self, b, h, q, k):
        m = self._m4()
        pick = [i if m.shape[d] > 1 else i * 0 for d, i in enumerate((b, h, q, k))]
        return m[pick[0], pick[1], pick[2], pick[3]]

    def tile(self, B, H, q0, q1, k0, k1, device):
        m = self._m4()
        return m[..., slice(q0, q1) if m.shape[2] > 1 else slice(None),
               slice(k0, k1) if m.shape[3] > 1 else slice(None)]

    def validate(self, B, H, T, S):
        check_broadcasts("mask", self.mask, B, H, T, S)

    def describe(self):
        return f"dense{tuple(self.mask.shape)}"

    def tensors(self):
        return (self.mask,)


@dataclass(frozen=True, eq=False)
class And(MaskMod):
    """Visible iff every part allows it."""

    parts: tuple

    def grid(self, b, h, q, k):
        out = self.parts[0].grid(b, h, q, k)
        for p in self.parts[1:]:
            out = out & p.grid(b, h, q, k)
        return out

    def tile(self, B, H, q0, q1, k0, k1, device):
        out = self.parts[0].tile(B, H, q0, q1, k0, k1, device)
        for p in self.parts[1:]:
            out = out & p.tile(B, H, q0, q1, k0, k1, device)
        return out

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        some, every = self.parts[0].blocks(q_lo, q_hi, k_lo, k_hi)
        for p in self.parts[1:]:
            s, e = p.blocks(q_lo, q_hi, k_lo, k_hi)
            some, every = some & s, every & e
        return some, every

    def resolve(self, T, S):
        return type(self)(tuple(p.resolve(T, S) for p in self.parts))

    def validate(self, B, H, T, S):
        for p in self.parts:
            p.validate(B, H, T, S)

    def describe(self):
        return " & ".join(f"({p.describe()})" if isinstance(p, Or) else p.describe()
                          for p in self.parts)

    def tensors(self):
        return tuple(t for p in self.parts for t in p.tensors())


@dataclass(frozen=True, eq=False)
class Or(And):
    """Visible iff some part allows it."""

    def grid(self, b, h, q, k):
        out = self.parts[0].grid(b, h, q, k)
        for p in self.parts[1:]:
            out = out | p.grid(b, h, q, k)
        return out

    def tile(self, B, H, q0, q1, k0, k1, device):
        out = self.parts[0].tile(B, H, q0, q1, k0, k1, device)
        for p in self.parts[1:]:
            out = out | p.tile(B, H, q0, q1, k0, k1, device)
        return out

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        some, every = self.parts[0].blocks(q_lo, q_hi, k_lo, k_hi)
        for p in self.parts[1:]:
            s, e = p.blocks(q_lo, q_hi, k_lo, k_hi)
            some, every = some | s, every | e
        return some, every

    def describe(self):
        return " | ".join(f"({p.describe()})" if isinstance(p, And) and not isinstance(p, Or)
                          else p.describe() for p in self.parts)


@dataclass(frozen=True, eq=False)
class Shift(MaskMod):
    """``mod`` at global positions: local query ``i`` is ``i + q_offset``, key ``j`` is
    ``j + kv_offset`` (ring attention shards, cached decoding)."""

    mod: MaskMod
    q_offset: int = 0
    kv_offset: int = 0

    def grid(self, b, h, q, k):
        return self.mod.grid(b, h, q + self.q_offset, k + self.kv_offset)

    def tile(self, B, H, q0, q1, k0, k1, device):
        qo, ko = self.q_offset, self.kv_offset
        return self.mod.tile(B, H, q0 + qo, q1 + qo, k0 + ko, k1 + ko, device)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        qo, ko = self.q_offset, self.kv_offset
        return self.mod.blocks(q_lo + qo, q_hi + qo, k_lo + ko, k_hi + ko)

    def resolve(self, T, S):
        # Alignment-dependent parts are resolved against the global lengths they describe.
        return replace(self, mod=self.mod.resolve(T + self.q_offset, S + self.kv_offset))

    def describe(self):
        return f"at_positions({self.mod.describe()}, q+{self.q_offset}, kv+{self.kv_offset})"

    def tensors(self):
        return self.mod.tensors()
