"""The mask kinds that hold data: key and query padding, documents, a dense tensor.

Part of :mod:`attnkit.masks` (import them from there); the protocol every kind follows is in
:mod:`attnkit.masks.base`. Shape letters as in :mod:`attnkit.masks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import MaskMod, check_broadcasts
from .row_ranges import UNBOUNDED, span


def _check_bool(name: str, m, dims: int) -> None:
    if not isinstance(m, Tensor) or m.dtype != torch.bool:
        got = m.dtype if isinstance(m, Tensor) else type(m).__name__
        raise TypeError(f"{name} must be a bool tensor (True = attend), got {got}; convert a "
                        f"0/1 tensor with .bool()")
    if m.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(m.shape)}")


def _range_counts(mask: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """True entries of ``mask (B, L)`` in each inclusive range ``[lo, hi]``: ``(B, *lo)``."""
    cs = torch.nn.functional.pad(mask.long().cumsum(1), (1, 0))  # (B, L + 1)
    return cs[:, hi + 1] - cs[:, lo]


@dataclass(frozen=True, eq=False)
class KeyPadding(MaskMod):
    """``mask (B, S)``: True = real key."""

    mask: Tensor

    def __post_init__(self):
        _check_bool("key_padding_mask", self.mask, 2)

    def grid(self, b, h, q, k):
        return self.mask[b, k]

    def tile(self, B, H, q0, q1, k0, k1, device):
        return self.mask[:, None, None, k0:k1]  # (B, 1, 1, nk)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        cnt = _range_counts(self.mask, k_lo[0], k_hi[0])  # (B, nK)
        some = (cnt > 0).any(0) & (q_lo >= 0)  # (nQ, nK)
        every = (cnt == (k_hi[0] - k_lo[0] + 1)).all(0) & (q_lo >= 0)
        return some, every

    def validate(self, B, H, T, S):
        if tuple(self.mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, "
                             f"got {tuple(self.mask.shape)}")

    def intervals(self, B, H, q0, q1):
        """One range per sample when its real keys are contiguous (right or left padding);
        None when some sample has holes."""
        m = self.mask
        S = m.shape[1]
        count = m.sum(1)  # (B,)
        first = m.int().argmax(1)
        last = S - 1 - m.flip(1).int().argmax(1)
        if bool(((count > 0) & (last - first + 1 != count)).any()):
            return None
        first = torch.where(count > 0, first, torch.zeros_like(first))
        return span((first).view(-1, 1, 1), (first + count).view(-1, 1, 1))

    def describe(self):
        return "key_padding"

    def tensors(self):
        return (self.mask,)


@dataclass(frozen=True, eq=False)
class QueryPadding(MaskMod):
    """``mask (B, T)``: True = real query; a padded query sees no key."""

    mask: Tensor

    def __post_init__(self):
        _check_bool("query_padding_mask", self.mask, 2)

    def grid(self, b, h, q, k):
        return self.mask[b, q]

    def tile(self, B, H, q0, q1, k0, k1, device):
        return self.mask[:, None, q0:q1, None]  # (B, 1, nq, 1)

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        cnt = _range_counts(self.mask, q_lo[:, 0], q_hi[:, 0])[..., None]  # (B, nQ, 1)
        some = (cnt > 0).any(0) & (k_lo >= 0)
        every = (cnt == (q_hi - q_lo + 1)).all(0) & (k_lo >= 0)
        return some, every

    def validate(self, B, H, T, S):
        if tuple(self.mask.shape) != (B, T):
            raise ValueError(f"query_padding_mask must have shape (B, T) = {(B, T)}, "
                             f"got {tuple(self.mask.shape)}")

    def intervals(self, B, H, q0, q1):
        real = self.mask[:, q0:q1].view(self.mask.shape[0], 1, -1)  # (B, 1, nq)
        return span(torch.where(real, -UNBOUNDED, 0), torch.where(real, UNBOUNDED, 0))

    def describe(self):
        return "query_padding"

    def tensors(self):
        return (self.mask,)


@dataclass(frozen=True, eq=False)
class SameDocument(MaskMod):
    """Query and key belong to the same document: ``ids (B, T)``, ``kv_ids (B, S)``."""

    ids: Tensor
    kv_ids: Tensor | None = None
    cu_seqlens: tuple | None = None  # when built from them: the error messages name them
    sorted: bool = field(init=False, default=False)

    def __post_init__(self):
        for name, t in (("document_ids", self.ids), ("kv_document_ids", self.kv_ids)):
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dtype in (torch.bool,) or t.is_floating_point():
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"{name} must be an integer tensor (B, length), got {got}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be (B, length), got shape {tuple(t.shape)}")
        kv = self.keys()
        ok = bool((self.ids.diff(dim=1) >= 0).all()) and bool((kv.diff(dim=1) >= 0).all())
        object.__setattr__(self, "sorted", ok)

    def keys(self) -> Tensor:
        return self.ids if self.kv_ids is None else self.kv_ids

    def grid(self, b, h, q, k):
        kv = self.keys()
        bq = b if self.ids.shape[0] > 1 else b * 0  # one row of ids serves every sample
        bk = b if kv.shape[0] > 1 else b * 0
        return self.ids[bq, q] == kv[bk, k]

    def tile(self, B, H, q0, q1, k0, k1, device):
        return self.ids[:, None, q0:q1, None] == self.keys()[:, None, None, k0:k1]

    def blocks(self, q_lo, q_hi, k_lo, k_hi):
        if not self.sorted:
            return super().blocks(q_lo, q_hi, k_lo, k_hi)
        kv = self.keys()
        qmin, qmax = self.ids[:, q_lo], self.ids[:, q_hi]  # (B, nQ, 1)
        kmin, kmax = kv[:, k_lo], kv[:, k_hi]  # (B, 1, nK)
        some = ((qmin <= kmax) & (kmin <= qmax)).any(0)  # (nQ, nK)
        every = ((qmin == qmax) & (kmin == kmax) & (qmin == kmin)).all(0)
        return some, every

    def validate(self, B, H, T, S):
        kv = self.keys()
        if self.cu_seqlens is not None and (T != self.ids.shape[1] or S != kv.shape[1]):
            raise ValueError(f"cu_seqlens={list(self.cu_seqlens)} describe "
                             f"{self.cu_seqlens[-1]} positions but the call has T={T} queries "
                             f"and S={S} keys: the last entry must be the packed length (or "
                             f"pass length= for trailing padding)")
        if self.ids.shape[0] not in (1, B) or self.ids.shape[1] != T or kv.shape[1] != S:
            raise ValueError(f"document ids must be (B, T) = {(B, T)} for queries and (B, S) = "
                             f"{(B, S)} for keys, got {tuple(self.ids.shape)} and "
                             f"{tuple(kv.shape)}; pass kv_document_ids when S != T")

    def intervals(self, B, H, q0, q1):
        """The keys of the row's own document: one range when the key ids are sorted."""
        if not self.sorted:
            return None
        ids, kv = self.ids[:, q0:q1], self.keys()
        n = max(ids.shape[0], kv.shape[0])
        ids = ids.expand(n, -1).contiguous()
        kv = kv.expand(n, -1).contiguous()
        lo = torch.searchsorted(kv, ids, right=False)  # (n, nq)
        hi = torch.searchsorted(kv, ids, right=True)
        return span(lo.view(n, 1, -1), hi.view(n, 1, -1))

    def describe(self):
        return f"same_document(B={self.ids.shape[0]})"

    def tensors(self):
        return (self.ids,) if self.kv_ids is None else (self.ids, self.kv_ids)


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
