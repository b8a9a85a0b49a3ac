"""NaN at the edges: what torch's fused CPU kernels get wrong, and the fix-up every backend
that calls one applies.

The rule every backend follows (the math spec does it by construction): a NaN in a query row,
or in a key or value that a row may see, makes that output row NaN; a row that sees no key at
all is zeros. ``aten._scaled_dot_product_flash_attention_for_cpu`` (behind CPU SDPA and
chunked's fused tiles) and compiled FlexAttention break the first half in one case, checked
on torch 2.13 with AVX-512 and with ``ATEN_CPU_CAPABILITY=default``:

* when *every* score a row sees is NaN (the query row is NaN, or every visible key is), the
  kernel's NaN-ignoring running max stays ``-inf`` at small sizes (under 16 keys here), so it
  takes the row for a fully masked one and returns zeros with ``lse = 0``; at larger sizes
  its vectorised max propagates the NaN. Which sizes take which path depends on the CPU.
* a NaN in a value, or a NaN score beside a finite one, always reaches the row (the matmul
  and ``exp`` propagate it).

So the fix-up marks exactly the rows whose visible scores are all NaN: rows with a NaN query,
and rows whose visible keys all hold a NaN. It never reads the values, reads the keys once
(``O(S·D)``, nothing beside ``O(T·S·D)`` attention) and is branch-free where the visible set
is a plain rule, so it stays inside ``torch.compile`` graphs.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``,
``T`` queries, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _nan_rows(x: Tensor) -> Tensor:
    """``(..., L)`` bool: the rows of ``x (..., L, D)`` holding a NaN. One reduction pass (a
    sum propagates NaN; a row holding both +inf and -inf also counts, and its scores would be
    NaN anyway)."""
    return torch.isnan(x.sum(-1))


def good_keys(k: Tensor, H: int) -> Tensor:
    """``(B, H, S)`` bool: the key a query head reads holds no NaN (GQA heads share one)."""
    good = ~_nan_rows(k)  # (B, Hkv, S)
    G = H // k.shape[1]
    return good if G == 1 else good.repeat_interleave(G, dim=1)  # (B, H, S)


def row_flags(q: Tensor, k: Tensor, visible=None) -> tuple[Tensor, Tensor]:
    """``(all_nan, sees_none)``, bool, broadcastable to ``(B, H, T)``: rows that see at least
    one key and whose visible scores are all NaN, and rows that see no key.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, Hkv, S, D)``.
        visible: which keys each row sees: ``None`` (all of them), an int ``offset`` (causal:
            row ``i`` sees keys ``j <= i + offset``) or a bool tensor broadcastable to
            ``(B, H, T, S)`` (True = visible).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    q_nan = _nan_rows(q)  # (B, H, T)
    good = good_keys(k, H)  # (B, H, S)
    if visible is None:
        sees = torch.full((1, 1, 1), S > 0, device=q.device)
        sees_good = good.any(-1, keepdim=True)  # (B, H, 1)
    elif isinstance(visible, int):
        last = torch.arange(T, device=q.device) + visible  # (T,) last visible key per row
        sees = (last >= 0).view(1, 1, T) & (S > 0)
        # The first good key decides: row i has one iff it lies at or before i + offset.
        first = torch.where(good.any(-1), good.int().argmax(-1), S)  # (B, H)
        sees_good = first.unsqueeze(-1) <= last.view(1, 1, T)  # (B, H, T)
    else:
        sees = visible.any(-1)  # (B|1, H|1, T)
        sees_good = (visible & good.unsqueeze(2)).any(-1)  # (B, H, T)
    return sees & (q_nan | ~sees_good), ~sees


def all_nan_rows(q: Tensor, k: Tensor, visible=None) -> Tensor:
    """``(B, H, T)`` bool: the rows :func:`row_flags` calls all-NaN."""
    return row_flags(q, k, visible)[0]


def may_hold_nan(*tensors: Tensor) -> bool:
    """False when none of ``tensors`` holds a NaN, True when one may: a sum each and one
    host read, the cheapest check on CPU (a NaN always reaches a sum; an overflow to
    ``inf - inf`` only sends the caller down its exact path). Callers pass v too: a row
    that sees no key multiplies its zero weights by v, and ``0 * NaN`` is NaN."""
    return math.isnan(sum(t.sum().item() for t in tensors))


def restore_nan(out: Tensor, q: Tensor, k: Tensor, visible=None) -> Tensor:
    """``out (B, H, T, Dv)`` with the all-NaN rows of :func:`row_flags` set to NaN and the
    rows that see no key set to zeros (a kernel adds the mask to a NaN score, so a NaN
    behind the mask would otherwise reach them). A caller skips it when no input holds a
    NaN (:func:`may_hold_nan` on q, k and v)."""
    bad, none = row_flags(q, k, visible)  # (B, H, T) each, broadcastable
    if visible is not None:
        bad = bad | none  # one pass over out: NaN rows, then the empty ones back to zeros
    if not torch.compiler.is_compiling() and not bool(bad.any()):
        return out  # the common case: no copy of out (a host sync, cheap on CPU)
    out = out.masked_fill(bad.unsqueeze(-1), float("nan"))
    return out if visible is None else out.masked_fill(none.unsqueeze(-1), 0.0)


def restore_nan_described(out: Tensor, q: Tensor, k: Tensor, v: Tensor, mod,
                          lse: Tensor | None = None, rows: int = 256):
    """NaN on every row that sees a NaN, for a kernel that cannot be trusted with any.

    Compiled FlexAttention on CPU loses NaN scores in more cases than the fused kernel
    (a NaN key beside finite ones in a partial block comes out finite), so here every row
    with a NaN query or a visible NaN key or value is set to NaN and every row that sees no
    key to zeros. For backends outside ``torch.compile``: one check of q, k and v (a host
    sync); only when it finds a NaN is the description evaluated, ``rows`` query rows at a
    time (never ``T x S`` at once). Returns ``out`` (and ``lse``, when given).
    """
    if not any(bool(torch.isnan(t).any()) for t in (q, k, v)):
        return out if lse is None else (out, lse)
    B, H, T, _ = q.shape
    S = k.shape[2]
    kv_nan = torch.isnan(k).any(-1) | torch.isnan(v).any(-1)  # (B, Hkv, S)
    kv_nan = kv_nan.repeat_interleave(H // k.shape[1], dim=1).unsqueeze(2)  # (B, H, 1, S)
    q_nan = torch.isnan(q).any(-1)  # (B, H, T)
    bad = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
    none = torch.zeros(B, H, T, dtype=torch.bool, device=q.device)
    for q0 in range(0, T, rows):
        q1 = min(q0 + rows, T)
        vis = torch.ones(1, 1, q1 - q0, S, dtype=torch.bool, device=q.device)
        if mod is not None:
            vis = vis & mod.tile(B, H, q0, q1, 0, S, q.device)  # (B|1, H|1, nq, S)
        sees = vis.any(-1)
        bad[:, :, q0:q1] = sees & (q_nan[:, :, q0:q1] | (vis & kv_nan).any(-1))
        none[:, :, q0:q1] = ~sees
    out = out.masked_fill(bad.unsqueeze(-1), float("nan")).masked_fill(none.unsqueeze(-1), 0.0)
    if lse is None:
        return out
    return out, lse.masked_fill(bad, float("nan")).masked_fill(none, float("-inf"))
