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
* the softmax statistics and accumulators are float32 for bfloat16/float16 inputs.

Two implementations, the same results and the same tests:

* ``"kernel"``: attnkit's fused C++ kernel (:mod:`._kernel`, built by :mod:`._ext`): one call
  per ``attention()`` for the forward and one for the backward, the mask as per-row key
  intervals (or bits on partial tiles), softcap/ALiBi/bias/sinks applied inside. It serves
  CPU calls in float32/float64/bfloat16/float16 whose score functions it knows.
* ``"torch"``: the same algorithm in PyTorch ops, block by block (on CPU, float32/float64
  tiles without a score gradient run torch's fused flash kernel per tile,
  :mod:`._fused_tiles`). It serves everything else: other devices, ``torch.compile``, any
  score function with exact gradients for its tensors.

:func:`implementation` says which one runs for a call and why.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``
queries per key/value head, ``N = B * Hkv``, ``T`` queries, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec import Call
from . import _fused_tiles, _kernel
from ._rates import rate as measured_rate
from .registry import BACKWARD_FACTOR, Backend, as_call

# chunked owns its block sizes: query rows per tile, the key granularity of its block
# summary, and the most keys one block matmul takes.
BLOCK_Q = 256
FINE = 64
BLOCK_K = 512


class _Layout:
    """Geometry shared by forward and backward: which key blocks each query tile visits.

    The plan is the call's :class:`~attnkit.summary.BlockSummary` at ``block_q x 64`` (empty,
    full or partial per tile, from the mask's interval arithmetic, no ``T x S`` tensor): each
    tile visits only its non-empty runs, cut into key blocks of at most ``block_k``; full and
    partial runs are separate key blocks, so only the partial ones build a mask.
    """

    def __init__(self, q: Tensor, k: Tensor, call: Call, block_q: int, block_k: int,
                 fused: bool = False):
        self.B, self.H, self.T, _ = q.shape
        self.Hkv, self.S = k.shape[1], k.shape[2]
        self.G = self.H // self.Hkv
        self.mod, self.score, self.sinks = call.mask, call.score, call.sinks
        self.params = tuple(t for t in (self.score.tensors() if self.score else ())
                            if t.requires_grad)
        summary = call.summary(block_q, min(FINE, block_k))
        self.plan = summary.tiles(max_block=block_k)
        self.fused = fused  # run each tile through torch's fused CPU kernel (_fused_tiles)

    def tiles(self):
        """``(q0, q1, [(k0, k1, needs_mask), ...])`` for every query tile."""
        return self.plan

    def block_mask(self, q0, q1, k0, k1, partial, device) -> Tensor | None:
        """Bool mask broadcastable to the scores ``(B, H, nq, nk)``, or None."""
        if not partial:
            return None
        return self.mod.tile(self.B, self.H, q0, q1, k0, k1, device)


@dataclass
class _Rows:
    """What the backward knows of every row, ``(B, H, T)`` each: the log-sum-exp, ``delta =
    rowsum(dO * O)`` minus the lse's own gradient, the rows that saw one key (``single``,
    ``(N, G, T)``) and the lse's gradient ``grad_lse``."""

    lse: Tensor
    delta: Tensor
    single: Tensor | None = None
    grad_lse: Tensor | None = None


def _scores(lay: _Layout, qt, kb, q0, q1, k0, k1, mask, grad_score=False):
    """Float32 (float64) scores ``(N, G*nq, nk)`` of pre-scaled queries, score function
    applied, masked with -inf. With ``grad_score`` also ``(raw, modified)`` for autograd."""
    nq, nk = q1 - q0, k1 - k0
    s = torch.matmul(qt, kb.transpose(-2, -1))  # (N, G*nq, nk)
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    graph = None
    if lay.score is not None:
        if grad_score:
            with torch.enable_grad():
                raw = s.detach().requires_grad_()
                modded = lay.score.tile(raw.view(lay.B, lay.H, nq, nk), q0, q1, k0, k1)
            graph = (raw, modded)
            # A copy: the caller works in place, and autograd may have saved ``modded``.
            s = modded.detach().reshape(s.shape).clone()  # (N, G*nq, nk)
        else:
            s = lay.score.tile(s.view(lay.B, lay.H, nq, nk), q0, q1, k0, k1)
            s = s.reshape(lay.B * lay.Hkv, lay.G * nq, nk)  # (N, G*nq, nk)
    if mask is not None:
        s.view(lay.B, lay.H, nq, nk).masked_fill_(~mask, float("-inf"))  # (B, H, nq, nk)
    return s, graph


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


def _sink_rows(lay: _Layout, q0: int, q1: int, dtype) -> Tensor:
    """The sink logit of every row of a tile: ``(H,) -> (N, G*nq, 1)``."""
    sinks = lay.sinks.to(dtype).view(1, lay.Hkv, lay.G, 1)  # (1, Hkv, G, 1)
    rows = sinks.expand(lay.B, lay.Hkv, lay.G, q1 - q0)  # (B, Hkv, G, nq)
    return rows.reshape(lay.B * lay.Hkv, lay.G * (q1 - q0), 1)  # (N, G*nq, 1)


def _chunked_forward(q, k, v, lay: _Layout, scale: float):
    """``(out, lse, single)``: ``single (N, G, T)`` marks rows whose softmax put all its mass
    on one key (``l == 1``): their gradient is exactly zero, which the backward enforces."""
    N, D, Dv = lay.B * lay.Hkv, q.shape[-1], v.shape[-1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mm = _matmul_dtype(q)
    q4 = _grouped_queries(q, lay, mm, scale)  # (N, G, T, D)
    k3, v3 = k.reshape(N, lay.S, D).to(mm), v.reshape(N, lay.S, Dv).to(mm)  # (N, S, D)
    out = torch.zeros(N, lay.G, lay.T, Dv, dtype=q.dtype, device=q.device)
    lse = torch.full((N, lay.G, lay.T), float("-inf"), dtype=acc_dtype, device=q.device)
    single = torch.zeros(N, lay.G, lay.T, dtype=torch.bool, device=q.device)
    for q0, q1, blocks in lay.tiles():
        nq = q1 - q0
        if not blocks and lay.sinks is None:
            continue  # no visible key: the rows stay zero with lse = -inf
        qt = _query_tile(q4, q0, q1)  # (N, G*nq, D)
        m = torch.full((N, lay.G * nq, 1), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(N, lay.G * nq, Dv, dtype=acc_dtype, device=q.device)
        for k0, k1, partial in blocks:
            mask = lay.block_mask(q0, q1, k0, k1, partial, q.device)
            s, _ = _scores(lay, qt, k3[:, k0:k1], q0, q1, k0, k1, mask)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # While a row has seen only masked keys its max is -inf; shift by 0 instead.
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe).exp_()  # (N, G*nq, nk), in place: s is not needed again
            correction = torch.exp(m - m_safe)
            l.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(correction)
            acc += torch.matmul(p.to(mm), v3[:, k0:k1]).to(acc_dtype)
            m = m_new
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        seen = l > 0
        tile_lse = torch.where(seen, m_safe + torch.log(l), torch.full_like(l, float("-inf")))
        if lay.sinks is not None:
            tile_lse = torch.logaddexp(tile_lse, _sink_rows(lay, q0, q1, acc_dtype))
            share = torch.exp(m_safe - tile_lse)  # acc is relative to m_safe
            tile_out = acc * torch.where(torch.isinf(tile_lse), torch.zeros_like(share), share)
        else:
            tile_out = acc / torch.where(seen, l, torch.ones_like(l))  # (N, G*nq, Dv)
            single[:, :, q0:q1] = (l == 1).view(N, lay.G, nq)
        out[:, :, q0:q1] = tile_out.view(N, lay.G, nq, Dv).to(q.dtype)
        lse[:, :, q0:q1] = tile_lse.view(N, lay.G, nq)
    return out.view(lay.B, lay.H, lay.T, Dv), lse.view(lay.B, lay.H, lay.T), single


def _accumulate_backward(grad_out, q, k, v, rows: _Rows, lay: _Layout, scale: float, grads,
                         param_grads=None, only=None):
    """Add the gradients of attention over ``k``/``v`` into ``grads = (dq, dk, dv)``.

    When ``rows`` holds the *global* statistics of a longer key sequence (ring attention),
    the probabilities recomputed here are this block's share of the full softmax and the
    gradients add up exactly. Rows that saw one key (``rows.single``) get an exactly zero
    gradient through the output, only the lse's own gradient remains; ``param_grads``
    receives the gradients of the score function's tensors; ``only`` limits the work to the
    query tiles starting at those rows.
    """
    lse, delta, single, grad_lse = rows.lse, rows.delta, rows.single, rows.grad_lse
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
    want = lay.params if param_grads is not None else ()
    for q0, q1, blocks in lay.tiles():
        if only is not None and q0 not in only:
            continue
        nq = q1 - q0
        qt = _query_tile(q4, q0, q1)  # (N, G*nq, D)
        dot = _query_tile(do4, q0, q1)  # (N, G*nq, Dv)
        lse_t = lse[:, :, q0:q1].reshape(N, lay.G * nq, 1)
        delta_t = delta[:, :, q0:q1].reshape(N, lay.G * nq, 1)
        keep = glse_t = None
        if single is not None and bool(single[:, :, q0:q1].any()):
            one = single[:, :, q0:q1].reshape(N, lay.G * nq, 1)
            keep = (~one).to(acc_dtype)
            glse_t = torch.zeros_like(keep) if grad_lse is None else \
                grad_lse.reshape(N, lay.G, lay.T)[:, :, q0:q1].reshape(keep.shape) * one
        dq_t = torch.zeros(N, lay.G * nq, D, dtype=acc_dtype, device=q.device)
        for k0, k1, partial in blocks:
            kb, vb = k3[:, k0:k1], v3[:, k0:k1]
            mask = lay.block_mask(q0, q1, k0, k1, partial, q.device)
            s, graph = _scores(lay, qt, kb, q0, q1, k0, k1, mask, grad_score=lay.score is not None)
            p = s.sub_(lse_t).exp_()
            # One visible key: dS = P * (dP - delta) is exactly 0 in exact arithmetic, so
            # only the lse's own term P * g remains (rounding would leave ~1e-5 otherwise).
            fix = p * glse_t if keep is not None else None
            dv[:, k0:k1] += torch.matmul(p.to(mm).transpose(-2, -1), dot).to(acc_dtype)
            dp = torch.matmul(dot, vb.transpose(-2, -1)).to(acc_dtype)  # (N, G*nq, nk)
            ds = p.mul_(dp.sub_(delta_t))  # dL/d(modified scores)
            if keep is not None:
                ds.mul_(keep).add_(fix)
            if graph is not None:  # through the score function, by autograd on the block
                raw, modded = graph
                got = torch.autograd.grad(modded, (raw, *want), ds.view(modded.shape),
                                          allow_unused=True)
                ds = got[0].reshape(ds.shape)
                for acc_g, g in zip(param_grads, got[1:]):
                    if g is not None:
                        acc_g += g
            ds = ds.to(mm)
            dq_t += torch.matmul(ds, kb).to(acc_dtype)
            dk[:, k0:k1] += torch.matmul(ds.transpose(-2, -1), qt).to(acc_dtype)  # qt scaled
        # The chain rule through q·scale, once per tile rather than once per block.
        dq[:, :, q0:q1] += dq_t.mul_(scale).view(N, lay.G, nq, D)


def chunked_block_backward(grad_out, q, k, v, lse, delta, spec, *, scale: float,
                           grads, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> None:
    """Accumulate one key block's attention gradients, given the rows' global statistics.

    The building block of ring attention's backward: each rank adds the gradient of its
    queries against the key/value block in hand, using the log-sum-exp and
    ``delta = rowsum(dO * O)`` of the *whole* sequence.

    Args:
        grad_out: ``(B, H, T, Dv)``; q ``(B, H, T, D)``; k ``(B, Hkv, S, D)``;
            v ``(B, Hkv, S, Dv)``.
        lse, delta: ``(B, H, T)`` in the accumulation dtype (float32 or float64).
        spec: a :class:`attnkit.masks.MaskSpec`: which keys of this block each query sees
            (positions relative to the block, or a description wrapped in
            :func:`attnkit.masks.at_positions`).
        scale: the score multiplier used in the forward.
        grads: ``(dq, dk, dv)`` shaped like q, k, v in the accumulation dtype, updated in
            place; slices of bigger buffers are fine as long as ``.view`` can merge ``B``
            with the head dim.
    """
    call = Call.of(q, k, spec, grad=True)
    prep = _kernel_plan(q, k, v, call)
    if not isinstance(prep, str) and all(g.dtype == lse.dtype for g in grads):
        # Ring attention hands K/V over in the accumulation dtype (a lossless cast) beside
        # half-precision queries: the kernel takes one dtype, the widest.
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v, grad_out = (t.to(dt) for t in (q, k, v, grad_out))
        _kernel.block_backward(grad_out, q, k, v, lse, delta, prep, scale, grads)
        return
    lay = _Layout(q, k, call, block_q, block_k)
    _accumulate_backward(grad_out, q, k, v, _Rows(lse, delta), lay, scale, grads)


def _chunked_backward(grad_out, grad_lse, q, k, v, out, lse, single, lay: _Layout, scale):
    acc_dtype = lse.dtype
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax backward's row term. The
    # lse's own gradient g adds P_ij * g_i to dS_ij, i.e. delta_i - g_i in its place.
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1)  # (B, H, T)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(grad_lse), grad_lse)
    grads = tuple(torch.zeros(t.shape, dtype=acc_dtype, device=t.device) for t in (q, k, v))
    param_grads = [torch.zeros(p.shape, dtype=acc_dtype, device=p.device) for p in lay.params]
    only = None
    if lay.fused and (grad_lse is None or not bool(grad_lse.any())):
        # Tiles with a one-key row go through the block loop, which makes their gradient
        # exactly zero; the fused kernel would leave rounding there.
        only = {q0 for q0, q1, _ in lay.tiles() if bool(single[:, :, q0:q1].any())}
        _fused_tiles.backward(grad_out, q, k, v, out, lse, lay, scale, grads, skip=only)
    if only is None or only:
        _accumulate_backward(grad_out, q, k, v, _Rows(lse, delta, single, grad_lse), lay,
                             scale, grads, param_grads, only)
    dsinks = None
    if lay.sinks is not None and lay.sinks.requires_grad:
        # d lse_i / d sink_h = P(sink)_i, and dL/d lse_i enters as -delta_i.
        share = torch.exp(lay.sinks.to(acc_dtype).view(1, -1, 1) - lse)  # (B, H, T)
        dsinks = -(torch.where(torch.isinf(lse), torch.zeros_like(share), share) * delta)
        dsinks = dsinks.sum((0, 2)).to(lay.sinks.dtype)  # (H,)
    return (*(g.to(t.dtype) for g, t in zip(grads, (q, k, v))), dsinks,
            *(g.to(p.dtype) for g, p in zip(param_grads, lay.params)))


class _ChunkedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay, scale, sinks, *params):
        if lay.fused:
            out, lse, single = _fused_tiles.forward(q, k, v, lay, scale)
        else:
            out, lse, single = _chunked_forward(q, k, v, lay, scale)
        ctx.save_for_backward(q, k, v, out, lse, single)
        ctx.lay, ctx.scale = lay, scale
        ctx.mark_non_differentiable(single)
        return out, lse, single

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse, _grad_single):
        q, k, v, out, lse, single = ctx.saved_tensors
        dq, dk, dv, dsinks, *dparams = _chunked_backward(
            grad_out.contiguous(), grad_lse, q, k, v, out, lse, single, ctx.lay, ctx.scale)
        return (dq, dk, dv, None, None, dsinks, *dparams)


_FORCED: list[str] = []  # use_implementation()'s stack


@contextlib.contextmanager
def use_implementation(name: str):
    """Run chunked with one implementation inside the block: ``"kernel"`` (the C++ kernel,
    for the calls it can serve) or ``"torch"`` (the PyTorch block loop). Tests run both.

    Raises:
        ValueError: another name.
    """
    if name not in ("kernel", "torch"):
        raise ValueError(f"implementation must be 'kernel' or 'torch', got {name!r}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _kernel_plan(q, k, v, call) -> "_kernel.Prepared | str":
    """The call prepared for the C++ kernel, or why the PyTorch block loop runs instead."""
    if _FORCED and _FORCED[-1] == "torch":
        return "pure-PyTorch block loop (chosen with use_implementation)"
    why = _kernel.why_not(q, k, v, call)
    if why is not None:
        return f"pure-PyTorch block loop ({why})"
    if _kernel.module() is None:  # builds it on first use, or says why it cannot
        return _kernel.status().describe()
    prep = _kernel.prepare(q, k, v, call)
    return prep if not isinstance(prep, str) else f"pure-PyTorch block loop ({prep})"


def implementation(q, k, v, call) -> tuple[str, str]:
    """``("kernel" | "torch", a sentence)``: which implementation chunked runs for this call
    and why; never builds the kernel (``explain()`` shows it)."""
    call = as_call(q, k, v, call)
    if _FORCED and _FORCED[-1] == "torch":
        return "torch", "pure-PyTorch block loop (chosen with use_implementation)"
    st = _kernel.status()
    why = _kernel.why_not(q, k, v, call) if st.impl == "cpp" else None
    if st.impl != "cpp" or why is not None:
        return "torch", st.describe() if why is None else f"pure-PyTorch block loop ({why})"
    prep = _kernel.prepare(q, k, v, call)
    if isinstance(prep, str):
        return "torch", f"pure-PyTorch block loop ({prep})"
    return "kernel", st.describe()


def chunked_check(q, k, v, call, *, dropout_p: float, return_lse: bool,
                  return_weights: bool = False):
    if dropout_p > 0.0:
        return ("dropout on attention weights is not implemented in the chunked backend; "
                "use backend='sdpa' or 'math', or dropout_p=0")
    if return_weights:
        return "the chunked backend never builds the T x S weights it would have to return"
    if torch.compiler.is_compiling():
        return ("chunked plans its key blocks on the host from the mask's tiles, which "
                "torch.compile cannot trace without a graph break; inside a compiled region "
                "sdpa and math serve")
    if call.grad and call.score is not None and not call.score.reads_known:
        # Its autograd returns gradients only for the tensors the score function reads.
        return (f"score_mod {call.score.describe()} could not be traced (Python control "
                f"flow on its index arguments, a failure on 0-d ones, or torch.compile), so "
                f"the chunked backend cannot tell which learnable tensors it reads; "
                f"backend='math' differentiates it directly")
    return None


def chunked_attention(q, k, v, call, *, dropout_p: float = 0.0, scale: float,
                      return_lse: bool = False, return_weights: bool = False,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """O(T)-memory exact attention; contract in :mod:`attnkit.backends.registry`.

    The log-sum-exp it returns is differentiable (its gradient flows into q and k), and
    sinks and the score function's tensors get exact gradients.

    Args:
        call: an :class:`attnkit.spec.Call` (or a :class:`attnkit.masks.MaskSpec`).
        block_q: query rows per tile of the PyTorch implementation (not part of the
            contract; memory ~ block_q·block_k·H); the C++ kernel's tiles are 64 x 64.
        block_k: keys per block (the PyTorch implementation).

    Raises:
        ValueError: ``dropout_p > 0``, ``return_weights``, or a block size below 1.
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    reason = chunked_check(q, k, v, call, dropout_p=dropout_p, return_lse=return_lse,
                           return_weights=return_weights)
    if reason:
        raise ValueError(reason)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be >= 1, got {block_q} and {block_k}")
    prep = _kernel_plan(q, k, v, call)
    if not isinstance(prep, str):
        out, lse = _kernel.attention(q, k, v, prep, scale, call.sinks)
        return (out, lse) if return_lse else out
    # The fused tiles need one head size for q, k and v.
    fused = _fused_tiles.usable(q, call.score) and v.shape[-1] == q.shape[-1]
    lay = _Layout(q, k, call, block_q, block_k, fused=fused)
    out, lse, _ = _ChunkedAttentionFn.apply(q, k, v, lay, scale, call.sinks, *lay.params)
    return (out, lse) if return_lse else out


# Cost rule: FLOP/s of one CPU thread (float32) and overheads, from benchmarks/bench_masks.py.
CHUNKED_RATE = 16e9  # the block loop
CHUNKED_BLOCK_S = 4e-5  # Python and dispatch overhead per visited 512-key block
CHUNKED_FUSED_RATE = 30e9  # the fused tiles: torch's CPU flash kernel per tile
FUSED_TILE_S = 1e-4
CHUNKED_READ_RATE = 8e9  # bytes/s of K and V one tile streams (bench_decode.py, T=1)
CHUNKED_HALF_READ_RATE = 0.8e9  # the same for bfloat16/float16, upcast block by block


# The C++ kernel (benchmarks/bench_kernel.py, one thread of the AVX2 EPYC, visible work):
# FLOP/s by element size (float32; bfloat16/float16 tiles converted to float32 once; float64),
# Python's preparation and the call, bytes/s of K and V per 64-row query tile.
KERNEL_RATE = {4: 40e9, 2: 36e9, 8: 12e9}
KERNEL_CALL_S = 6e-5
KERNEL_READ_RATE = {4: 10e9, 2: 5e9, 8: 10e9}


def _kernel_cost(call, passes: float, itemsize: int) -> float:
    frac, _ = call.visited(_kernel.TILE, _kernel.TILE)
    tiles = -(-call.T // _kernel.TILE)
    # a short query block is bound by reading K and V: at this machine's measured rate
    rate = measured_rate("chunked_read_half" if itemsize == 2 else "chunked_read_fp32",
                         KERNEL_READ_RATE[itemsize])
    read = frac * tiles * 2.0 * call.B * call.Hkv * call.S * call.D * itemsize / rate
    compute = frac * call.flops() * passes / KERNEL_RATE[itemsize]
    return (read if read > compute else compute) + KERNEL_CALL_S * (2.0 if call.grad else 1.0)


def chunked_cost(call) -> float:
    """Estimated seconds: the visited pairs at the C++ kernel's, the fused tiles' or the
    block loop's rate, but never less than reading the visited K and V once per query tile
    (what bounds a short query block; the PyTorch loop upcasts half-precision blocks on CPU,
    which is slower still)."""
    passes = BACKWARD_FACTOR if call.grad else 1.0
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    if not (_FORCED and _FORCED[-1] == "torch") and _kernel.serves(call) is None:
        return _kernel_cost(call, passes, itemsize)
    frac, blocks = call.visited(BLOCK_Q, FINE)  # the plan's own granularity
    tiles = -(-call.T // BLOCK_Q)
    per_call = 5e-5
    # (this machine's measured rates, _rates.py; the constants are their defaults)
    rate = measured_rate("chunked_read_fp32", CHUNKED_READ_RATE) \
        if itemsize >= 4 or call.device.type != "cpu" else \
        measured_rate("chunked_read_half", CHUNKED_HALF_READ_RATE)
    read = frac * tiles * 2.0 * call.B * call.Hkv * call.S * call.D * itemsize / rate
    if _fused_tiles.usable_for(call.device, call.dtype, call.score):
        # One fused kernel call per tile over its visible span (backward: two per tile).
        compute = frac * call.flops() * passes / CHUNKED_FUSED_RATE
        return (read if read > compute else compute) \
            + tiles * FUSED_TILE_S * (2.0 if call.grad else 1.0) + per_call
    scored = 1.3 if call.score is not None else 1.0
    per_block = CHUNKED_BLOCK_S * (2.0 if call.grad else 1.0)
    compute = frac * call.flops() * passes * scored / CHUNKED_RATE
    return (read if read > compute else compute) + blocks * per_block / 8 + per_call


def _describe(q, k, v, call) -> str:
    return implementation(q, k, v, call)[1]


BACKEND = Backend("chunked", chunked_attention, chunked_check,
                  frozenset({"lse", "grad", "score_mod", "sinks"}), chunked_cost, _describe)
