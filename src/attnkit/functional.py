"""The executable specification: attention written as plain matrix maths.

Every fast path in attnkit (the fused ``sdpa`` backend, the ``chunked`` O(T)-memory backend,
ring attention) is tested against :func:`scaled_dot_product_attention` below. It is written
to be read line by line, not to be fast: it builds the full ``T x S`` score matrix.

Shape letters: ``B`` batch, ``H`` heads, ``T`` query length, ``S`` key/value length,
``D`` head dim. Leading dimensions are free here (``...``), so the same function serves a
single ``(T, D)`` sequence and a ``(B, H, T, D)`` batch.

Mask polarity: ``True`` means "this query may attend to this key".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["scaled_dot_product_attention", "safe_softmax", "merge_partial_attention"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def safe_softmax(scores: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Softmax that maps a row of only ``-inf`` to zeros instead of NaN.

    Args:
        scores: float tensor; masked entries hold ``-inf``.
        dim: the dimension to normalise over.

    Returns:
        ``(weights, lse)``: weights of the same shape as ``scores`` (rows sum to 1, or to 0
        when every entry is ``-inf``) and the log-sum-exp over ``dim`` (``-inf`` for such rows).
    """
    row_max = scores.amax(dim=dim, keepdim=True)
    # A fully masked row has max -inf; shifting by it would compute -inf - (-inf) = NaN.
    # Softmax is shift-invariant, so any finite shift is exact; detaching it is exact too.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=dim, keepdim=True)
    # total == 0 only for fully masked rows, whose exp is all zeros: 0 / 1 = 0, finite grads.
    weights = exp / torch.where(total > 0, total, torch.ones_like(total))
    lse = (row_max + torch.log(total)).squeeze(dim)
    return weights, lse


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
                            f"convert it with {name}.float()")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., length, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last (head) dim, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length (dim -2), got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = may attend), got {got}; "
                            "for a 0/1 tensor use mask.bool()")
        target = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
        try:
            if torch.broadcast_shapes(mask.shape, target) != torch.Size(target):
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the "
                             f"scores' shape {target} (..., T, S)") from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    score_mod=None,
    sinks: Tensor | None = None,
):
    """softmax(score_mod(q kᵀ · scale), masked) v, computed the obvious way.

    Args:
        q: queries ``(..., T, D)``.
        k: keys ``(..., S, D)``.
        v: values ``(..., S, Dv)``.
        mask: optional bool tensor broadcastable to ``(..., T, S)``; True = may attend.
        causal: if True, query ``i`` sees keys ``j <= i`` (top-left alignment: queries and
            keys start at the same position).
        dropout_p: probability of zeroing an attention weight (survivors scaled by
            ``1/(1-p)``). Applied whenever > 0: callers own the training-mode check.
        scale: multiplier of the scores; defaults to ``1/sqrt(D)``.
        return_weights: also return the attention weights ``(..., T, S)`` (after dropout).
        return_lse: also return the row log-sum-exp of the scaled, masked scores
            ``(..., T)`` in float32 (float64 for float64 inputs), ``-inf`` for rows where
            every key is masked (with ``sinks``, the sink is part of the sum).
        score_mod: optional ``fn(scores, b, h, q_idx, kv_idx) -> scores`` applied to the
            scaled scores before masking (index tensors broadcast against ``(B, H, T, S)``;
            ``b`` and ``h`` are 0 for inputs that are not 4-D).
        sinks: optional ``(H,)`` float logits, one per head (4-D inputs), added to every
            row's softmax denominator as an extra key with no value (attention sinks).

    Returns:
        ``out (..., T, Dv)`` in the input dtype; then ``weights`` and/or ``lse`` if asked,
        as a tuple in that order. A row whose keys are all masked gives zeros.

    Raises:
        TypeError: non-tensor or non-float q/k/v; a mask that is not bool.
        ValueError: rank < 2, mismatched head or length dims, a mask that does not
            broadcast, ``dropout_p`` outside [0, 1).
    """
    _check_inputs(q, k, v, mask, dropout_p)
    T, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    scores = q @ k.transpose(-2, -1)  # (..., T, S)
    # Softmax runs in float32 for half inputs: exp() of bf16 scores loses the ranking.
    compute_dtype = torch.float32 if q.dtype in _LOW_PRECISION else q.dtype
    scores = scores.to(compute_dtype) * scale

    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S)
        mask = allowed if mask is None else mask & allowed
    if score_mod is not None:
        scores = score_mod(scores, *_index_grids(scores))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))

    if sinks is not None:
        sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)  # (..., T, 1)
        weights, lse = safe_softmax(torch.cat([scores, sink], dim=-1), dim=-1)
        weights = weights[..., :-1]  # (..., T, S): the sink's share is dropped
    else:
        weights, lse = safe_softmax(scores, dim=-1)  # (..., T, S), (..., T)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
    out = weights.to(v.dtype) @ v  # (..., T, Dv)
    # A row that sees no key is zeros even where a hidden value is NaN (0 * NaN = NaN in @).
    sees_none = torch.isneginf(scores).all(dim=-1, keepdim=True)  # (..., T, 1)
    out = out.masked_fill(sees_none, 0.0)

    extras = []
    if return_weights:
        extras.append(weights.to(q.dtype))
    if return_lse:
        extras.append(lse)
    return (out, *extras) if extras else out


def _index_grids(scores: Tensor):
    """Index tensors ``b, h, q_idx, kv_idx`` broadcasting against ``scores (..., T, S)``."""
    dev, n = scores.device, scores.dim()
    T, S = scores.shape[-2:]
    lead = [torch.arange(scores.shape[i], device=dev).view([-1] + [1] * (n - 1 - i))
            if i < n - 2 else None for i in range(n)]
    b = lead[n - 4] if n >= 4 else torch.zeros((), dtype=torch.long, device=dev)
    h = lead[n - 3] if n >= 3 else torch.zeros((), dtype=torch.long, device=dev)
    q = torch.arange(T, device=dev).view(T, 1)  # (T, 1)
    k = torch.arange(S, device=dev).view(1, S)  # (1, S)
    return b, h, q, k


def merge_partial_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor):
    """Combine attention over two disjoint key sets into attention over their union.

    If ``out_a`` attended to keys ``A`` with row log-sum-exp ``lse_a`` and ``out_b`` to keys
    ``B``, the exact result over ``A ∪ B`` weighs each by its share of the total softmax
    mass: ``out = (e^lse_a · out_a + e^lse_b · out_b) / (e^lse_a + e^lse_b)``. This is what
    split-KV decoding and ring attention are built on.

    Args:
        out_a, out_b: partial outputs ``(..., T, D)``.
        lse_a, lse_b: their row log-sum-exp ``(..., T)``; ``-inf`` where a part saw no key.

    Returns:
        ``(out, lse)``: merged output in ``out_a``'s dtype and the log-sum-exp in at least
        float32. Rows that saw no key in either part stay zero with ``lse = -inf``.
    """
    acc = torch.promote_types(lse_a.dtype, torch.float32)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)  # (..., T); -inf only if both are -inf
    # Where both are -inf, use 0 as the reference so the shares are exp(-inf) = 0, not NaN.
    ref = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    share_a = torch.exp(lse_a - ref).unsqueeze(-1)  # (..., T, 1)
    share_b = torch.exp(lse_b - ref).unsqueeze(-1)  # (..., T, 1)
    out = share_a * out_a.to(acc) + share_b * out_b.to(acc)
    return out.to(out_a.dtype), lse
