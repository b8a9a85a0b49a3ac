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

from ..masks import MaskSpec
from . import _decode_ext

__all__ = ["decode_attention", "decode_rows", "decode_check", "decode_cost", "implementation",
           "MAX_QUERIES", "CAPABILITIES"]

#: The longest query block served (a decode step, a speculative verify block); longer
#: blocks are prefill, which the other backends do better.
MAX_QUERIES = 128
#: What the backend declares to the registry.
CAPABILITIES = ("lse", "score_mod", "sinks")

# Cost rule constants (one CPU thread), measured with benchmarks/bench_decode.py: KV bytes
# per second read by each implementation, and its arithmetic rate once the query block is
# long enough to be compute-bound; plus fixed costs per call and per scored element.
CPP_BYTES_RATE = 20e9
CPP_RATE = 40e9
TORCH_BYTES_RATE = 10e9
TORCH_RATE = 20e9
CALL_S = 6e-5
ROW_ELEMENT_S = 1e-9  # per (B, H, T, S) score element: masks, score functions, softmax


def implementation(device=None) -> str:
    """``"cpp"`` when the compiled kernel serves CPU calls on this machine, else ``"torch"``."""
    if device is not None and torch.device(device).type != "cpu":
        return "torch"
    return "cpp" if _decode_ext.load() is not None else "torch"


# --- the registry's contract -----------------------------------------------------------------

def decode_check(q, k, v, spec: MaskSpec, *, dropout_p: float, return_lse: bool,
                 return_weights: bool = False) -> Optional[str]:
    """None when ``decode`` can serve the call, else the reason it cannot."""
    T = q.shape[2]
    if T > MAX_QUERIES:
        return (f"decode serves short query blocks (T <= {MAX_QUERIES}: decode steps, "
                f"verify blocks), got T={T}; prefill belongs to sdpa or chunked")
    if return_weights:
        return "decode does not build the attention weights (use backend='math')"
    if dropout_p > 0:
        return f"decode has no dropout (got dropout_p={dropout_p}); it is for inference"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *spec.tensors())):
        return ("decode is not differentiable (an input requires grad); run it under "
                "torch.no_grad() or pick a backend with gradients")
    return None


def decode_cost(call) -> float:
    """Estimated seconds: the time to read K and V once (or the arithmetic, when a long
    query block makes it compute-bound), plus the per-call and per-row-element costs."""
    cpp = implementation(call.device) == "cpp"
    bytes_rate, rate = (CPP_BYTES_RATE, CPP_RATE) if cpp else (TORCH_BYTES_RATE, TORCH_RATE)
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    kv_bytes = 2.0 * call.B * call.Hkv * call.S * call.D * itemsize
    read, compute = kv_bytes / bytes_rate, call.flops() / rate
    rows = call.B * call.H * call.T * call.S * ROW_ELEMENT_S
    return (read if read > compute else compute) + rows + CALL_S


def decode_attention(q, k, v, spec: MaskSpec, *, dropout_p: float, scale: float,
                     return_lse: bool, return_weights: bool = False, impl: str | None = None):
    """The backend function (see :mod:`attnkit.backends.registry` for the contract).

    Evaluates ``spec`` on the ``T`` decode rows (mask ``(B|1, H|1, T, S)`` bool, score
    function, sinks) and runs :func:`decode_rows`.

    Raises:
        ValueError: a call :func:`decode_check` refuses.
    """
    why = decode_check(q, k, v, spec, dropout_p=dropout_p, return_lse=return_lse,
                       return_weights=return_weights)
    if why is not None:
        raise ValueError(f"backend 'decode' cannot serve this call: {why}")
    B, H, T, _ = q.shape
    S = k.shape[2]
    mod = spec.mask_mod_for(T, S)
    row_mask = None if mod is None else mod.tile(B, H, 0, T, 0, S, q.device)
    score_mod = spec.score_mod_for(T, S)
    score = None
    if score_mod is not None:
        def score(s, k0, k1):
            return score_mod.tile(s, 0, T, k0, k1)
    out, lse = decode_rows(q, k, v, scale=scale, row_mask=row_mask, score=score,
                           sinks=spec.sinks, impl=impl)
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
    impl = impl or implementation(q.device)
    if impl == "cpp" and (q.device.type != "cpu" or _decode_ext.load() is None):
        raise ValueError(f"impl='cpp' needs the compiled kernel and CPU tensors (kernel "
                         f"built: {_decode_ext.load() is not None}, device {q.device}); run "
                         f"make, or pass impl='torch'")
    if impl not in ("cpp", "torch"):
        raise ValueError(f"impl must be 'cpp', 'torch' or None, got {impl!r}")

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
    n = k1 - k0

    qg = q.to(acc).contiguous().view(B, Hkv, M, D)  # (B, Hkv, G*T, D): row g*T + t
    if impl == "cpp":
        k = k if k.stride(-1) == 1 or D <= 1 else k.contiguous()
        v = v if v.stride(-1) == 1 or D <= 1 else v.contiguous()
        s = _decode_ext.load().decode_scores(qg, k, float(scale))  # (B, Hkv, M, n)
    else:
        s = (k @ qg.to(k.dtype).transpose(-1, -2)).transpose(-1, -2).to(acc) * scale
    s4 = s.reshape(B, H, T, n)  # (B, H, T, n): a view on the cpp path
    if score is not None:
        s4 = score(s4, k0, k1).to(acc)
    if row_mask is not None:
        s4 = s4.masked_fill(~row_mask, float("-inf"))
    sink = None
    if sinks is not None:
        sink = sinks.to(acc).view(1, H, 1, 1).expand(1, H, T, 1)  # (1, H, T, 1)

    if impl == "cpp":
        s = s4.contiguous().view(B, Hkv, M, n)
        sk = (torch.empty(0, dtype=acc) if sink is None
              else sink.reshape(Hkv, M).contiguous())  # (Hkv, M): row g*T + t of kv head
        # s becomes the weights in place: keep the scores when a NaN fix-up may need them
        s_kept = s4 if s.data_ptr() != s4.data_ptr() else None
        out, lse = _decode_ext.load().decode_softmax_pv(s, v, sk)  # (B, Hkv, M, D), (B, Hkv, M)
        out, lse = out.view(B, H, T, D), lse.view(B, H, T)
    else:
        s_kept = s4
        out, lse = _softmax_pv_torch(s4, v, sink, B, Hkv, M, D)
    if bool(torch.isnan(out).any()):  # rare: only with NaN inputs (one small check)
        if s_kept is None:  # recompute the scores (the kernel overwrote them)
            s_kept = decode_rows_scores(qg, k, v, scale, score, row_mask, k0, k1, B, H, T)
        out = _hidden_nan_fixup(out, s_kept, v, sink, B, Hkv, M, D)
    return out.to(q.dtype), lse


def decode_rows_scores(qg, k, v, scale, score, row_mask, k0, k1, B, H, T):
    """The masked, scored scores ``(B, H, T, n)`` on the torch path (for the NaN fix-up)."""
    acc = qg.dtype
    s4 = (k.to(acc) @ qg.transpose(-1, -2)).transpose(-1, -2) * scale  # (B, Hkv, M, n)
    s4 = s4.reshape(B, H, T, -1)
    if score is not None:
        s4 = score(s4, k0, k1).to(acc)
    return s4 if row_mask is None else s4.masked_fill(~row_mask, float("-inf"))


def _hidden_nan_fixup(out, s4, v, sink, B, Hkv, M, D):
    """Rows whose output is NaN only because a *hidden* key's value is NaN (weight 0 times
    NaN) get their exact value; rows that see a NaN value stay NaN. Reads V a few times: it
    runs only when an output row is NaN."""
    B, H, T, n = s4.shape
    v_nan = torch.isnan(v).any(-1)  # (B, Hkv, n)
    if not bool(v_nan.any()):
        return out
    clean = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    fixed, _ = _softmax_pv_torch(s4, clean, sink, B, Hkv, M, D)  # (B, H, T, D)
    visible = ~torch.isneginf(s4)  # (B, H, T, n): NaN scores count as visible
    sees_nan = (visible.view(B, Hkv, M, n) & v_nan.unsqueeze(2)).any(-1).view(B, H, T, 1)
    row_nan = torch.isnan(s4).any(-1, keepdim=True)  # a NaN query or visible NaN key
    return fixed.to(out.dtype).masked_fill(sees_nan | row_nan, float("nan"))


def _softmax_pv_torch(s4: Tensor, v: Tensor, sink: Tensor | None, B, Hkv, M, D):
    """Safe softmax over ``s4 (B, H, T, n)`` (sinks join the denominator), then ``p v`` per
    kv head; rows that see no key are zeros with ``lse = -inf`` (or the sink)."""
    B, H, T, n = s4.shape
    mx = s4.amax(-1, keepdim=True) if n else torch.full((B, H, T, 1), float("-inf"),
                                                         dtype=s4.dtype, device=s4.device)
    sees_none = torch.isneginf(mx)  # (B, H, T, 1): every score -inf (amax keeps NaN)
    if sink is not None:
        mx = torch.maximum(mx, sink)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s4 - ref)  # (B, H, T, n)
    total = e.sum(-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - ref)
    p = e / torch.where(total > 0, total, torch.ones_like(total))
    lse = (ref + torch.log(total)).squeeze(-1)  # (B, H, T)
    out = p.view(B, Hkv, M, n).to(v.dtype) @ v  # (B, Hkv, M, D)
    out = out.view(B, H, T, D).masked_fill(sees_none, 0.0)
    return out, lse
