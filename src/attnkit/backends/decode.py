"""The ``decode`` backend: short query blocks over long key/value caches, at memory bandwidth.

A decode step (or a speculative/verify block of a few tokens) does almost no arithmetic per
byte of cache: its time is the time to read K and V once. So this backend

* groups the query heads per key/value head, ``q (B, H, T, D) -> (B, Hkv, G*T, D)`` with
  ``G = H // Hkv``: each kv head is read once for all of its ``G*T`` query rows (SDPA with
  ``enable_gqa`` and the other backends repeat K and V per query head);
* reads bfloat16/float16 caches as they are and accumulates in float32 (float64 inputs in
  float64);
* reads only the keys some row can see: the caller passes the filled part of a static cache
  as a view (``k[:, :, :filled]`` of a ``(B, Hkv, max_len, D)`` buffer, attnkit's
  :class:`~attnkit.KVCache` and transformers' ``StaticCache`` layout; no copy), and a mask
  that hides a leading or trailing span (a sliding window) trims it further;
* serves every mask and score kind by evaluating the description on the ``T`` decode rows
  only (``mask_mod.tile`` and ``score_mod.tile`` on ``T x S``, small when ``T`` is small),
  plus attention sinks.

Two passes, each reading one cache tensor once: scores ``s = scale * q kᵀ`` (``B, Hkv, G*T,
S``), then the mask and score functions on ``s``, then softmax and ``p v``. Two
implementations with the same tests:

* ``"cpp"``: ``_decode_kernel.cpp``, built by ``make`` (see :mod:`._decode_ext`): fused
  loops over the cache split across threads (split-KV); the softmax's row max and sum are
  global before the value pass, so the splits' partial outputs merge by a plain sum (the
  log-sum-exp merge with one shared reference point);
* ``"torch"``: plain PyTorch, grouped matmuls (``k @ qᵀ``, then ``p @ v``), used when the
  kernel is not built, for non-CPU tensors, or with ``ATTNKIT_DECODE_IMPL=torch``.

NaN and empty rows (the rule of :mod:`._edges`, by construction, at every size): a NaN in a
query row or in a visible key makes the row's scores NaN and the row NaN (also when all of
them are NaN); a NaN value reaches every row whose key span covers it; a row that sees no key
is zeros with ``lse = -inf``.

Not differentiable (no ``grad`` capability: training runs on the other backends), no dropout,
no weights. ``return_lse`` is served.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``,
``T`` queries, ``M = G*T`` query rows per kv head, ``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from ..masks import Window
from . import _decode_ext
from .registry import Backend, as_call

__all__ = ["decode_attention", "decode_rows", "decode_check", "decode_cost", "implementation",
           "MAX_QUERIES", "CAPABILITIES"]

#: The longest query block served (a decode step, a speculative verify block); longer
#: blocks are prefill, which the other backends do better.
MAX_QUERIES = 128
#: What the backend declares to the registry.
CAPABILITIES = ("lse", "score_mod", "sinks")

# Cost rule constants (one CPU thread), measured with benchmarks/bench_decode.py at KV depth
# 32k (docs/engine.md): KV bytes per second each implementation reads, by element size (the
# torch path's bfloat16 matmuls are slower than its float32 ones), and its arithmetic rate
# once a long query block makes it compute-bound; fixed costs per call and per score element.
BYTES_RATE = {("cpp", 2): 15e9, ("cpp", 4): 10e9, ("torch", 2): 9e9, ("torch", 4): 15e9,
              ("torch", 8): 5e9, ("cpp", 8): 2e9}
FLOP_RATE = {"cpp": 60e9, "torch": 60e9}
CALL_S = 6e-5
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
ROW_ELEMENT_S = 2e-9  # per (B, H, T, S) score element: masks, score functions, softmax


def kernel_built() -> bool:
    """Whether the compiled kernel is built for this machine and loads."""
    return _decode_ext.load() is not None


def implementation(device=None, dtype=None) -> str:
    """Which implementation serves a call on ``device`` in ``dtype`` by default.

    ``"cpp"`` for bfloat16/float16 CPU tensors when the kernel is built: it reads the half
    cache as is (torch's matmuls are slower there). ``"torch"`` otherwise: for float32 the
    grouped matmuls through MKL measured faster than the kernel on this project's CPU
    (docs/engine.md), float64 is for tests, and other devices have no kernel.
    ``ATTNKIT_DECODE_IMPL=torch`` or ``=cpp`` (CPU, kernel built) overrides the choice.
    """
    if device is not None and torch.device(device).type != "cpu":
        return "torch"
    forced = os.environ.get("ATTNKIT_DECODE_IMPL", "")
    if not kernel_built() or forced == "torch":
        return "torch"
    if forced == "cpp":
        return "cpp"
    if dtype is None:
        return "cpp"
    return "cpp" if dtype in _KERNEL_DTYPES else "torch"


# --- the registry's contract -----------------------------------------------------------------

def decode_check(q, k, v, call, *, dropout_p: float, return_lse: bool,
                 return_weights: bool = False) -> Optional[str]:
    """None when ``decode`` can serve the call, else the reason it cannot."""
    T = q.shape[2]
    if torch.compiler.is_compiling():
        return ("decode runs eagerly (it reads which keys are visible and whether a NaN "
                "appeared from the tensors, and calls a compiled kernel); under "
                "torch.compile the other backends serve")
    if T > MAX_QUERIES:
        return (f"decode serves short query blocks (T <= {MAX_QUERIES}: decode steps, "
                f"verify blocks), got T={T}; prefill belongs to sdpa or chunked")
    if return_weights:
        return "decode does not build the attention weights (use backend='math')"
    if dropout_p > 0:
        return f"decode has no dropout (got dropout_p={dropout_p}); it is for inference"
    if as_call(q, k, v, call).grad:
        return ("decode is not differentiable (an input requires grad); run it under "
                "torch.no_grad() or pick a backend with gradients")
    return None


def decode_cost(call) -> float:
    """Estimated seconds: the time to read K and V once (or the arithmetic, when a long
    query block makes it compute-bound), plus the per-call and per-row-element costs."""
    impl = implementation(call.device, call.dtype)
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    S = call.S
    mask = call.mask
    if isinstance(mask, Window) and mask.left is not None:  # only the window's span is read
        S = min(S, mask.left + call.T + (mask.right or 0))
    kv_bytes = 2.0 * call.B * call.Hkv * S * call.D * itemsize
    read = kv_bytes / BYTES_RATE.get((impl, itemsize), 5e9)
    compute = call.flops() / FLOP_RATE[impl]
    rows = call.B * call.H * call.T * call.S * ROW_ELEMENT_S
    return (read if read > compute else compute) + rows + CALL_S


def decode_attention(q, k, v, call, *, dropout_p: float, scale: float,
                     return_lse: bool, return_weights: bool = False, impl: str | None = None):
    """The backend function (see :mod:`attnkit.backends.registry` for the contract).

    Evaluates the call's lowered mask on the ``T`` decode rows (``(B|1, H|1, T, S)`` bool),
    its score function and sinks, and runs :func:`decode_rows`.

    Raises:
        ValueError: a call :func:`decode_check` refuses.
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    why = decode_check(q, k, v, call, dropout_p=dropout_p, return_lse=return_lse,
                       return_weights=return_weights)
    if why is not None:
        raise ValueError(f"backend 'decode' cannot serve this call: {why}")
    B, H, T, _ = q.shape
    S = k.shape[2]
    mod = call.mask
    row_mask = None if mod is None else mod.tile(B, H, 0, T, 0, S, q.device)
    score_mod = call.score
    score = None
    if score_mod is not None:
        def score(s, k0, k1):
            return score_mod.tile(s, 0, T, k0, k1)
    out, lse = decode_rows(q, k, v, scale=scale, row_mask=row_mask, score=score,
                           sinks=call.sinks, impl=impl)
    return (out, lse) if return_lse else out


# --- the kernel: plain tensors, a row mask, a score callable -----------------------------------

def decode_rows(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                row_mask: Tensor | None = None,
                score: Callable[[Tensor, int, int], Tensor] | None = None,
                sinks: Tensor | None = None, impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Attention of a short query block over a long cache.

    Args:
        q: ``(B, H, T, D)``.
        k, v: ``(B, Hkv, S, D)``, any strides (views of a larger cache buffer are read in
            place when the head dim is contiguous).
        scale: score multiplier.
        row_mask: bool broadcastable to ``(B, H, T, S)``, True = may attend; None = all.
        score: ``score(s, k0, k1) -> s`` applied to the scaled scores ``s (B, H, T, k1-k0)``
            of keys ``k0:k1`` before the mask (a score description's ``tile``).
        sinks: ``(H,)`` logits joining every row's softmax denominator, or None.
        impl: ``"cpp"``, ``"torch"`` or None (:func:`implementation`'s choice).

    Returns:
        ``(out (B, H, T, D)`` in q's dtype, ``lse (B, H, T)`` float32, float64 for float64).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, M = H // Hkv, (H // Hkv) * T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    impl = impl or implementation(q.device, q.dtype)
    if impl not in ("cpp", "torch"):
        raise ValueError(f"impl must be 'cpp', 'torch' or None, got {impl!r}")
    if impl == "cpp" and (q.device.type != "cpu" or not kernel_built()):
        raise ValueError(f"impl='cpp' needs the compiled kernel and CPU tensors (kernel "
                         f"built: {kernel_built()}, device {q.device}); run make, or pass "
                         f"impl='torch'")

    # Trim the keys no row can see (a sliding window over a long cache reads only its span).
    k0, k1 = 0, S
    if row_mask is not None:
        if row_mask.dim() < 4:
            row_mask = row_mask.reshape((1,) * (4 - row_mask.dim()) + tuple(row_mask.shape))
        seen = row_mask.reshape(-1, row_mask.shape[-1]).any(0)  # (S|1,)
        if seen.shape[0] == S and S > 0:
            idx = seen.nonzero()
            k0, k1 = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0)
            if (k0, k1) != (0, S):
                row_mask = row_mask[..., k0:k1]
                k, v = k[:, :, k0:k1], v[:, :, k0:k1]
        if bool(row_mask.all()):
            row_mask = None

    qg = q.to(acc).contiguous().view(B, Hkv, M, D)  # (B, Hkv, G*T, D): row g*T + t
    # Scores key-major, (B, Hkv, n, M): the M rows of one key side by side (the kernel's
    # layout, and what k @ qᵀ gives the torch path without a copy).
    if impl == "cpp":
        k = k if k.stride(-1) == 1 or D <= 1 else k.contiguous()
        v = v if v.stride(-1) == 1 or D <= 1 else v.contiguous()
        s = _decode_ext.load().decode_scores(qg, k, float(scale))  # (B, Hkv, n, M)
    else:
        s = _scores_torch(qg, k, scale)
    _apply_rows(s, row_mask, score, k0, k1, B, H, Hkv, G, T)
    sink = None
    if sinks is not None:
        sink = sinks.to(acc).view(Hkv, G, 1).expand(Hkv, G, T).reshape(Hkv, M)  # (Hkv, M)

    if impl == "cpp":
        sk = torch.empty(0, dtype=acc) if sink is None else sink.contiguous()
        out, lse = _decode_ext.load().decode_softmax_pv(s, v, sk)  # overwrites s (weights)
    else:
        out, lse = _softmax_pv_torch(s, v, sink)
    if bool(torch.isnan(out).any()):  # rare: only with NaN inputs (one small check)
        s = _scores_torch(qg, k, scale)  # the softmax overwrote the scores
        _apply_rows(s, row_mask, score, k0, k1, B, H, Hkv, G, T)
        out = _hidden_nan_fixup(out, s, v, sink)
    return out.view(B, H, T, D).to(q.dtype), lse.view(B, H, T)


def _scores_torch(qg: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale * k @ qᵀ``: ``(B, Hkv, n, M)`` in q's (accumulation) dtype."""
    s = k @ qg.to(k.dtype).transpose(-1, -2)  # (B, Hkv, n, M)
    return s.to(qg.dtype).mul_(scale) if s.dtype != qg.dtype else s.mul_(scale)


def _apply_rows(s: Tensor, row_mask, score, k0: int, k1: int, B, H, Hkv, G, T) -> None:
    """Score function and mask, in place on ``s (B, Hkv, n, M)`` through a ``(B, Hkv, G, T,
    n)`` view (the descriptions speak ``(B, H, T, n)``)."""
    n = s.shape[2]
    s5 = s.view(B, Hkv, n, G, T).permute(0, 1, 3, 4, 2)  # (B, Hkv, G, T, n), a view
    if score is not None:
        scored = score(s5.reshape(B, H, T, n), k0, k1)  # (B, H, T, n)
        s5.copy_(scored.expand(B, H, T, n).reshape(B, Hkv, G, T, n))
    if row_mask is not None:
        Bm, Hm = row_mask.shape[:2]
        m5 = row_mask.reshape(Bm, Hkv, G, *row_mask.shape[2:]) if Hm == H else \
            row_mask.reshape(Bm, 1, 1, *row_mask.shape[2:])  # (B|1, Hkv|1, G|1, T|1, n)
        s5.masked_fill_(~m5, float("-inf"))


def _softmax_pv_torch(s: Tensor, v: Tensor, sink: Tensor | None):
    """Safe softmax over the keys of ``s (B, Hkv, n, M)`` (sinks ``(Hkv, M)`` join the
    denominator; ``s`` is overwritten with the unnormalised weights), then ``p v``,
    normalised after the matmul. Returns ``out (B, Hkv, M, D)``
    and ``lse (B, Hkv, M)``; rows that see no key are zeros with ``lse = -inf`` (or the
    sink's logit)."""
    B, Hkv, n, M = s.shape
    if n:  # (B, Hkv, 1, M); NaN stays NaN. Over a key-major copy: amax over dim -2 with a
        # short inner dim measured 9x slower than the copy plus a last-dim amax
        mx = s.transpose(-1, -2).contiguous().amax(-1).unsqueeze(-2)
    else:
        mx = torch.full((B, Hkv, 1, M), float("-inf"), dtype=s.dtype, device=s.device)
    sees_none = torch.isneginf(mx)  # every score -inf
    if sink is not None:
        mx = torch.maximum(mx, sink.view(1, Hkv, 1, M))
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = s.sub_(ref).exp_()  # (B, Hkv, n, M), in place: s becomes the weights
    total = e.sum(-2, keepdim=True)  # (B, Hkv, 1, M)
    if sink is not None:
        total = total + torch.exp(sink.view(1, Hkv, 1, M) - ref)
    lse = (ref + torch.log(total)).view(B, Hkv, M)
    out = e.transpose(-1, -2).to(v.dtype) @ v  # (B, Hkv, M, D), unnormalised
    total = torch.where(total > 0, total, torch.ones_like(total)).transpose(-1, -2)
    out = (out.to(total.dtype) / total).masked_fill(sees_none.transpose(-1, -2), 0.0)
    return out, lse


def _hidden_nan_fixup(out: Tensor, s: Tensor, v: Tensor, sink: Tensor | None) -> Tensor:
    """Rows whose output is NaN only because a *hidden* key's value is NaN (weight 0 times
    NaN) get their exact value; rows that see a NaN (score or value) stay NaN. Reads V a few
    times: it runs only when an output row is NaN. ``s (B, Hkv, n, M)`` are the masked
    scores, ``out (B, Hkv, M, D)``."""
    v_nan = torch.isnan(v).any(-1)  # (B, Hkv, n)
    if not bool(v_nan.any()):
        return out
    visible = ~torch.isneginf(s)  # (B, Hkv, n, M): NaN scores count as visible
    sees_nan = (visible & v_nan.unsqueeze(-1)).any(-2)  # (B, Hkv, M)
    row_nan = torch.isnan(s).any(-2)  # a NaN query or visible NaN key
    clean = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    fixed, _ = _softmax_pv_torch(s, clean, sink)  # (B, Hkv, M, D); overwrites s
    return fixed.to(out.dtype).masked_fill((sees_nan | row_nan).unsqueeze(-1), float("nan"))


BACKEND = Backend("decode", decode_attention, decode_check, frozenset(CAPABILITIES),
                  decode_cost)
