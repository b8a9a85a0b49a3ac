"""The fused C++ attention kernel behind ``chunked``: one call per ``attention()``, forward and
backward, over the call's block plan (sources ``_attn_kernel*.cpp``, built by :mod:`._ext`).

Python prepares, C++ loops. :func:`prepare` turns a lowered :class:`~attnkit.spec.Call` into
what the kernel reads:

* the mask as per-row key intervals when its kinds can say them
  (:meth:`attnkit.masks.MaskMod.intervals`: causal, windows, documents, padding, varlen,
  prefix-LM, chunked-local, and their ANDs/ORs), with no mask memory at all; what cannot
  (a mask function, a dense tensor) becomes 64 x 64-bit words on the partial tiles of the
  call's :class:`~attnkit.summary.BlockSummary` only, evaluated with ``mask.tile`` one row of
  tiles at a time;
* the score functions it applies itself, in order: softcap, ALiBi (any alignment, or varlen
  positions) and an additive bias read through strides (with its gradient), plus sinks.

Anything else (another score function, ALiBi slopes that need a gradient, a non-CPU device,
``torch.compile``) stays on chunked's pure-PyTorch block loop: :func:`why_not` says why.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries, ``S``
keys, ``D``/``Dv`` head dims; ``nQ``/``nK`` 64-row/-key tiles, ``P`` tiles with mask words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks.base import And
from ..masks.row_ranges import intersect
from ..scores import Alibi, Bias, Chain, ScoreShift, Softcap
from ..summary import EMPTY, PARTIAL, BlockSummary
from . import _ext

TILE = 64  # the kernel's query rows and keys per tile (BQ = BK)
OP_SOFTCAP, OP_ALIBI, OP_BIAS = 1, 2, 3
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def module():
    """The loaded kernel module, building it on first use (None: see :func:`status`)."""
    return _ext.load(_ext.ATTN)


def status() -> _ext.Status:
    """Which implementation runs and why (never builds)."""
    return _ext.status(_ext.ATTN)


@dataclass
class Prepared:
    """A call as the kernel reads it (see the module docstring)."""

    mask: list  # [intervals, kind, bits, slot], each a tensor or None
    ops: list
    cap: float
    cap_after_bias: bool
    score_tensors: list  # [slopes, positions, bias view], in the accumulation dtype
    sinks: Tensor | None
    bias: Tensor | None = None  # the user's bias when it needs a gradient
    dbias_shape: tuple | None = None  # (B|1, H|1, T, S|1)


def why_not(q: Tensor, k: Tensor, v: Tensor, call) -> str | None:
    """None if the kernel can serve this call's shapes, dtype and device, else why not
    (the mask and scores are checked by :func:`prepare`)."""
    if q.device.type != "cpu":
        return f"the kernel runs on CPU, the inputs are on {q.device.type}"
    if q.dtype not in _DTYPES:
        return f"the kernel takes float32/float64/bfloat16/float16, not {q.dtype}"
    if torch.compiler.is_compiling():
        return "under torch.compile chunked traces its PyTorch block loop"
    if min(q.shape[-1], v.shape[-1]) == 0 or max(q.shape[2], k.shape[2]) >= 1 << 24:
        return "the kernel needs head dims >= 1 and lengths below 2^24"
    return None


def serves(call) -> str | None:
    """None when the kernel (built, or to be built on first use) would serve ``call``,
    else why not; cheap (no tensor is prepared): the cost rule asks it."""
    st = status()
    if st.impl != "cpp":
        return st.describe()
    if call.device.type != "cpu" or call.dtype not in _DTYPES or torch.compiler.is_compiling():
        return "not a CPU call in float32/float64/bfloat16/float16 outside torch.compile"
    if call.score is not None:
        for part, _, _ in _flat(call.score):
            if not isinstance(part, (Softcap, Alibi, Bias)):
                return f"score function {part.describe()} runs in chunked's PyTorch loop"
            if isinstance(part, Alibi) and part.slopes.requires_grad and call.grad:
                return "ALiBi slopes that need a gradient run in chunked's PyTorch loop"
            if isinstance(part, Alibi) and part.slopes.dim() != 1:
                return "per-sequence ALiBi slopes (N, H) run in chunked's PyTorch loop"
    return None


def _bits64(m: Tensor) -> Tensor:
    """``(..., 64)`` bool -> ``(...)`` int64, bit c = m[..., c] (little-endian bytes)."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    byte = (m.reshape(*m.shape[:-1], 8, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    return byte.contiguous().view(torch.int64).squeeze(-1)


def _mask_bits(mod, want: Tensor, B: int, H: int, T: int, S: int):
    """``(bits (P, B|1, H|1, 64) int64, slot (nQ, nK) int32)``: ``mod`` evaluated on the
    tiles ``want`` marks, one row of tiles at a time."""
    slot = torch.full(want.shape, -1, dtype=torch.int32)
    slot[want] = torch.arange(int(want.sum()), dtype=torch.int32)
    words = []
    for i in want.any(1).nonzero().flatten().tolist():
        cols = want[i].nonzero().flatten()
        q0, q1 = i * TILE, min(T, (i + 1) * TILE)
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        m = mod.tile(B, H, q0, q1, c0 * TILE, min(S, c1 * TILE), None)
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        m = m.expand(m.shape[0], m.shape[1], q1 - q0, min(S, c1 * TILE) - c0 * TILE)
        pad = torch.zeros(*m.shape[:2], TILE, (c1 - c0) * TILE, dtype=torch.bool)
        pad[:, :, : q1 - q0, : m.shape[3]] = m
        tiles = pad.view(*m.shape[:2], TILE, c1 - c0, TILE)[:, :, :, cols - c0]
        words.append(_bits64(tiles).permute(3, 0, 1, 2))  # (n, B|1, H|1, 64)
    Bm = max(w.shape[1] for w in words)
    Hm = max(w.shape[2] for w in words)
    bits = torch.cat([w.expand(w.shape[0], Bm, Hm, TILE) for w in words]).contiguous()
    return bits, slot


def _mask_tensors(call, B: int, H: int) -> list:
    """``[intervals, kind, bits, slot]`` for the call's lowered mask."""
    mod, T, S = call.mask, call.T, call.S
    if mod is None:
        return [None] * 4
    parts = list(mod.parts) if isinstance(mod, And) else [mod]
    ranges = [p.intervals(B, H, 0, T) for p in parts]
    iv = None
    for r in (r for r in ranges if r is not None):
        iv = r if iv is None else intersect(iv, r)
        if iv is None:  # more than two ranges per row: the parts go to the bits
            ranges = [None] * len(parts)
            break
    opaque = [p for p, r in zip(parts, ranges) if r is None]
    if iv is not None:
        iv = iv.clamp(0, S).to(torch.int32).contiguous()
        iv = iv.expand(iv.shape[0], iv.shape[1], T, iv.shape[3])
    if not opaque:
        return [iv, None, None, None]
    kind = call.summary(TILE, TILE).kind.contiguous()
    rest = opaque[0] if len(opaque) == 1 else And(tuple(opaque))
    rest_kind = kind if iv is None else BlockSummary.build(rest, T, S, TILE, TILE).kind
    want = (kind != EMPTY) & (rest_kind == PARTIAL)
    if not bool(want.any()):
        return [iv, kind, None, None]
    bits, slot = _mask_bits(rest, want, B, H, T, S)
    return [iv, kind, bits, slot]


def _flat(score, qo=0, ko=0):
    """``[(part, q_offset, kv_offset)]``: a chain's parts, shifts carried down."""
    if isinstance(score, Chain):
        return [x for p in score.parts for x in _flat(p, qo, ko)]
    if isinstance(score, ScoreShift):
        return _flat(score.mod, qo + score.q_offset, ko + score.kv_offset)
    return [(score, qo, ko)]


def _score_tensors(call, acc: torch.dtype, B: int, H: int):
    """``(ops, cap, cap_after_bias, [slopes, pos, bias], bias_param, dbias_shape)`` or the
    reason the kernel cannot apply the call's score function."""
    from ..varlen import VarlenAlibi  # varlen imports the engine, which imports chunked

    T, S = call.T, call.S
    ops, cap, tensors, param, shape = [], 0.0, [None, None, None], None, None
    for part, qo, ko in ([] if call.score is None else _flat(call.score)):
        kind = {Softcap: OP_SOFTCAP, Alibi: OP_ALIBI, VarlenAlibi: OP_ALIBI, Bias: OP_BIAS}.get(
            type(part))
        if kind is None or kind in ops:
            return f"score function {part.describe()} runs in chunked's PyTorch block loop"
        ops.append(kind)
        if kind == OP_SOFTCAP:
            cap = float(part.cap)
        elif kind == OP_ALIBI:
            if part.slopes.requires_grad and call.grad:
                return "ALiBi slopes that need a gradient run in chunked's PyTorch block loop"
            if part.slopes.dim() != 1:
                return "per-sequence ALiBi slopes (N, H) run in chunked's PyTorch block loop"
            if isinstance(part, VarlenAlibi):
                pos = part.mask.pos[qo:qo + T] - ko
            else:
                pos = torch.arange(T) + (qo + (part.offset or 0) - ko)
            tensors[0] = part.slopes.detach().to(acc).contiguous()
            tensors[1] = pos.to(acc).contiguous()
        else:
            b4 = part._b4()
            if qo or ko:
                if part.bias.requires_grad and call.grad:
                    return "a shifted bias that needs a gradient runs in chunked's block loop"
                b4 = b4[:, :, qo:qo + T] if b4.shape[2] > 1 else b4
                b4 = b4[..., ko:ko + S] if b4.shape[3] > 1 else b4
            tensors[2] = b4.detach().to(acc).expand(B, H, T, S)
            if part.bias.requires_grad and call.grad:
                param, shape = part.bias, (b4.shape[0], b4.shape[1], T, b4.shape[3])
    after = OP_SOFTCAP in ops and OP_BIAS in ops and ops.index(OP_SOFTCAP) > ops.index(OP_BIAS)
    return ops, cap, after, tensors, param, shape


def prepare(q: Tensor, k: Tensor, v: Tensor, call) -> Prepared | str:
    """The call as the kernel reads it, or the reason it cannot."""
    why = why_not(q, k, v, call)
    if why:
        return why
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = _score_tensors(call, acc, call.B, call.H)
    if isinstance(scores, str):
        return scores
    ops, cap, after, tensors, param, shape = scores
    sinks = None if call.sinks is None else call.sinks.detach().to(acc).contiguous()
    return Prepared(_mask_tensors(call, call.B, call.H), ops, cap, after, tensors, sinks,
                    param, shape)


def _rows_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prep, scale, sinks, bias):
        q, k, v = (_rows_last(t) for t in (q, k, v))
        out, lse, single = module().forward(q, k, v, scale, prep.mask, prep.score_tensors,
                                            prep.ops, prep.cap, prep.cap_after_bias,
                                            prep.sinks, prep.sinks is None)
        ctx.save_for_backward(q, k, v, out, lse, single)
        ctx.prep, ctx.scale = prep, scale
        ctx.sink_dtype = None if sinks is None else sinks.dtype
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, single = ctx.saved_tensors
        prep, acc = ctx.prep, lse.dtype
        grad_out = _rows_last(grad_out)
        # delta_i = rowsum(dO * O); the lse's own gradient g enters dS as P * g.
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (B, H, T)
        g = None if grad_lse is None else torch.where(torch.isinf(lse), 0.0, grad_lse)
        if g is not None:
            delta = delta - g
        ones, rows = None, delta
        if single.numel() and bool(single.any()):
            # A row that saw one key has dS = 0 through the output, exactly: only P * g.
            ones = single
            rows = torch.where(single, -g if g is not None else 0.0, delta)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
        dbias = None
        if prep.bias is not None and ctx.needs_input_grad[6]:
            dbias = torch.zeros(prep.dbias_shape, dtype=acc)
        module().backward(grad_out, q, k, v, lse, rows.contiguous(), ones, ctx.scale,
                          prep.mask, prep.score_tensors, prep.ops, prep.cap,
                          prep.cap_after_bias, dq, dk, dv, dbias)
        dsinks = None
        if prep.sinks is not None and ctx.needs_input_grad[5]:
            # d lse_i / d sink_h = P(sink)_i, and dL/d lse_i enters as -delta_i.
            share = torch.exp(prep.sinks.view(1, -1, 1) - lse)  # (B, H, T)
            dsinks = -(torch.where(torch.isinf(lse), 0.0, share) * delta).sum((0, 2))
        if dbias is not None:
            b = prep.bias
            shape4 = (1,) * (4 - b.dim()) + tuple(b.shape)
            if shape4[2] == 1:  # the bias is shared by every query row: sum them
                dbias = dbias.sum(2, keepdim=True)
            dbias = dbias.reshape(b.shape).to(b.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None,
                None if dsinks is None else dsinks.to(ctx.sink_dtype), dbias)


def attention(q: Tensor, k: Tensor, v: Tensor, prep: Prepared, scale: float,
              sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(out (B, H, T, Dv), lse (B, H, T))`` through the kernel, differentiable in q, k, v,
    the sinks and a bias that needs a gradient."""
    return _KernelAttention.apply(q, k, v, prep, float(scale), sinks, prep.bias)


def block_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                   delta: Tensor, prep: Prepared, scale: float, grads) -> None:
    """Add one key block's gradients into ``grads = (dq, dk, dv)`` (accumulation dtype, any
    strides with a contiguous last dim), given the rows' global ``lse`` and ``delta``
    (ring attention's backward step)."""
    q, k, v, grad_out = (_rows_last(t) for t in (q, k, v, grad_out))
    module().backward(grad_out, q, k, v, lse.contiguous(), delta.contiguous(), None,
                      float(scale), prep.mask, prep.score_tensors, prep.ops, prep.cap,
                      prep.cap_after_bias, *grads, None)
