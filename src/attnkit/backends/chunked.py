"""The ``chunked`` backend: exact attention in O(T) memory, in pure PyTorch.

This is the FlashAttention-2 algorithm written with ordinary tensor ops. Queries are cut into
tiles of ``block_q`` rows and keys into blocks of ``block_k``; for each query tile we walk the
key blocks it can see, keeping a running row maximum ``m``, a running softmax denominator
``l`` and a float32 output accumulator (the "online softmax"), so no ``T x S`` tensor is ever
built. The backward pass recomputes each block's probabilities from the saved row
log-sum-exp instead of storing them.

What this buys over ``sdpa``:

* masks are applied per block from their description, so causal blocks above the diagonal
  and blocks outside a sliding window are never computed (window ``w`` costs O(T·w));
* it returns the log-sum-exp, which split-KV decoding and ring attention need;
* the softmax statistics and accumulators are float32 for bfloat16/float16 inputs. The
  matmuls run in the input dtype on GPUs; on CPUs without native half-precision matmul
  (where a bf16 matmul is several times slower than float32) the inputs are upcast once.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``
queries per key/value head, ``N = B * Hkv``, ``T`` queries, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import MaskSpec

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


class _Layout:
    """Geometry shared by forward and backward: which key blocks each query tile visits."""

    def __init__(self, q: Tensor, k: Tensor, spec: MaskSpec, block_q: int, block_k: int):
        self.B, self.H, self.T, _ = q.shape
        self.Hkv, self.S = k.shape[1], k.shape[2]
        self.G = self.H // self.Hkv
        self.offset = spec.offset(self.T, self.S)
        self.causal, self.window = spec.causal, spec.window
        self.block_q, self.block_k = block_q, block_k
        self.kpm = None
        if spec.key_padding_mask is not None:
            self.kpm = spec.key_padding_mask[:, None, None, None, :]  # (B, 1, 1, 1, S)
        self.dense = None
        if spec.mask is not None:
            m = spec.mask.reshape((1,) * (4 - spec.mask.dim()) + tuple(spec.mask.shape))
            Bm, Hm = m.shape[:2]
            # Split the head dim into (Hkv, G) so it lines up with the grouped scores.
            shape = (Bm, self.Hkv, self.G) if Hm == self.H else (Bm, 1, 1)
            self.dense = m.expand(Bm, Hm, self.T, self.S).reshape(*shape, self.T, self.S)

    def tiles(self):
        """Yield ``(q0, q1, [(k0, k1, needs_position_mask), ...])`` for every query tile."""
        for q0 in range(0, self.T, self.block_q):
            q1 = min(q0 + self.block_q, self.T)
            lo, hi = 0, self.S
            if self.causal:  # query i sees keys j <= i + offset ...
                hi = max(0, min(self.S, q1 + self.offset))
            if self.window is not None:  # ... and j > i + offset - window
                lo = min(self.S, max(0, q0 + self.offset - self.window + 1))
            blocks = []
            for k0 in range(lo, hi, self.block_k):
                k1 = min(k0 + self.block_k, hi)
                # A block needs a position mask only where it crosses a diagonal.
                crosses = self.causal and k1 - 1 > q0 + self.offset
                if self.window is not None:
                    crosses = crosses or k0 <= q1 - 1 + self.offset - self.window
                blocks.append((k0, k1, crosses))
            yield q0, q1, blocks

    def block_mask(self, q0, q1, k0, k1, crosses, device) -> Tensor | None:
        """Bool mask broadcastable to the grouped scores ``(B, Hkv, G, nq, nk)``, or None."""
        mask = None
        if crosses:
            q_pos = torch.arange(q0, q1, device=device).unsqueeze(1) + self.offset  # (nq, 1)
            k_pos = torch.arange(k0, k1, device=device).unsqueeze(0)  # (1, nk)
            mask = k_pos <= q_pos
            if self.window is not None:
                mask = mask & (k_pos > q_pos - self.window)
        if self.kpm is not None:
            pad = self.kpm[..., k0:k1]  # (B, 1, 1, 1, nk)
            mask = pad if mask is None else mask & pad
        if self.dense is not None:
            dense = self.dense[..., q0:q1, k0:k1]  # (B|1, Hkv|1, G|1, nq, nk)
            mask = dense if mask is None else mask & dense
        return mask


def _masked_scores(lay: _Layout, qt, kb, mask, nq, nk):
    """Float32 (float64) scores ``(N, G*nq, nk)`` of pre-scaled queries, masked with -inf."""
    s = torch.matmul(qt, kb.transpose(-2, -1))  # (N, G*nq, nk)
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    if mask is not None:
        grouped = s.view(lay.B, lay.Hkv, lay.G, nq, nk)  # (B, Hkv, G, nq, nk)
        grouped.masked_fill_(~mask, float("-inf"))
    return s


def _grouped_queries(q: Tensor, lay: _Layout, mm: torch.dtype, scale: float) -> Tensor:
    """``(B, H, T, D) -> (N, G, T, D)`` in the matmul dtype, times ``scale``.

    Scaling the ``T x D`` queries once is cheaper than scaling every ``nq x nk`` score block.
    """
    return q.reshape(lay.B * lay.Hkv, lay.G, lay.T, q.shape[-1]).to(mm) * scale  # (N, G, T, D)


def _query_tile(q4: Tensor, q0: int, q1: int) -> Tensor:
    """Rows ``q0:q1`` of every query head in a group: ``(N, G, T, D) -> (N, G*nq, D)``."""
    N, G, _, D = q4.shape
    return q4[:, :, q0:q1].reshape(N, G * (q1 - q0), D)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype the block matmuls run in (see the module docstring)."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return torch.float32
    return x.dtype


def _chunked_forward(q, k, v, lay: _Layout, scale: float):
    N, D, Dv = lay.B * lay.Hkv, q.shape[-1], v.shape[-1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm = _matmul_dtype(q)
    q4 = _grouped_queries(q, lay, mm, scale)  # (N, G, T, D)
    k3, v3 = k.reshape(N, lay.S, D).to(mm), v.reshape(N, lay.S, Dv).to(mm)  # (N, S, D)
    out = torch.zeros(N, lay.G, lay.T, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((N, lay.G, lay.T), float("-inf"), dtype=acc_dtype, device=q.device)
    for q0, q1, blocks in lay.tiles():
        nq = q1 - q0
        if not blocks:
            continue  # no visible key: the rows stay zero with lse = -inf
        qt = _query_tile(q4, q0, q1)  # (N, G*nq, D)
        m = torch.full((N, lay.G * nq, 1), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(N, lay.G * nq, Dv, dtype=acc_dtype, device=q.device)
        for k0, k1, crosses in blocks:
            mask = lay.block_mask(q0, q1, k0, k1, crosses, q.device)
            s = _masked_scores(lay, qt, k3[:, k0:k1], mask, nq, k1 - k0)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # While a row has seen only masked keys its max is -inf; shift by 0 instead.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe).exp_()  # (N, G*nq, nk), in place: s is not needed again
            correction = torch.exp(m - m_safe)
            l.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(correction)
            acc += torch.matmul(p.to(mm), v3[:, k0:k1]).to(acc_dtype)
            m = m_new
        seen = l > 0
        tile_out = acc / torch.where(seen, l, torch.ones_like(l))  # (N, G*nq, Dv)
        tile_lse = torch.where(seen, m + torch.log(l), torch.full_like(l, float("-inf")))
        out[:, :, q0:q1] = tile_out.view(N, lay.G, nq, Dv).to(q.dtype)
        lse[:, :, q0:q1] = tile_lse.view(N, lay.G, nq)
    return out.view(lay.B, lay.H, lay.T, Dv), lse.view(lay.B, lay.H, lay.T)


def _accumulate_backward(grad_out, q, k, v, lse, delta, lay: _Layout, scale: float, grads):
    """Add the gradients of attention over ``k``/``v`` into ``grads = (dq, dk, dv)``.

    ``lse`` and ``delta`` are the rows' log-sum-exp and ``rowsum(dO * O)``; when they are
    the *global* ones of a longer key sequence (ring attention), the probabilities recomputed
    here are this block's share of the full softmax and the gradients add up exactly.
    """
    N, D, Dv = lay.B * lay.Hkv, q.shape[-1], v.shape[-1]
    acc_dtype, mm = grads[0].dtype, _matmul_dtype(q)
    q4 = _grouped_queries(q, lay, mm, scale)  # (N, G, T, D)
    do4 = grad_out.reshape(N, lay.G, lay.T, Dv).to(mm)  # (N, G, T, Dv)
    k3, v3 = k.reshape(N, lay.S, D).to(mm), v.reshape(N, lay.S, Dv).to(mm)  # (N, S, D)
    # Fully masked rows have lse = -inf and only -inf scores; shift by 0 so P = 0, not NaN.
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).reshape(N, lay.G, lay.T)
    delta = delta.reshape(N, lay.G, lay.T)
    # .view, not .reshape: the updates must land in the caller's tensors.
    dq = grads[0].view(N, lay.G, lay.T, D)  # (N, G, T, D)
    dk, dv = grads[1].view(N, lay.S, D), grads[2].view(N, lay.S, Dv)  # (N, S, D)
    for q0, q1, blocks in lay.tiles():
        nq = q1 - q0
        qt = _query_tile(q4, q0, q1)  # (N, G*nq, D)
        dot = _query_tile(do4, q0, q1)  # (N, G*nq, Dv)
        lse_t = lse[:, :, q0:q1].reshape(N, lay.G * nq, 1)
        delta_t = delta[:, :, q0:q1].reshape(N, lay.G * nq, 1)
        dq_t = torch.zeros(N, lay.G * nq, D, dtype=acc_dtype, device=q.device)
        for k0, k1, crosses in blocks:
            kb, vb = k3[:, k0:k1], v3[:, k0:k1]
            mask = lay.block_mask(q0, q1, k0, k1, crosses, q.device)
            p = _masked_scores(lay, qt, kb, mask, nq, k1 - k0).sub_(lse_t).exp_()
            dv[:, k0:k1] += torch.matmul(p.to(mm).transpose(-2, -1), dot).to(acc_dtype)
            dp = torch.matmul(dot, vb.transpose(-2, -1)).to(acc_dtype)  # (N, G*nq, nk)
            ds = p.mul_(dp.sub_(delta_t)).to(mm)  # dL/d(scores), scores = (scale·q) kᵀ
            dq_t += torch.matmul(ds, kb).to(acc_dtype)
            dk[:, k0:k1] += torch.matmul(ds.transpose(-2, -1), qt).to(acc_dtype)  # qt scaled
        # The chain rule through q·scale, once per tile rather than once per block.
        dq[:, :, q0:q1] += dq_t.mul_(scale).view(N, lay.G, nq, D)


def chunked_block_backward(grad_out, q, k, v, lse, delta, spec: MaskSpec, *, scale: float,
                           grads, block_q: int = DEFAULT_BLOCK_Q,
                           block_k: int = DEFAULT_BLOCK_K) -> None:
    """Accumulate one key block's attention gradients, given the rows' global statistics.

    The building block of ring attention's backward: each rank adds the gradient of its
    queries against the key/value block in hand, using the log-sum-exp and
    ``delta = rowsum(dO * O)`` of the *whole* sequence.

    Args:
        grad_out: ``(B, H, T, Dv)``; q ``(B, H, T, D)``; k ``(B, Hkv, S, D)``;
            v ``(B, Hkv, S, Dv)``.
        lse, delta: ``(B, H, T)`` in the accumulation dtype (float32 or float64).
        spec: which keys of this block each query sees (positions relative to the block).
        scale: the score multiplier used in the forward.
        grads: ``(dq, dk, dv)`` shaped like q, k, v in the accumulation dtype, updated in
            place; slices of bigger buffers are fine as long as ``.view`` can merge ``B``
            with the head dim.
    """
    lay = _Layout(q, k, spec, block_q, block_k)
    _accumulate_backward(grad_out, q, k, v, lse, delta, lay, scale, grads)


def _chunked_backward(grad_out, q, k, v, out, lse, lay: _Layout, scale: float):
    acc_dtype = lse.dtype
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # (B, H, T)
    grads = tuple(torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
    _accumulate_backward(grad_out, q, k, v, lse, delta, lay, scale, grads)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


class _ChunkedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay, scale):
        out, lse = _chunked_forward(q, k, v, lay, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.scale = lay, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _chunked_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.lay,
                                       ctx.scale)
        return dq, dk, dv, None, None


def chunked_check(q, k, v, spec: MaskSpec, *, dropout_p: float, return_lse: bool):
    if dropout_p > 0.0:
        return ("dropout on attention weights is not implemented in the chunked backend; "
                "use backend='sdpa' or 'math', or dropout_p=0")
    return None


def chunked_attention(q, k, v, spec: MaskSpec, *, dropout_p: float = 0.0, scale: float,
                      return_lse: bool = False, block_q: int = DEFAULT_BLOCK_Q,
                      block_k: int = DEFAULT_BLOCK_K):
    """O(T)-memory exact attention; contract in :mod:`attnkit.backends.registry`.

    Args:
        block_q: query rows per tile (not part of the contract; memory ~ block_q·block_k·H).
        block_k: keys per block.

    Raises:
        ValueError: ``dropout_p > 0`` or a block size below 1.
    """
    reason = chunked_check(q, k, v, spec, dropout_p=dropout_p, return_lse=return_lse)
    if reason:
        raise ValueError(reason)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1, got {block_q} and {block_k}")
    lay = _Layout(q, k, spec, block_q, block_k)
    out, lse = _ChunkedAttentionFn.apply(q, k, v, lay, scale)
    return (out, lse) if return_lse else out
