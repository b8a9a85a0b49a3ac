"""``attnkit.attention``: one call, every mask, any backend.

This module validates the call, turns the mask arguments into a :class:`MaskSpec` and hands
it to a backend from the registry. ``backend="auto"`` picks by the rules in
:func:`_auto_order`; :func:`explain` says which backend ``auto`` would pick and why each of the
others was passed over.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import available_backends, get_backend
from .masks import MaskSpec

__all__ = ["attention", "check_qkv", "explain", "Explanation"]

# Below this many keys the dense mask SDPA needs is cheap and its fused kernel wins; above
# it, chunked attention's block skipping wins for windows (w=1024, 1 thread: 2.0x at S=4096,
# 6.2x at 16384; SDPA cannot run at 65536 in 16 GiB; benchmarks/bench_attention.py).
# bfloat16 has no rule of its own: on CPUs without native bf16 matmul, SDPA's bf16 kernel
# ran at 49 GFLOP/s against chunked's 28-30 (T=4096, 8192), so SDPA stays first.
_WINDOW_MIN_S = 2048


def check_qkv(q, k, v, *, expected: str = "4-D (B, heads, length, head_dim)",
              fix: str = "add a batch or head dim with unsqueeze") -> None:
    """Validate q ``(B, H, T, D)``, k/v ``(B, Hkv, S, D)`` for any attention entry point.

    Args:
        expected: how the message describes a tensor of the wrong rank.
        fix: what the message suggests for a tensor of the wrong rank.

    Raises:
        TypeError: non-tensor, non-float or mixed-dtype inputs.
        ValueError: rank != 4, different devices, mismatched batch/head_dim/length,
            ``H % Hkv != 0``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)}; {fix}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    (B, H, _, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if Dk != D:
        raise ValueError(f"q and k must share head_dim, got q {D} and k {Dk}")
    if v.shape[1] != Hkv or v.shape[2] != S:
        raise ValueError(f"k and v must have the same heads and length, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) "
                         "for grouped-query attention")


def _check_call(q, k, v, dropout_p: float) -> None:
    check_qkv(q, k, v)
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _auto_order(q: Tensor, k: Tensor, spec: MaskSpec, return_lse: bool) -> tuple[list[str], str]:
    """Backends in the order ``auto`` tries them, and the rule that set the order."""
    S = k.shape[-2]
    if return_lse:
        return ["chunked", "math"], "the log-sum-exp was asked for"
    if spec.window is not None and S >= _WINDOW_MIN_S:
        return ["chunked", "sdpa", "math"], (
            f"a sliding window at S={S} >= {_WINDOW_MIN_S}: chunked skips blocks outside it")
    return ["sdpa", "chunked", "math"], "SDPA's fused kernel is the fastest general path"


@dataclass(frozen=True)
class Explanation:
    """What ``backend="auto"`` would do for a call.

    Attributes:
        chosen: the backend name ``auto`` picks.
        reason: why it comes first for this call.
        rejected: for every other backend, why it was not picked.
    """

    chosen: str
    reason: str
    rejected: dict[str, str]

    def __str__(self) -> str:
        lines = [f"auto -> {self.chosen}: {self.reason}"]
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


def _spec(causal, causal_align, window, key_padding_mask, mask) -> MaskSpec:
    return MaskSpec(causal=bool(causal), causal_align=causal_align, window=window,
                    key_padding_mask=key_padding_mask, mask=mask)


def _resolve(q, k, v, spec, dropout_p, return_lse) -> Explanation:
    order, reason = _auto_order(q, k, spec, return_lse)
    order += [name for name in available_backends() if name not in order]
    rejected, chosen = {}, None
    for name in order:
        why = get_backend(name).why_not(q, k, v, spec, dropout_p=dropout_p,
                                        return_lse=return_lse)
        if chosen is None and why is None:
            chosen = name
        else:
            rejected[name] = why or f"ranked below {chosen} ({reason})"
    if chosen is None:  # math has no limits, so only a custom registry can end here
        raise ValueError(f"no registered backend can serve this call: {rejected}")
    if chosen != order[0]:
        reason = f"{order[0]} cannot serve this call"
    return Explanation(chosen, reason, rejected)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    causal_align: str = "top_left",
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Scaled dot-product attention with described masks and a choice of engine.

    Args:
        q: queries ``(B, H, T, D)``.
        k: keys ``(B, Hkv, S, D)``; ``H`` must be a multiple of ``Hkv`` (grouped-query
            attention: query head ``h`` reads key/value head ``h // (H // Hkv)``).
        v: values ``(B, Hkv, S, D)``.
        mask: optional dense bool mask broadcastable to ``(B, H, T, S)``, True = may attend.
        causal: hide keys after each query's position.
        causal_align: ``"top_left"`` (queries and keys start together) or
            ``"bottom_right"`` (the T queries are the last T of the S keys: KV-cache decoding).
        window: each query sees at most this many most recent keys, itself included
            (implies ``causal``).
        key_padding_mask: ``(B, S)`` bool, True = real key.
        dropout_p: dropout on the attention weights, applied whenever > 0 (a module passes 0
            in eval mode).
        scale: score multiplier, default ``1/sqrt(D)``.
        backend: ``"auto"`` or a registered name (``"math"``, ``"sdpa"``, ``"chunked"``).
        return_lse: also return the row log-sum-exp ``(B, H, T)`` in float32 (float64 for
            float64 inputs); ``-inf`` for rows with no visible key.

    Returns:
        ``out (B, H, T, D)`` in the input dtype, or ``(out, lse)``. Rows whose keys are all
        masked are zeros.

    Raises:
        TypeError: non-tensor, non-float or mixed-dtype inputs; non-bool masks.
        ValueError: rank != 4, mismatched batch/head_dim/length, ``H % Hkv != 0``, a mask
            that does not fit, ``window < 1``, unknown ``causal_align`` or backend, dropout
            outside [0, 1), or a named backend that cannot serve the call (with the reason).
    """
    _check_call(q, k, v, dropout_p)
    spec = _spec(causal, causal_align, window, key_padding_mask, mask)
    spec.validate(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if backend == "auto":
        backend = _resolve(q, k, v, spec, dropout_p, return_lse).chosen
    chosen = get_backend(backend)
    why = chosen.why_not(q, k, v, spec, dropout_p=dropout_p, return_lse=return_lse)
    if why is not None:
        raise ValueError(f"backend {backend!r} cannot serve this call: {why}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return chosen.fn(q, k, v, spec, dropout_p=float(dropout_p), scale=scale,
                     return_lse=return_lse)


def explain(q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal=False,
            causal_align="top_left", window=None, key_padding_mask=None, dropout_p=0.0,
            return_lse=False, **_ignored) -> Explanation:
    """Which backend ``attention(..., backend="auto")`` would run for these arguments, and why.

    Takes the same arguments as :func:`attention` (``scale`` and ``backend`` are ignored).

    Returns:
        An :class:`Explanation`; ``print`` it for a readable summary.

    Raises:
        The same errors as :func:`attention` for bad input.
    """
    _check_call(q, k, v, dropout_p)
    spec = _spec(causal, causal_align, window, key_padding_mask, mask)
    spec.validate(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return _resolve(q, k, v, spec, dropout_p, return_lse)
