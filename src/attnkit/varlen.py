"""``attnkit.varlen_attention``: packed sequences of different lengths, flash-attn's convention.

Queries ``(total_q, H, D)`` and keys/values ``(total_k, Hkv, D)`` hold ``N`` sequences back to
back; ``cu_seqlens_q`` / ``cu_seqlens_k`` (``(N + 1,)``, ``[0, l1, l1+l2, ...]``) say where each
starts. Within a sequence causality is aligned bottom-right: its ``Lq`` queries are the last
``Lq`` of its ``Lk`` positions (a prefill chunk or one decode token over a cache), exactly as
``flash_attn_varlen_func``. The mask is :func:`attnkit.masks.varlen` (per-token offsets, no
``total x total`` tensor).

How it runs: consecutive sequences are grouped so that a group's dense rectangle wastes little
(at most 1.5x its useful pairs, or a few MFLOP). A group of one sequence is an ordinary
bottom-right causal call (SDPA's ``is_causal`` from scratch; a chunk over a cache is split into
its unmasked past and its top-left causal diagonal, merged by log-sum-exp); a larger group is
one call with the varlen mask, where chunked skips the cross-sequence blocks. Each group goes
through :func:`attnkit.attention`, so every backend, GQA, softcap, sinks and exact gradients
come from the engine.

Shape letters: ``N`` sequences, ``H`` query heads, ``Hkv`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import attention
from .functional import merge_partial_attention
from .masks import sliding_window, varlen
from .masks.varlen import Varlen, check_cu_seqlens
from .scores import Alibi
from .spec import MaskSpec

__all__ = ["VarlenAlibi", "plan_groups", "varlen_attention"]

#: Wasted FLOPs a group may add before a separate call (its overhead) is cheaper.
SMALL_WASTE_FLOPS = 5e5
#: Work of a sequence above which it runs in its own call (about a millisecond).
ALONE_FLOPS = 2e7


@dataclass(frozen=True, eq=False)
class VarlenAlibi(Alibi):
    """ALiBi per packed sequence: ``score - slopes[h] * |p(i) - j|`` with the query's
    bottom-right position ``p(i)`` from a :class:`~attnkit.masks.Varlen` description.

    ``slopes`` is ``(H,)`` (every sequence alike) or ``(N, H)``, one row per sequence of
    ``mask`` (flash-attn's ``(batch_size, nheads)`` form).
    """

    mask: Varlen | None = None

    def __post_init__(self):
        s = self.slopes
        if not isinstance(s, Tensor) or not s.is_floating_point() or s.dim() not in (1, 2):
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__
            raise TypeError(f"alibi_slopes must be a float tensor (H,) or (N, H), one row per "
                            f"sequence, got {got}")

    def resolve(self, T, S):
        return self  # positions come from the varlen description, not an alignment

    def apply(self, score, b, h, q, k):
        dist = (self.mask.pos[q] - k).abs()
        slope = self.slopes[h] if self.slopes.dim() == 1 else self.slopes[self.mask.seq_q[q], h]
        return score - slope.to(score.dtype) * dist.to(score.dtype)

    def validate(self, B, H, T, S):
        want = (H,) if self.slopes.dim() == 1 else (self.mask.num_sequences, H)
        if tuple(self.slopes.shape) != want:
            raise ValueError(f"alibi_slopes must have shape (H,) = ({H},) or (N, H) = "
                             f"({self.mask.num_sequences}, {H}), got {tuple(self.slopes.shape)}")

    def describe(self):
        return "alibi(varlen)"


def plan_groups(len_q: list[int], len_k: list[int], flops_per_pair: float) -> list[tuple]:
    """Consecutive sequences ``[(first, end), ...]`` to run as one call each.

    Only small sequences share a call (at most :data:`ALONE_FLOPS` of work each, where one
    call's overhead matters), and only while the group's dense ``sum(Lq) x sum(Lk)`` rectangle
    stays within 1.5x its useful pairs or wastes under :data:`SMALL_WASTE_FLOPS`. Larger
    sequences run alone: their own call takes the fast path for their shape.
    """
    groups, start, tq, tk, useful = [], 0, 0, 0, 0
    small_open = False
    for s, (lq, lk) in enumerate(zip(len_q, len_k)):
        small = lq * lk * flops_per_pair <= ALONE_FLOPS
        nq, nk, nu = tq + lq, tk + lk, useful + lq * lk
        dense_ok = nq * nk <= 1.5 * nu or (nq * nk - nu) * flops_per_pair <= SMALL_WASTE_FLOPS
        if s > start and not (small and small_open and dense_ok):
            groups.append((start, s))
            nq, nk, nu, start = lq, lk, lq * lk, s
        tq, tk, useful, small_open = nq, nk, nu, small if s == start else small_open and small
    groups.append((start, len(len_q)))
    return groups


def _one_sequence(q, k, v, causal, window, alibi_slopes, common):
    """One sequence ``q (1, H, Lq, D)`` over ``k, v (1, Hkv, Lk, D)``, bottom-right.

    Causal with more keys than queries (a prefill chunk over a cache) runs as two calls merged
    by log-sum-exp: the earlier keys, all visible (no mask), and the last ``Lq`` keys, plain
    top-left causal. Both are the fast unmasked / ``is_causal`` kernels; one bottom-right call
    needs a mask on every tile. Sinks are added once, after the merge. Only under ``auto``
    (a named backend may not return the log-sum-exp) and without dropout or a window.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    past = Lk - Lq
    if (not causal or window is not None or Lq < 2 or past < 1 or common["dropout_p"] > 0
            or common["backend"] != "auto"):  # a named backend may not return the LSE
        return attention(q, k, v, causal=causal, causal_align="bottom_right", mask_mod=window,
                         alibi_slopes=alibi_slopes, **common)
    sinks, want_lse = common["sinks"], common["return_lse"]
    part = dict(common, sinks=None, return_lse=True)
    o1, l1 = attention(q, k[:, :, :past], v[:, :, :past], causal_align=past,
                       alibi_slopes=alibi_slopes, **part)  # (1, H, Lq, D), (1, H, Lq)
    o2, l2 = attention(q, k[:, :, past:], v[:, :, past:], causal=True,
                       alibi_slopes=alibi_slopes, **part)
    out, lse = merge_partial_attention(o1, l1, o2, l2)
    if sinks is not None:  # out * e^lse / (e^lse + e^sink), lse over keys and sink
        sink = sinks.to(lse.dtype).view(1, -1, 1)  # (1, H, 1)
        out = (out * torch.sigmoid(lse - sink).unsqueeze(-1).to(out.dtype)).to(q.dtype)
        lse = torch.logaddexp(lse, sink.expand_as(lse))
    return (out, lse) if want_lse else out


def _check(q, k, v, cu_q, cu_k, max_q, max_k):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be packed 3-D (total_tokens, heads, head_dim), got "
                             f"shape {tuple(t.shape)}; reshape (B, T, H, D) with "
                             f"flatten(0, 1) and give cu_seqlens")
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_q, q.shape[0])
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_k, k.shape[0])
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_q.numel() - 1} and {cu_k.numel() - 1}")
    for name, given, cu in (("max_seqlen_q", max_q, cu_q), ("max_seqlen_k", max_k, cu_k)):
        longest = int(cu.diff().max())
        if given is not None and int(given) < longest:
            raise ValueError(f"{name} = {int(given)} is below the longest sequence ({longest}) "
                             f"in cu_seqlens_{name[-1]}; pass None to have it computed")
    return cu_q.to(q.device), cu_k.to(q.device)


class _Required:
    """The default of an argument that must be given (its repr reads well in ``help()``)."""

    def __repr__(self):
        return "<required>"


_REQUIRED = _Required()


def _check_causal(causal) -> bool:
    if causal is _REQUIRED:
        raise TypeError("varlen_attention() needs causal=True or causal=False: it has no "
                        "default (flash-attn's flash_attn_varlen_func defaults to False, "
                        "attnkit's varlen_attention used to default to True); pass causal=True "
                        "for decoder (autoregressive) models, causal=False for encoders")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    return causal


def _no_keys(q, lq: int, Dv: int, sinks, lse_dtype) -> tuple[Tensor, Tensor]:
    """Output and log-sum-exp of ``lq`` queries whose sequence has no keys: zeros
    ``(lq, H, Dv)`` and ``-inf``, or the sink logit where there are sinks (the sink is then
    the only term of the softmax, as :func:`attnkit.attention` gives for an empty row)."""
    H = q.shape[1]
    out = q.new_zeros(lq, H, Dv)  # (lq, H, Dv)
    if sinks is None:
        lse = torch.full((H, lq), float("-inf"), device=q.device, dtype=lse_dtype)
    else:
        lse = sinks.to(lse_dtype).view(H, 1).expand(H, lq)  # (H, lq), differentiable
    return out, lse


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k=None,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *,
                     causal: bool = _REQUIRED, window: tuple | None = None,
                     softcap: float | None = None, sinks: Tensor | None = None,
                     alibi_slopes: Tensor | None = None, scale: float | None = None,
                     dropout_p: float = 0.0, backend: str = "auto",
                     return_lse: bool = False):
    """Attention over packed variable-length sequences (flash-attn's varlen convention).

    Args:
        q: ``(total_q, H, D)`` queries of all sequences back to back.
        k: ``(total_k, Hkv, D)`` keys; ``H`` a multiple of ``Hkv`` (GQA).
        v: ``(total_k, Hkv, Dv)`` values (``Dv`` may differ from ``D``).
        cu_seqlens_q: ``(N + 1,)`` integer ``[0, l1, l1+l2, ..., total_q]``.
        cu_seqlens_k: the same for keys; defaults to ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: accepted for flash-attn compatibility and checked
            (never below the longest sequence); not needed.
        causal: required, keyword-only (no default: flash-attn defaults to ``False``, this
            function used to default to ``True``). Per sequence, aligned bottom-right (query
            ``i`` of ``Lq`` sees key positions up to ``i + Lk - Lq``).
        window: ``(left, right)`` keys visible on each side, -1 = unbounded.
        softcap: ``c * tanh(score / c)`` before the softmax (Gemma-2).
        sinks: ``(H,)`` one extra softmax logit per head (gpt-oss attention sinks).
        alibi_slopes: ``(H,)`` ALiBi slopes, or ``(N, H)`` one row per sequence;
            distances within each sequence.
        scale: score multiplier, default ``1/sqrt(D)``.
        dropout_p: dropout on the attention weights.
        backend: ``"auto"`` or an attnkit backend name, used for every group.
        return_lse: also return the log-sum-exp ``(H, total_q)`` (float32, or float64 for
            float64 inputs): ``-inf`` for queries that see no key, or the sink logit with
            ``sinks`` (the sink is then the softmax's only term), as :func:`attnkit.attention`.

    Returns:
        ``out (total_q, H, Dv)`` in q's dtype, or ``(out, lse)``. Queries that see no key
        (a sequence with no keys) are zeros.

    Raises:
        TypeError: no ``causal`` (or not a bool), non-tensor inputs or non-integer
            ``cu_seqlens``.
        ValueError: non-3-D tensors, ``cu_seqlens`` not starting at 0, decreasing or not
            ending at the packed length, different sequence counts, a ``max_seqlen`` below
            the longest sequence, a bad ``window``, ``alibi_slopes`` of another shape, and
            everything :func:`attnkit.attention` refuses (heads, sinks, scale).
    """
    causal = _check_causal(causal)
    cu_k_in = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    cu_q, cu_k = _check(q, k, v, cu_seqlens_q, cu_k_in, max_seqlen_q, max_seqlen_k)
    mask = varlen(cu_q, cu_k, causal=causal, window=window)
    H, D, Dv = q.shape[1], q.shape[2], v.shape[-1]
    if alibi_slopes is not None:
        VarlenAlibi(alibi_slopes, mask=mask).validate(1, H, 0, 0)  # (H,) or (N, H)
    if sinks is not None:  # checked here too: a keyless group never reaches attention()
        MaskSpec(sinks=sinks).validate(1, H, 0, 0)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lq, lk = cu_q.diff().tolist(), cu_k.diff().tolist()
    bq, bk = cu_q.tolist(), cu_k.tolist()
    common = dict(softcap=softcap, sinks=sinks, scale=scale, dropout_p=dropout_p,
                  backend=backend, return_lse=return_lse)
    outs, lses = [], []
    for a, b in plan_groups(lq, lk, 4.0 * H * D):
        q0, q1, k0, k1 = bq[a], bq[b], bk[a], bk[b]
        if q1 == q0:
            continue
        if k1 == k0:  # no keys: nothing to see
            out, lse = _no_keys(q, q1 - q0, Dv, sinks, lse_dtype)
            outs.append(out)
            lses.append(lse)
            continue
        qg = q[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, H, Tg, D)
        kg = k[k0:k1].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Sg, D)
        vg = v[k0:k1].transpose(0, 1).unsqueeze(0)  # (1, Hkv, Sg, Dv)
        slopes = alibi_slopes
        if b - a == 1:
            win = None if window is None or mask.left is None and mask.right is None else \
                sliding_window(mask.left, mask.right, align="bottom_right")
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[a]  # (H,): this sequence's row
            res = _one_sequence(qg, kg, vg, causal, win, slopes, common)
        else:
            sub = Varlen(cu_q[a:b + 1] - q0, cu_k[a:b + 1] - k0, mask.left, mask.right)
            if slopes is not None and slopes.dim() == 2:
                slopes = slopes[a:b]  # (b - a, H): the group's rows
            score = None if slopes is None else VarlenAlibi(slopes, mask=sub)
            res = attention(qg, kg, vg, mask_mod=sub, score_mod=score, **common)
        out, lse = (res[0], res[-1]) if return_lse else (res, None)
        outs.append(out[0].transpose(0, 1))  # (Tg, H, Dv)
        if return_lse:
            lses.append(lse[0])  # (H, Tg)
    if not outs:
        out = q.new_zeros(q.shape[0], H, Dv)  # (0, H, Dv): no queries at all
        return (out, q.new_zeros(H, 0, dtype=lse_dtype)) if return_lse else out
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)  # (total_q, H, Dv)
    if return_lse:
        return out, (lses[0] if len(lses) == 1 else torch.cat(lses, 1))  # (H, total_q)
    return out
