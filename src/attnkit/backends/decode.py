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
* serves every mask and score kind.

Two implementations with the same tests:

* ``"cpp"``: ``_decode_kernel.cpp``, built for the CPU's target by ``make`` or when a
  decode call first runs (:mod:`._decode_ext`). Calls whose mask is a key interval per query (no mask, causal at
  any offset, sliding windows) and whose scores are plain, softcapped and/or ALiBi (sinks
  allowed) run in **one pass** over K and V (``decode_fused``: online softmax, each row's
  interval applied in the kernel, split-KV over threads). Every other mask and score kind
  runs in **two passes** (``decode_scores``, the description evaluated on the ``T x S``
  scores in PyTorch, ``decode_softmax_pv``);
* ``"torch"``: plain PyTorch, grouped matmuls (``q kᵀ``, then ``p v``) with the same two
  passes; for non-CPU tensors, float64 by default, when the kernel cannot be built, or with
  ``ATTNKIT_DECODE_IMPL=torch``.

NaN and empty rows (the rule of :mod:`._edges`, by construction, at every size): a NaN in a
query row or in a visible key makes the row's scores NaN and the row NaN (also when all of
them are NaN); a NaN value reaches every row whose key span covers it; a row that sees no key
is zeros with ``lse = -inf``.

Not differentiable (no ``grad`` capability: training runs on the other backends), no dropout,
no weights. ``return_lse`` is served.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``,
``T`` queries, ``M = G*T`` query rows per kv head, ``S`` keys, ``D`` head dim of q and k,
``Dv`` head dim of v.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from ..masks import Window
from ..scores import Alibi, Chain, Softcap
from . import _decode_ext, _ext
from ._rates import rate
from .registry import Backend, as_call, watch_environment

__all__ = ["decode_attention", "decode_rows", "decode_spans", "decode_check", "decode_cost",
           "implementation", "fused_plan", "MAX_QUERIES", "CAPABILITIES"]

#: The longest query block served (a decode step, a speculative verify block); longer
#: blocks are prefill, which the other backends do better.
MAX_QUERIES = 128
#: What the backend declares to the registry.
CAPABILITIES = ("lse", "score_mod", "sinks")

# Cost rule: the default rates (one CPU thread) that _rates.py replaces with this machine's
# measured ones: bytes per second each implementation reads K and V at in a decode step, by
# cache dtype, and its arithmetic rate once a long query block makes it compute-bound; fixed
# costs per call and per score element the description is evaluated on (two-pass path).
READ_RATE = {("cpp", 2): 12e9, ("cpp", 4): 12e9, ("cpp", 8): 4e9,
             ("torch", 2): 3e9, ("torch", 4): 8e9, ("torch", 8): 4e9}
FLOP_RATE = {"cpp": 60e9, "torch": 40e9}
CALL_S = 3e-5
ROW_ELEMENT_S = 2e-9  # per (B, H, T, S) score element: masks, score functions, softmax
_DTYPE_NAMES = {2: "half", 4: "fp32", 8: "fp64"}
watch_environment("ATTNKIT_DECODE_IMPL")  # implementation() reads it: auto's cached choices too


def kernel_built() -> bool:
    """Whether the compiled kernel is built for this machine's target and loads (built
    here on first use when it is missing)."""
    return _decode_ext.load() is not None


def _kernel_expected() -> bool:
    """Whether the kernel is loaded or will be built on first use, without building it: a
    cost rule asks this, so pricing a call never compiles anything."""
    return _ext.status(_ext.DECODE).impl == "cpp"


def implementation(device=None, dtype=None) -> str:
    """Which implementation serves a call on ``device`` in ``dtype`` by default.

    ``"cpp"`` for float32/bfloat16/float16 CPU tensors when the kernel is built (it reads the
    cache at close to the machine's read rate; docs/engine.md), ``"torch"`` otherwise:
    float64 is for tests, other devices have no kernel. ``ATTNKIT_DECODE_IMPL=torch`` or
    ``=cpp`` (CPU, kernel built) overrides the choice.
    """
    if device is not None and torch.device(device).type != "cpu":
        return "torch"
    forced = os.environ.get("ATTNKIT_DECODE_IMPL", "")
    if forced == "torch" or not _kernel_expected():
        return "torch"
    if forced == "cpp" or dtype is None:
        return "cpp"
    return "torch" if dtype == torch.float64 else "cpp"


def describe(call) -> str:
    """One line for ``explain()``: which implementation runs this call and why."""
    impl = implementation(call.device, call.dtype)
    if impl == "torch":
        if call.device.type != "cpu":
            return f"PyTorch (no kernel for {call.device.type} tensors)"
        if os.environ.get("ATTNKIT_DECODE_IMPL", "") == "torch":
            why = "ATTNKIT_DECODE_IMPL=torch"
        else:
            why = "float64 runs in PyTorch" if kernel_built() else _decode_ext.implementation()
        return f"PyTorch ({why})"
    passes = ("one pass over K and V (key intervals and score functions in the kernel)"
              if fused_plan(call) is not None else
              "two passes (the description applied to the scores in PyTorch between them)")
    return f"the {_decode_ext.implementation()}, {passes}"


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
    """Estimated seconds: the time to read K and V once at this machine's measured rate for
    the implementation and dtype (or the arithmetic at its measured rate, when a long query
    block makes it compute-bound), plus the per-call cost and, on the two-pass path, a cost
    per score element."""
    impl = implementation(call.device, call.dtype)
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    S = call.S
    mask = call.mask
    if isinstance(mask, Window) and mask.left is not None:  # only the window's span is read
        S = min(S, mask.left + call.T + (mask.right or 0))
    kv_bytes = call.B * call.Hkv * S * (call.D + _dv(call)) * itemsize
    name = _DTYPE_NAMES.get(itemsize, "fp32")
    read = kv_bytes / rate(f"decode_{impl}_read_{name}", READ_RATE.get((impl, itemsize), 4e9))
    compute = call.flops() / rate(f"decode_{impl}_flops", FLOP_RATE[impl])
    rows = 0.0 if impl == "cpp" and fused_plan(call) is not None else \
        call.B * call.H * call.T * call.S * ROW_ELEMENT_S
    return (read if read > compute else compute) + rows + CALL_S


def _dv(call) -> int:
    return getattr(call, "Dv", call.D)


def decode_attention(q, k, v, call, *, dropout_p: float, scale: float,
                     return_lse: bool, return_weights: bool = False, impl: str | None = None):
    """The backend function (see :mod:`attnkit.backends.registry` for the contract).

    On the kernel, a call :func:`fused_plan` recognises runs :func:`decode_spans`; every
    other call evaluates its lowered mask on the ``T`` decode rows (``(B|1, H|1, T, S)``
    bool) and its score function, and runs :func:`decode_rows`.

    Raises:
        ValueError: a call :func:`decode_check` refuses; an unknown ``impl``.
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    why = decode_check(q, k, v, call, dropout_p=dropout_p, return_lse=return_lse,
                       return_weights=return_weights)
    if why is not None:
        raise ValueError(f"backend 'decode' cannot serve this call: {why}")
    impl = _check_impl(impl or _default_impl(q), q)
    plan = fused_plan(call) if impl == "cpp" else None
    if plan is not None:
        out, lse = decode_spans(q, k, v, scale=scale, sinks=call.sinks, **plan)
        return (out, lse) if return_lse else out
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


def _default_impl(q: Tensor) -> str:
    """The default implementation, the kernel built now if it is still to be built; a build
    that fails (said on stderr once) leaves the PyTorch implementation."""
    impl = implementation(q.device, q.dtype)
    return "cpp" if impl == "cpp" and kernel_built() else "torch"


def _check_impl(impl: str, q: Tensor) -> str:
    if impl not in ("cpp", "torch"):
        raise ValueError(f"impl must be 'cpp', 'torch' or None, got {impl!r}")
    if impl == "cpp" and (q.device.type != "cpu" or not kernel_built()):
        raise ValueError(f"impl='cpp' needs the compiled kernel and CPU tensors (kernel "
                         f"built: {kernel_built()}, device {q.device}); "
                         f"{_decode_ext.implementation()}; or pass impl='torch'")
    return impl


# --- the one-pass path: key intervals and known score functions in the kernel --------------

def fused_plan(call) -> dict | None:
    """The kernel's one-pass form of a lowered call, or None when it needs two passes.

    Recognised: no mask, or a :class:`~attnkit.masks.Window` (causal at any offset, sliding
    windows; one key interval ``[lo_t, hi_t)`` per query), and scores that are plain,
    :class:`~attnkit.scores.Softcap`, :class:`~attnkit.scores.Alibi` or softcap then ALiBi.
    Returns :func:`decode_spans`' keyword arguments (``lo``, ``hi``, ``softcap``, ``alibi``).
    """
    T, S = call.T, call.S
    mod = call.mask
    if mod is None:
        lo, hi = [0] * T, [S] * T
    elif isinstance(mod, Window):  # Causal is a Window
        o = mod.offset or 0
        lo = [0 if mod.left is None else t + o - mod.left for t in range(T)]
        hi = [S if mod.right is None else t + o + mod.right + 1 for t in range(T)]
    else:
        return None
    parts = () if call.score is None else \
        call.score.parts if isinstance(call.score, Chain) else (call.score,)
    kinds = tuple(type(p) for p in parts)
    if kinds not in ((), (Softcap,), (Alibi,), (Softcap, Alibi)):
        return None
    softcap = parts[0].cap if kinds[:1] == (Softcap,) else None
    alibi = parts[-1] if kinds[-1:] == (Alibi,) else None
    return {"lo": lo, "hi": hi, "softcap": softcap,
            "alibi": None if alibi is None else (alibi.slopes, alibi.offset or 0)}


def decode_spans(q: Tensor, k: Tensor, v: Tensor, *, scale: float, lo: list, hi: list,
                 softcap: float | None = None, alibi: tuple | None = None,
                 sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One pass over the cache in the compiled kernel: query ``t`` sees keys
    ``lo[t] <= j < hi[t]``.

    Args:
        q: ``(B, H, T, D)``; k: ``(B, Hkv, S, D)``; v: ``(B, Hkv, S, Dv)``, CPU, any
            strides (a contiguous head dim is read in place).
        scale: score multiplier.
        lo, hi: ``T`` ints each (clamped to ``[0, S]``).
        softcap: ``c`` for ``c * tanh(s / c)``, applied first, or None.
        alibi: ``(slopes (H,), offset)``: ``s - slopes[h] * |t + offset - j|``, or None.
        sinks: ``(H,)`` logits joining every row's softmax denominator, or None.

    Returns:
        ``(out (B, H, T, Dv)`` in q's dtype, ``lse (B, H, T)`` float32 (float64 for
        float64)).
    """
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).contiguous().view(B, Hkv, (H // Hkv) * T, D)  # (B, Hkv, G*T, D)
    k = k if k.stride(-1) == 1 or D <= 1 else k.contiguous()
    v = v if v.stride(-1) == 1 or Dv <= 1 else v.contiguous()
    none = torch.empty(0, dtype=acc)
    slopes, offset = (none, 0.0) if alibi is None else \
        (alibi[0].to(acc).contiguous(), float(alibi[1]))
    sink = none if sinks is None else sinks.to(acc).contiguous()
    out, lse = _decode_ext.load().decode_fused(qg, k, v, [int(x) for x in lo],
                                               [int(x) for x in hi], float(scale),
                                               float(softcap or 0.0), slopes, offset, sink)
    return out.view(B, H, T, Dv).to(q.dtype), lse.view(B, H, T)  # (B, Hkv, G*T, Dv) -> ...


# --- the two-pass path: plain tensors, a row mask, a score callable -------------------------

def decode_rows(q: Tensor, k: Tensor, v: Tensor, *, scale: float,
                row_mask: Tensor | None = None,
                score: Callable[[Tensor, int, int], Tensor] | None = None,
                sinks: Tensor | None = None, impl: str | None = None) -> tuple[Tensor, Tensor]:
    """Attention of a short query block over a long cache, in two passes.

    Args:
        q: ``(B, H, T, D)``.
        k: ``(B, Hkv, S, D)``; v: ``(B, Hkv, S, Dv)``; any strides (views of a larger cache
            buffer are read in place when the head dim is contiguous).
        scale: score multiplier.
        row_mask: bool broadcastable to ``(B, H, T, S)``, True = may attend; None = all.
        score: ``score(s, k0, k1) -> s`` applied to the scaled scores ``s (B, H, T, k1-k0)``
            of keys ``k0:k1`` before the mask (a score description's ``tile``); it may
            return its input.
        sinks: ``(H,)`` logits joining every row's softmax denominator, or None.
        impl: ``"cpp"``, ``"torch"`` or None (:func:`implementation`'s choice).

    Returns:
        ``(out (B, H, T, Dv)`` in q's dtype, ``lse (B, H, T)`` float32, float64 for float64).

    Raises:
        ValueError: an unknown ``impl``, or ``"cpp"`` without the kernel or on another device.
    """
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    M = (H // Hkv) * T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    impl = _check_impl(impl or _default_impl(q), q)

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
    if impl == "cpp":
        k = k if k.stride(-1) == 1 or D <= 1 else k.contiguous()
        v = v if v.stride(-1) == 1 or Dv <= 1 else v.contiguous()
        s = _decode_ext.load().decode_scores(qg, k, float(scale))  # (B, Hkv, M, n)
    else:
        s = _scores_torch(qg, k, scale)  # (B, Hkv, M, n)
    _apply_rows(s, row_mask, score, k0, k1, B, H, T)
    if impl == "cpp":
        sink = torch.empty(0, dtype=acc) if sinks is None else sinks.to(acc).contiguous()
        out, lse = _decode_ext.load().decode_softmax_pv(s, v, T, sink)
    else:
        out, lse = _softmax_pv_torch(s, v, _sink_rows(sinks, Hkv, T, acc))
    if bool(torch.isnan(out).any()):  # rare: only with NaN inputs (one small check)
        out = _hidden_nan_fixup(out, s, v, _sink_rows(sinks, Hkv, T, acc))
    return out.view(B, H, T, Dv).to(q.dtype), lse.view(B, H, T)  # (B, Hkv, M, Dv) -> ...


def _sink_rows(sinks: Tensor | None, Hkv: int, T: int, acc) -> Tensor | None:
    """``(Hkv, M)``: each row's sink logit (row ``g*T + t`` of kv head ``h`` is query head
    ``h*G + g``)."""
    if sinks is None:
        return None
    G = sinks.shape[0] // Hkv
    return sinks.to(acc).view(Hkv, G, 1).expand(Hkv, G, T).reshape(Hkv, G * T)


def _scores_torch(qg: Tensor, k: Tensor, scale: float) -> Tensor:
    """``scale * q kᵀ``: ``(B, Hkv, M, n)`` contiguous, in q's (accumulation) dtype."""
    # k @ qᵀ reads k in its own layout (q @ kᵀ measured ~2x slower in float32)
    s = k @ qg.to(k.dtype).transpose(-1, -2)  # (B, Hkv, n, M)
    rows = s.transpose(-1, -2)  # (B, Hkv, M, n), a view
    return torch.empty(rows.shape, dtype=qg.dtype, device=qg.device).copy_(rows).mul_(scale)


def _apply_rows(s: Tensor, row_mask, score, k0: int, k1: int, B, H, T) -> None:
    """Score function and mask, in place on ``s (B, Hkv, M, n)`` through its
    ``(B, H, T, n)`` view (the descriptions speak ``(B, H, T, n)``)."""
    n = s.shape[-1]
    s4 = s.view(B, H, T, n)  # (B, Hkv, G*T, n) -> (B, H, T, n), a view
    if score is not None:
        scored = score(s4, k0, k1)  # (B, H, T, n) or broadcastable
        if not _same_view(scored, s4):
            if scored.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
                scored = scored.clone()  # a view of s itself: copy before writing over it
            s4.copy_(scored.expand(B, H, T, n))
    if row_mask is not None:
        s4.masked_fill_(~row_mask, float("-inf"))  # (B|1, H|1, T, n) broadcasts


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype)


def _softmax_pv_torch(s: Tensor, v: Tensor, sink: Tensor | None):
    """Safe softmax over the keys of ``s (B, Hkv, M, n)`` (sinks ``(Hkv, M)`` join the
    denominator), then ``p v``, normalised after the matmul. Returns ``out (B, Hkv, M, Dv)``
    and ``lse (B, Hkv, M)``; rows that see no key are zeros with ``lse = -inf`` (or the
    sink's logit). ``s`` is left as it was."""
    B, Hkv, M, n = s.shape
    if n:
        mx = s.amax(-1, keepdim=True)  # (B, Hkv, M, 1); NaN stays NaN
    else:
        mx = torch.full((B, Hkv, M, 1), float("-inf"), dtype=s.dtype, device=s.device)
    sees_none = torch.isneginf(mx)  # every score -inf
    if sink is not None:
        mx = torch.maximum(mx, sink.view(1, Hkv, M, 1))
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = (s - ref).exp_()  # (B, Hkv, M, n)
    total = e.sum(-1, keepdim=True)  # (B, Hkv, M, 1)
    if sink is not None:
        total = total + torch.exp(sink.view(1, Hkv, M, 1) - ref)
    lse = (ref + torch.log(total)).view(B, Hkv, M)
    if v.dtype != e.dtype:  # half weights key-major: a row-major left operand measured 14x
        # slower in bfloat16 matmuls on an AVX2 CPU
        keys = torch.empty((B, Hkv, e.shape[-1], M), dtype=v.dtype, device=v.device)
        e = keys.copy_(e.transpose(-1, -2)).transpose(-1, -2)  # (B, Hkv, M, n), a view
    out = e @ v  # (B, Hkv, M, Dv), unnormalised
    total = torch.where(total > 0, total, torch.ones_like(total))
    out = (out.to(total.dtype) / total).masked_fill(sees_none, 0.0)
    return out, lse


def _hidden_nan_fixup(out: Tensor, s: Tensor, v: Tensor, sink: Tensor | None) -> Tensor:
    """Rows whose output is NaN only because a *hidden* key's value is NaN (weight 0 times
    NaN) get their exact value; rows that see a NaN (score or value) stay NaN. Reads V a few
    times: it runs only when an output row is NaN. ``s (B, Hkv, M, n)`` are the masked
    scores, ``out (B, Hkv, M, Dv)``."""
    v_nan = torch.isnan(v).any(-1)  # (B, Hkv, n)
    if not bool(v_nan.any()):
        return out
    visible = ~torch.isneginf(s)  # (B, Hkv, M, n): NaN scores count as visible
    sees_nan = (visible & v_nan.unsqueeze(-2)).any(-1)  # (B, Hkv, M)
    row_nan = torch.isnan(s).any(-1)  # a NaN query or visible NaN key
    clean = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    fixed, _ = _softmax_pv_torch(s, clean, sink)  # (B, Hkv, M, Dv)
    return fixed.to(out.dtype).masked_fill((sees_nan | row_nan).unsqueeze(-1), float("nan"))


def _implementation(q, k, v, call) -> str:
    return describe(call)


BACKEND = Backend("decode", decode_attention, decode_check, frozenset(CAPABILITIES),
                  decode_cost, _implementation)
