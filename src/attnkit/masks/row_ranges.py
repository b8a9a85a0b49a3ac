"""Per-row key intervals: most masks are, for each query row, one or two ranges of keys.

A causal row sees ``[0, i + 1)``, a window ``[p - left, p + right + 1)``, a packed document
``[start, end)`` of its own document, a padded batch ``[0, length)``; prefix-LM is one range,
a sliding window beside a few global keys two. Given as ``(lo, hi)`` pairs per row, a mask
costs the fused kernel no memory and no tensor work per tile: it compares key indices.

Every kind answers :meth:`attnkit.masks.MaskMod.intervals` ``(B, H, q0, q1)`` with an int64
tensor ``(B|1, H|1, nq|1, 2k)`` holding ``k`` (1 or 2) half-open ranges ``[lo, hi)`` per row
(an empty range has ``hi <= lo``; ``±UNBOUNDED`` stands for no bound), or None when it cannot
(a mask function, a dense tensor, an unsorted document list). ``And`` intersects and ``Or``
unites them (:func:`intersect`, :func:`unite`), giving up (None) when a row would need more
than two ranges. :func:`kernel_intervals` is what the kernel receives.

Shape letters as in :mod:`attnkit.masks`; ``nq`` query rows, ``K`` candidate ranges.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["UNBOUNDED", "MAX_RANGES", "span", "normalize", "intersect", "unite",
           "kernel_intervals"]

UNBOUNDED = 1 << 40  # "no bound" on a side (clamped to [0, S] at the end)
MAX_RANGES = 2


def span(lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """One range per row: ``lo``, ``hi`` broadcastable to ``(B|1, H|1, nq|1)`` ->
    ``(B|1, H|1, nq|1, 2)`` int64."""
    lo, hi = torch.as_tensor(lo, dtype=torch.long), torch.as_tensor(hi, dtype=torch.long)
    lo, hi = torch.broadcast_tensors(lo, hi)
    out = torch.stack([lo, hi], dim=-1)
    return out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))


def _pairs(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., 2k) -> lo (..., k), hi (..., k)``."""
    return t[..., 0::2], t[..., 1::2]


def normalize(lo: Tensor, hi: Tensor) -> Tensor | None:
    """Candidate ranges ``lo, hi (..., K)`` (overlapping, unordered, some empty) -> their union
    as at most :data:`MAX_RANGES` disjoint sorted ranges ``(..., 2m)``, or None when some row
    needs more. Touching ranges merge (``[0, 5) | [5, 9) = [0, 9)``)."""
    valid = hi > lo
    lo = torch.where(valid, lo, torch.full_like(lo, UNBOUNDED + 1))
    hi = torch.where(valid, hi, torch.full_like(hi, UNBOUNDED + 1))
    lo, order = lo.sort(dim=-1, stable=True)
    hi = hi.gather(-1, order)
    valid = valid.gather(-1, order)
    # A range starts a new group when it begins after every earlier range has ended.
    reach = hi.cummax(dim=-1).values
    starts = torch.ones_like(valid)
    starts[..., 1:] = lo[..., 1:] > reach[..., :-1]
    starts = starts & valid
    count = starts.sum(-1)
    if count.numel() and int(count.max()) > MAX_RANGES:
        return None
    K = lo.shape[-1]
    group = torch.where(valid, starts.long().cumsum(-1) - 1, torch.full_like(lo, K))
    shape = (*lo.shape[:-1], K + 1)
    g_lo = torch.full(shape, UNBOUNDED, dtype=torch.long, device=lo.device)
    g_hi = torch.full(shape, -UNBOUNDED, dtype=torch.long, device=lo.device)
    g_lo = g_lo.scatter_reduce(-1, group, lo, "amin")
    g_hi = g_hi.scatter_reduce(-1, group, hi, "amax")
    m = max(1, int(count.max()) if count.numel() else 1)
    used = torch.arange(m, device=lo.device) < count.unsqueeze(-1)  # (..., m)
    g_lo = torch.where(used, g_lo[..., :m], torch.zeros_like(g_lo[..., :m]))
    g_hi = torch.where(used, g_hi[..., :m], torch.zeros_like(g_hi[..., :m]))
    return torch.stack([g_lo, g_hi], dim=-1).flatten(-2)  # (..., 2m)


def intersect(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Rows' ranges of ``a`` AND ``b`` (None if either is unknown or the result needs more
    than two ranges per row)."""
    if a is None or b is None:
        return None
    a, b = _broadcast_rows(a, b)
    (alo, ahi), (blo, bhi) = _pairs(a), _pairs(b)
    if min(alo.shape[-1], blo.shape[-1]) == 1:
        # One range cut from disjoint sorted ranges leaves them disjoint and sorted (some
        # maybe empty): no sorting needed, the common case (causal AND documents).
        lo, hi = torch.maximum(alo, blo), torch.minimum(ahi, bhi)
        return torch.stack([lo, hi], dim=-1).flatten(-2)
    lo = torch.maximum(alo[..., :, None], blo[..., None, :]).flatten(-2)  # every pair of ranges
    hi = torch.minimum(ahi[..., :, None], bhi[..., None, :]).flatten(-2)
    return normalize(lo, hi)


def unite(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """Rows' ranges of ``a`` OR ``b`` (None if either is unknown or a row needs more than
    two ranges)."""
    if a is None or b is None:
        return None
    a, b = _broadcast_rows(a, b)
    alo, ahi = _pairs(a)
    blo, bhi = _pairs(b)
    return normalize(torch.cat([alo, blo], -1), torch.cat([ahi, bhi], -1))


def _broadcast_rows(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast the leading ``(B, H, nq)`` dims of two range tensors (not their pairs)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])


def kernel_intervals(mod, B: int, H: int, T: int, S: int) -> Tensor | None:
    """The int32 ranges the kernel reads, ``(B|1, H|1, T, 2k)`` (a view, broadcast along the
    rows where they do not vary), clamped to ``[0, S]``; None without a mask or when the mask
    has no per-row ranges."""
    if mod is None:
        return None
    iv = mod.intervals(B, H, 0, T)
    if iv is None:
        return None
    iv = iv.clamp(0, S).to(torch.int32).contiguous()
    return iv.expand(iv.shape[0], iv.shape[1], T, iv.shape[3])
