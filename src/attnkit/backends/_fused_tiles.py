"""Chunked's fast path on CPU: each query tile runs torch's fused flash kernel on its span.

The block plan (which keys each query tile can see, from the mask description's summaries)
stays chunked's; only the work inside a tile changes. For a tile whose visible keys lie in
``[k0, k1)``, one call of ``aten._scaled_dot_product_flash_attention_for_cpu`` computes the
tile's output *and* log-sum-exp over that span, with the tile's mask as an additive
``0/-inf`` tensor (``nq x span``, never ``T x S``). Its backward twin gives the tile's
``dq`` and the span's ``dk``/``dv``. The fused kernel vectorises the softmax and needs one
Python call per tile instead of ~15 per key block: about 2x the per-FLOP speed of the
block loop on one CPU thread (benchmarks/bench_masks.py).

Used for float32/float64 inputs on CPU when the kernel exists and the score function, if
any, is additive and needs no gradient (a bias, ALiBi: they join the tile's float mask).
Sinks are applied after the tiles (``out * sigmoid(lse - sink)``, lse with the sink), and
the kernel's backward, given that output and lse, is exactly the backward with sinks.
Fully masked rows come back with ``lse = 0`` from the kernel and are set to
``-inf`` here; rows whose visible scores are all NaN come back the same way and are set to
NaN (:mod:`._edges`); rows that see exactly one key are reported so the backward can give them
an exactly zero gradient through the block loop.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``,
``T`` queries, ``S`` keys, ``D`` head dim, ``nq`` tile rows, ``nk`` span keys.
"""

from __future__ import annotations

import torch

from ..scores import Alibi, Bias, Chain
from ._edges import row_flags

_OPS = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _additive(score) -> bool:
    """An additive score function without gradient: it can ride in the kernel's float mask."""
    if score is None:
        return True
    if isinstance(score, Chain):
        return all(_additive(p) for p in score.parts)
    return isinstance(score, (Bias, Alibi)) and not any(t.requires_grad for t in score.tensors())


def usable_for(device, dtype, score) -> bool:
    """Whether the fused tile path can serve a call on ``device`` in ``dtype`` with the
    resolved score function ``score`` (or None)."""
    return (_OPS is not None and _BWD is not None and torch.device(device).type == "cpu"
            and dtype in (torch.float32, torch.float64) and _additive(score)
            and not torch.compiler.is_compiling())


def usable(q, score) -> bool:
    """Whether the fused tile path can serve this call."""
    return usable_for(q.device, q.dtype, score)


def _span(blocks):
    """``(k0, k1, needs_mask)`` covering every visible key block of a tile."""
    k0, k1 = blocks[0][0], blocks[-1][1]
    gaps = any(a[1] != b[0] for a, b in zip(blocks[:-1], blocks[1:]))
    return k0, k1, gaps or any(partial for *_, partial in blocks)


def _needs_mask(lay, blocks) -> bool:
    return _span(blocks)[2] or lay.score is not None


def _grouped(t, lay, nq, nk):
    """``(B|1, H|1, nq|1, nk|1) -> (B|1, Hkv|1, G*nq, nk)``: rows grouped like the queries."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(-1, -1, nq, nk)
    if t.shape[1] == lay.H:
        return t.reshape(t.shape[0], lay.Hkv, lay.G * nq, nk)  # (B|1, Hkv, G*nq, nk)
    return t.repeat(1, 1, lay.G, 1)  # (B|1, 1, G*nq, nk): every head of a group alike


def _tile_mask(lay, q0, q1, k0, k1, dtype, device):
    """``(additive mask (B|1, Hkv|1, G*nq, nk), visible counts (B|1, Hkv|1, G*nq))``:
    ``-inf`` where the mask hides a key, plus any additive score (bias, ALiBi)."""
    nq, nk = q1 - q0, k1 - k0
    add = torch.zeros(1, 1, lay.G * nq, nk, dtype=dtype, device=device)
    if lay.score is not None:
        zero = torch.zeros(1, lay.H, nq, nk, dtype=dtype, device=device)  # h matters (ALiBi)
        add = add + _grouped(lay.score.tile(zero, q0, q1, k0, k1), lay, nq, nk).to(dtype)
    if lay.mod is not None:
        m = _grouped(lay.mod.tile(lay.B, lay.H, q0, q1, k0, k1, device), lay, nq, nk)
        add = add.masked_fill(~m, float("-inf"))
    return add, torch.isfinite(add).sum(-1)


def _rows(t, lay, q0, q1):
    """``(B, H, T, X) -> (B, Hkv, G*nq, X)``: a tile's rows, grouped by key/value head."""
    nq = q1 - q0
    return t[:, :, q0:q1].reshape(lay.B, lay.Hkv, lay.G * nq, t.shape[-1])


def forward(q, k, v, lay, scale: float):
    """``(out (B, H, T, Dv), lse (B, H, T), single (N, G, T))`` through fused tiles."""
    B, Hkv, G, T = lay.B, lay.Hkv, lay.G, lay.T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, Hkv, G, T, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hkv, G, T), float("-inf"), dtype=acc, device=q.device)
    single = torch.zeros(B, Hkv, G, T, dtype=torch.bool, device=q.device)
    for q0, q1, blocks in lay.tiles():
        if not blocks:
            continue
        nq = q1 - q0
        k0, k1, _ = _span(blocks)
        masked = _needs_mask(lay, blocks)
        mask, count = (_tile_mask(lay, q0, q1, k0, k1, q.dtype, q.device) if masked
                       else (None, None))
        qr, kr = _rows(q, lay, q0, q1), k[:, :, k0:k1]  # (B, Hkv, G*nq, D), (B, Hkv, nk, D)
        o, l = _OPS(qr, kr, v[:, :, k0:k1], attn_mask=mask,
                    scale=scale)  # (B, Hkv, G*nq, Dv), (B, Hkv, G*nq)
        # The kernel returns zeros for rows whose visible scores are all NaN (_edges).
        bad, none = row_flags(qr, kr, None if mask is None else mask > float("-inf"))
        o, l = o.masked_fill(bad.unsqueeze(-1), float("nan")), l.masked_fill(bad, float("nan"))
        if mask is not None:  # a NaN key behind the mask reaches rows that see nothing
            o = o.masked_fill(none.unsqueeze(-1), 0.0)
        if count is not None:
            l = l.masked_fill(count.expand(l.shape) == 0, float("-inf"))
            single[:, :, :, q0:q1] = (count == 1).expand(l.shape).reshape(B, Hkv, G, nq)
        elif k1 - k0 == 1:
            single[:, :, :, q0:q1] = True
        out[:, :, :, q0:q1] = o.reshape(B, Hkv, G, nq, -1)
        lse[:, :, :, q0:q1] = l.reshape(B, Hkv, G, nq).to(acc)
    out, lse = out.view(B, lay.H, T, -1), lse.view(B, lay.H, T)
    if lay.sinks is not None:
        # The sink is one more logit in every row's denominator: rescale by its complement.
        total = torch.logaddexp(lse, lay.sinks.to(acc).view(1, -1, 1))  # (B, H, T)
        share = torch.exp(lse - total).unsqueeze(-1)  # 0 for rows that saw no key
        return (out * share.to(out.dtype), total,
                torch.zeros(B * Hkv, G, T, dtype=torch.bool, device=q.device))
    return out, lse, single.view(B * Hkv, G, T)


def backward(grad_out, q, k, v, out, lse, lay, scale: float, grads, skip) -> None:
    """Add the fused tiles' gradients into ``grads = (dq, dk, dv)`` (float32/64, shaped like
    q, k, v), for every tile whose first row is not in ``skip``."""
    dq, dk, dv = grads
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # the kernel's own form
    for q0, q1, blocks in lay.tiles():
        if not blocks or q0 in skip:
            continue
        nq = q1 - q0
        k0, k1, _ = _span(blocks)
        masked = _needs_mask(lay, blocks)
        mask = _tile_mask(lay, q0, q1, k0, k1, q.dtype, q.device)[0] if masked else None
        l = lse[:, :, q0:q1].reshape(lay.B, lay.Hkv, lay.G * nq).to(q.dtype)
        gq, gk, gv = _BWD(_rows(grad_out, lay, q0, q1), _rows(q, lay, q0, q1),
                          k[:, :, k0:k1], v[:, :, k0:k1], _rows(out, lay, q0, q1), l, 0.0,
                          False, attn_mask=mask, scale=scale)
        dq[:, :, q0:q1] += gq.reshape(lay.B, lay.H, nq, -1).to(dq.dtype)
        dk[:, :, k0:k1] += gk.to(dk.dtype)
        dv[:, :, k0:k1] += gv.to(dv.dtype)
