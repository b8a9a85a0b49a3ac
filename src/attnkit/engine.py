"""``attnkit.attention``: one call, every mask and score function, any backend.

This module validates the call, turns the arguments into one :class:`MaskSpec` (or takes a
ready one), lowers it once into a :class:`attnkit.spec.Call` (structure recognised, block
summaries built on demand) and hands that to a backend from the registry. ``backend="auto"`` asks every
registered backend whether it can serve the call (its declared capabilities and check) and
what it would cost (its cost rule, :mod:`attnkit.backends.cost`), and runs the cheapest:
no backend name is written into the rule. :func:`explain` takes exactly the same arguments
and says which backend ``auto`` would pick and why each of the others was passed over.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _display
from .backends import available_backends, chunked, get_backend
from .backends.registry import state_key
from .masks.base import And, as_mask_mod
from .spec import Call, MaskSpec, Uncacheable, description_key
from .summary import BlockSummary

__all__ = ["attention", "check_qkv", "explain", "Explanation", "Call"]

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



# The arguments of attention() that describe the mask and scores (MaskSpec.from_args).
_DESCRIPTION_ARGS = ("mask", "causal", "causal_align", "window", "key_padding_mask", "mask_mod",
                     "score_mod", "softcap", "alibi_slopes", "bias", "sinks", "block_mask")


def _with_block_mask(q, k, args: dict) -> dict:
    """``args`` with ``block_mask`` (torch's or attnkit's ``BlockMask``) checked as torch's
    ``flex_attention`` checks it and joined to ``mask_mod`` as the description it runs."""
    from .block_mask import check_block_mask, run_mask

    check_block_mask(args["block_mask"], q, k)
    mod = run_mask(args["block_mask"], q.shape[0], q.shape[1])
    if mod is not None and args["mask_mod"] is not None:
        mod = And((as_mask_mod(args["mask_mod"]), mod))
    return dict(args, mask_mod=args["mask_mod"] if mod is None else mod)


def _build_spec(spec, args: dict) -> MaskSpec:
    """One :class:`MaskSpec` from ``spec=`` or from the separate arguments (not both)."""
    if spec is None:
        return MaskSpec.from_args(**{n: args[n] for n in _DESCRIPTION_ARGS if n != "block_mask"})
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"spec must be an attnkit.masks.MaskSpec, got {type(spec).__name__}")
    defaults = _SIGNATURE.parameters
    given = sorted(n for n in _DESCRIPTION_ARGS if args[n] is not defaults[n].default
                   and not (isinstance(args[n], (bool, str)) and args[n] == defaults[n].default))
    if given:
        raise ValueError(f"pass either spec= or the mask/score arguments, not both; got "
                         f"spec= and {given}: put them into the MaskSpec instead")
    return spec


def _check_scalars(dropout_p, scale) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale must be a finite non-zero number or None (1/sqrt(D)), "
                             f"got {scale!r}")


def _prepare(q, k, v, args: dict) -> Call:
    """Validate a call and lower it (the one place a call's description is resolved)."""
    check_qkv(q, k, v)
    _check_scalars(args["dropout_p"], args["scale"])
    if args["block_mask"] is not None and args["spec"] is None:
        args = _with_block_mask(q, k, args)
    spec = _build_spec(args["spec"], args)
    B, H, T, D = q.shape
    spec.validate(B, H, T, k.shape[2])
    for t in spec.tensors():
        if t.device != q.device:
            raise ValueError(f"every mask/score tensor must be on q's device {q.device}, got "
                             f"one on {t.device}; move it with .to(q.device)")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *spec.tensors()))
    return Call.of(q, k, spec, grad)


@dataclass(frozen=True)
class Explanation:
    """What ``backend="auto"`` would do for a call.

    Attributes:
        chosen: the backend name ``auto`` picks.
        reason: why it comes first for this call.
        rejected: for every other backend, why it was not picked.
        description: the call's mask and score description, as the engine sees it.
        estimates: estimated seconds of every backend that can serve the call.
        summary: the lowered mask's :class:`~attnkit.summary.BlockSummary` at the chunked
            backend's plan granularity (None without a mask): what a block-sparse backend
            skips, computes in full, or masks.
        implementation: how the chosen backend runs the call (its compiled kernel, or a
            fallback and why), when the backend says.
    """

    chosen: str
    reason: str
    rejected: dict[str, str]
    description: str = ""
    estimates: dict[str, float] = field(default_factory=dict)
    summary: BlockSummary | None = None
    implementation: str = ""

    # In a notebook: a picture (attnkit._display); str() stays the text everywhere else.
    _repr_html_ = _display.explanation_html
    _repr_png_ = _display.explanation_png

    def __str__(self) -> str:
        lines = [f"auto -> {self.chosen}: {self.reason}"]
        if self.implementation:
            lines.append(f"  {self.chosen} runs: {self.implementation}")
        if self.summary is not None:
            lines.insert(0, f"blocks: {self.summary.counts()} of {self.summary.block_q}x"
                            f"{self.summary.block_k}, {self.summary.visited_fraction():.1%} "
                            f"of the pairs visited")
        if self.description:
            lines.insert(0, f"call: {self.description}")
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


def _rank(q, k, v, call, args):
    """``(ranked names, estimates, refusals)``: every backend that can serve the call,
    cheapest first, and for the others why not (each backend asked once)."""
    refused, costs = {}, {}
    for name in available_backends():
        backend = get_backend(name)
        why = backend.why_not(q, k, v, call, dropout_p=args["dropout_p"],
                              return_lse=args["return_lse"],
                              return_weights=args["return_weights"])
        if why is None:
            costs[name] = backend.estimate(call)
        else:
            refused[name] = why
    if not costs:  # math serves everything, so only a custom registry can end here
        raise ValueError(f"no registered backend can serve this call: {refused}")
    ranked: list[str] = []  # insertion sort: torch.compile cannot sort by symbolic keys
    for name in costs:
        i = 0
        while i < len(ranked) and not costs[name] < costs[ranked[i]]:
            i += 1
        ranked.insert(i, name)
    return ranked, costs, refused


def _resolve(q, k, v, call, args) -> Explanation:
    ranked, costs, refused = _rank(q, k, v, call, args)
    chosen = ranked[0]

    def ms(name):
        return f"{float(costs[name]) * 1e3:.3g} ms"

    reason = f"lowest estimated cost ({ms(chosen)})"
    rejected = {name: f"estimated {ms(name)}, above {chosen}'s {ms(chosen)}"
                for name in ranked[1:]}
    rejected.update(refused)
    summary = None if call.mask is None else call.summary(chunked.BLOCK_Q, chunked.FINE)
    how = get_backend(chosen).implementation
    return Explanation(chosen, reason, rejected, call.describe(),
                       {name: float(c) for name, c in costs.items()}, summary,
                       how(q, k, v, call) if how is not None else "")


# --- the choice cache: what _prepare and _rank compute, per call signature ------------------
#
# A model calls attention() with the same shapes and description many times; validating,
# lowering and ranking them again costs more than a small call's arithmetic. So the
# lowered Call and the backend chosen for it are kept, keyed by everything they depend on:
# the tensors' types, shapes, dtypes, devices and requires_grad, grad mode, the description
# (by value, its tensors by identity and version: an in-place write is a new key; user
# functions and large tensors are never keyed, they take the full path every time), the
# scalar arguments with their types, the thread count, and the registry's state (a backend
# registered, flex compiling a new shape, an environment variable a cost rule reads). A
# key is only ever built for a call that passed validation, so a hit has been validated.
# Never under torch.compile (the full path is what gets traced).

_CHOICES: dict = {}
_MAX_CHOICES = 128


def _call_key(q, k, v, desc: tuple, dropout_p, scale, backend, return_lse, return_weights):
    """The choice cache's key for a call, or None when it cannot have one."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    # None, bools and strings as themselves (a bool never equals its int twin here:
    # description_key types every other value); most calls have nothing else
    parts = desc
    for x in desc:
        if not (x is None or x is True or x is False or type(x) is str):
            try:
                parts = tuple(y if y is None or y is True or y is False or type(y) is str
                              else description_key(y) for y in desc)
            except Uncacheable:
                return None
            break
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device,
            v.device, q.requires_grad, k.requires_grad, v.requires_grad,
            torch.is_grad_enabled(), parts, type(dropout_p), dropout_p, type(scale), scale,
            backend, return_lse, return_weights, torch.get_num_threads(), state_key())


def _remember(key, call, backend) -> None:
    if len(_CHOICES) >= _MAX_CHOICES:
        del _CHOICES[next(iter(_CHOICES))]  # the oldest
    _CHOICES[key] = (call, backend)


def _run(backend, q, k, v, call, dropout_p, scale, return_lse, return_weights):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if return_weights:
        return backend.fn(q, k, v, call, dropout_p=float(dropout_p), scale=scale,
                          return_lse=return_lse, return_weights=True)
    return backend.fn(q, k, v, call, dropout_p=float(dropout_p), scale=scale,
                      return_lse=return_lse)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    causal_align="top_left",
    window: int | tuple | None = None,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    return_weights: bool = False,
    spec: MaskSpec | None = None,
    mask_mod=None,
    score_mod=None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    bias: Tensor | None = None,
    sinks: Tensor | None = None,
    block_mask=None,
):
    """Scaled dot-product attention with described masks and scores and a choice of engine.

    Args:
        q: queries ``(B, H, T, D)``.
        k: keys ``(B, Hkv, S, D)``; ``H`` must be a multiple of ``Hkv`` (grouped-query
            attention: query head ``h`` reads key/value head ``h // (H // Hkv)``).
        v: values ``(B, Hkv, S, D)``.
        mask: optional dense bool mask broadcastable to ``(B, H, T, S)``, True = may attend.
        causal: hide keys after each query's position (a bool).
        causal_align: ``"top_left"`` (queries and keys start together),
            ``"bottom_right"`` (the T queries are the last T of the S keys: KV-cache
            decoding) or an int offset (query ``i`` sees keys ``j <= i + offset``: a static
            cache filled up to another point). Also places ALiBi's query positions.
        window: a sliding window, one definition (:func:`attnkit.spec.window_mask`):
            ``(left, right)`` keys on each side of the query's position (flash-attn's
            ``window_size``; ``None`` or ``-1`` = unbounded), or an int ``w`` for the ``w``
            most recent keys, the query's own included (``(w - 1, 0)``).
        key_padding_mask: ``(B, S)`` bool, True = real key.
        dropout_p: dropout on the attention weights, applied whenever > 0 (a module passes 0
            in eval mode).
        scale: score multiplier, default ``1/sqrt(D)``; finite and non-zero.
        backend: ``"auto"`` or a registered name (``"math"``, ``"sdpa"``, ``"chunked"``,
            ``"flex"``, ``"decode"``).
        return_lse: also return the row log-sum-exp ``(B, H, T)`` in float32 (float64 for
            float64 inputs); ``-inf`` for rows with no visible key. Differentiable.
        return_weights: also return the attention weights ``(B, H, T, S)`` (after dropout;
            without the sinks' share). Only backends that build them can (``math``).
        spec: a ready :class:`MaskSpec` instead of the mask and score arguments.
        mask_mod: a mask description from :mod:`attnkit.masks` (``documents(ids)``,
            ``prefix_lm(n)``, ``sliding_window(l, r)`` ...) or a callable
            ``fn(b, h, q_idx, kv_idx)``, ANDed with the other mask arguments.
        score_mod: a score description from :mod:`attnkit.scores` or a callable
            ``fn(score, b, h, q_idx, kv_idx)``, applied after the ones below.
        softcap: ``c``: scores become ``c * tanh(score / c)`` (Gemma-2), applied first.
        alibi_slopes: ``(H,)`` float: ALiBi's ``-slope[h] * |i + offset - j|``.
        bias: float tensor broadcastable to ``(B, H, T, S)`` added to the scores (T5
            position bias, float masks with ``-inf``); it gets a gradient on chunked/math.
        sinks: ``(H,)`` float, one learnable logit per head added to the softmax
            denominator (gpt-oss attention sinks); exact gradient on every backend.
        block_mask: a FlexAttention ``BlockMask`` (torch's ``create_block_mask`` or
            :func:`attnkit.create_block_mask`) made for exactly these ``(T, S)`` (torch's
            ``block_mask was created for ...`` error otherwise; ``_adjust`` crops one), ANDed
            with the other mask arguments: attnkit's runs its description, torch's its
            listing (unlisted tiles hidden, ``mask_mod`` inside partial tiles only).

    Returns:
        ``out (B, H, T, D)`` in the input dtype; with ``return_weights`` and/or
        ``return_lse`` a tuple ``(out, weights, lse)`` with the ones asked for. Rows whose
        keys are all masked are zeros; a NaN in the input gives NaN.

    Raises:
        TypeError: non-tensor, non-float or mixed-dtype inputs; non-bool masks; a
            ``causal`` that is not a bool; descriptions of the wrong type.
        ValueError: rank != 4, mismatched batch/head_dim/length, ``H % Hkv != 0``, a mask,
            bias, slopes or sinks that do not fit, ``window < 1``, unknown ``causal_align``
            or backend, dropout outside [0, 1), a zero or non-finite scale, ``spec=`` with
            other mask arguments, a ``block_mask`` made for other lengths, or a named
            backend that cannot serve the call (with the reason).
        RuntimeError: a ``block_mask`` on another device than ``q``, or sliced without its
            ``mask_mod`` set again (torch's texts).
    """
    key = None
    if not torch.compiler.is_compiling():
        key = _call_key(q, k, v, (mask, causal, causal_align, window, key_padding_mask,
                                  mask_mod, score_mod, softcap, alibi_slopes, bias, sinks,
                                  spec, block_mask), dropout_p, scale, backend, return_lse,
                        return_weights)
        try:
            hit = None if key is None else _CHOICES.get(key)
        except TypeError:  # an unhashable argument: the full path says what is wrong
            key = hit = None
        if hit is not None:
            return _run(hit[1], q, k, v, hit[0], dropout_p, scale, return_lse, return_weights)
    args = dict(mask=mask, causal=causal, causal_align=causal_align, window=window,
                key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale,
                backend=backend, return_lse=return_lse, return_weights=return_weights,
                spec=spec, mask_mod=mask_mod, score_mod=score_mod, softcap=softcap,
                alibi_slopes=alibi_slopes, bias=bias, sinks=sinks, block_mask=block_mask)
    call = _prepare(q, k, v, args)
    if backend == "auto":
        name = _rank(q, k, v, call, args)[0][0]  # asked every backend: no second check
    else:
        name = backend
        why = get_backend(backend).why_not(q, k, v, call, dropout_p=dropout_p,
                                           return_lse=return_lse,
                                           return_weights=return_weights)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {why}")
    chosen = get_backend(name)
    if key is not None:
        _remember(key, call, chosen)
    return _run(chosen, q, k, v, call, dropout_p, scale, return_lse, return_weights)


_SIGNATURE = inspect.signature(attention)


def explain(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Explanation:
    """Which backend ``attention(..., backend="auto")`` would run for these arguments, and why.

    Takes exactly :func:`attention`'s arguments (checked against its signature, so a
    misspelt one is a ``TypeError``, as there); ``backend`` is checked to exist but
    ``auto``'s choice is explained.

    Returns:
        An :class:`Explanation`; ``print`` it for a readable summary.

    Raises:
        TypeError: an argument :func:`attention` does not take (a misspelt name), or a
            wrong type, as :func:`attention` raises it.
        ValueError: bad shapes or values, as :func:`attention` raises them.
    """
    bound = _SIGNATURE.bind(q, k, v, **kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    call = _prepare(q, k, v, args)
    if args["backend"] != "auto":
        get_backend(args["backend"])
    return _resolve(q, k, v, call, args)


explain.__signature__ = _SIGNATURE.replace(return_annotation=Explanation)
