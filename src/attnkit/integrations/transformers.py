"""Hugging Face transformers (5.x) models with their attention run by attnkit.

::

    import attnkit.integrations.transformers     # registers attn_implementation "attnkit"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnkit")

Importing this module registers the name ``"attnkit"`` (backend ``"auto"``) with
transformers: importing it is the opt-in (``import attnkit`` never imports it).
:func:`register` adds more names or fixes another backend; :func:`unregister` removes one.
A name goes into two transformers registries:

* the **mask function** (``AttentionMaskInterface``): :func:`mask_interface` from
  :mod:`.transformers_masks`, the mask reader, which turns transformers' mask closures into
  an :class:`HFMask` holding an attnkit description instead of a ``T x S`` tensor. Without a
  registered mask function transformers hands a custom attention ``attention_mask=None``
  and padding would be silently dropped.
* the **attention function** (``AttentionInterface``): :func:`attention_forward`, this
  module's adapter. transformers calls it as ``fn(module, query (B, H, T, D), key (B, Hkv,
  S, D), value, attention_mask, dropout=, scaling=, sliding_window=, softcap=, s_aux=,
  is_causal=, **kwargs)`` and wants ``(out (B, T, H, D), weights (B, H, T, S) or None)``. It
  calls :func:`attnkit.attention` with ``key[:, :, :keys]`` views of the keys a query can
  see (a static cache's filled part, no copy), GQA without repeating K/V, and the
  description as ``mask_mod=`` (the engine's lowering turns plain causal into SDPA's
  ``is_causal``).

The transformers names both rely on (some private) are in one table,
:mod:`.transformers_api`. Differences from ``eager``, on purpose: a query row whose keys are
all masked (the padded positions of a left-padded batch) is zeros here; eager's
``finfo.min`` mask gives the mean of the values. Real rows agree to float32 round-off.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import Tensor

from . import transformers_api as _api
from .. import engine as _engine
from ..backends import available_backends
from ..masks import Window
from .transformers_masks import HFMask, dense_fallbacks, describe_mask_function, mask_interface

__all__ = ["register", "unregister", "HFMask", "attention_forward", "mask_interface",
           "describe_mask_function", "dense_fallbacks", "DEFAULT_NAME"]

#: The name importing this module registers.
DEFAULT_NAME = "attnkit"

_AttentionInterface = _api.get("transformers.AttentionInterface")
_AttentionMaskInterface = _api.get("transformers.masking_utils.AttentionMaskInterface")
_COLLECTOR = "transformers.utils.output_capturing._active_collector"
try:
    _active_collector = _api.get(_COLLECTOR)
except LookupError:  # optional: then only output_attentions=True asks for weights
    _active_collector = None

_OURS: dict[str, str] = {}  # name -> backend, the names register() added

#: The recorder of :func:`attnkit.inspect` while its forward runs (one per context, so
#: threads do not see each other's), else None. Its ``record(...)`` keeps the q/k and the
#: description of the layers it was asked for; the attention itself runs as always.
INSPECTOR: ContextVar = ContextVar("attnkit_inspector", default=None)


def _wants_weights(kwargs) -> bool:
    if kwargs.get("output_attentions"):
        return True
    collector = _active_collector
    if collector is None:
        return False
    # transformers records attentions through hooks on the attention modules; its collector
    # is a context variable, which torch.compile cannot read, except when it was set inside
    # the compiled region (then it holds a plain attribute).
    if torch.compiler.is_compiling() and not getattr(collector, "compiling", False):
        return False
    collected = collector.get()
    return bool(collected) and "attentions" in collected


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      s_aux: Tensor | None = None, is_causal: bool | None = None, *,
                      backend: str = "auto", **kwargs):
    """transformers' ``AttentionInterface`` entry, run by :func:`attnkit.attention`.

    Args:
        module: the calling attention module (its ``is_causal`` is read when no mask came).
        query: ``(B, H, T, D)``.
        key: ``(B, Hkv, S, D)``, not repeated for GQA.
        value: ``(B, Hkv, S, D)``.
        attention_mask: an :class:`HFMask` from :func:`mask_interface` (only its first
            ``keys`` keys are read); or a bool tensor broadcastable to ``(B, H, T, S)``
            (True = attend) or a float additive one (a user's ready 4-D mask); or None:
            causal (top-left) when ``is_causal`` and ``T > 1``, as transformers' ``sdpa``.
        dropout: dropout on the weights (models pass 0 outside training).
        scaling: score multiplier, default ``1/sqrt(D)``.
        sliding_window: the model's window; the mask already holds it, so it is only read
            when no mask came.
        softcap: Gemma-2's ``c * tanh(score / c)``.
        s_aux: ``(H,)`` attention sinks (gpt-oss).
        is_causal: overrides ``module.is_causal`` when no mask came.
        backend: the attnkit backend (``register`` fixes it).
        **kwargs: ``output_attentions``, ``position_bias`` (T5-style, added to the scores);
            the rest (positions, cache) is not needed here.

    Returns:
        ``(out (B, T, H, D), weights (B, H, T, S) or None)``.

    Raises:
        TypeError: an ``attention_mask`` of another type (a flex ``BlockMask``: load the
            model with the name :func:`register` returned).
        ValueError: an :class:`HFMask` built for other lengths than q/k, or anything
            :func:`attnkit.attention` rejects (a backend that cannot serve the call).
    """
    T, S = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    parts: dict = {}
    keys = S
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (T, S):
            raise ValueError(f"attention_mask was built for (T, S) = ({attention_mask.q_length}"
                             f", {attention_mask.kv_length}) but query/key have (T, S) = "
                             f"({T}, {S}); build it for this call's cache")
        keys = attention_mask.keys
        if keys < S:  # views of the keys a query can see: a static cache's filled part
            key, value = key[:, :, :keys], value[:, :, :keys]  # (B, Hkv, keys, D)
            if bias is not None and bias.shape[-1] == S:
                bias = bias[..., :keys]
        parts = dict(mask_mod=attention_mask.mask_mod)  # lowered by the engine
    elif attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if causal and T > 1:
            parts = dict(causal=True) if not sliding_window else \
                dict(mask_mod=Window(left=sliding_window - 1, right=0, offset=0))
    elif isinstance(attention_mask, Tensor):
        if attention_mask.dtype == torch.bool:
            parts = dict(mask=attention_mask)
        else:
            bias = attention_mask if bias is None else bias + attention_mask
    else:
        raise TypeError(f"attention_mask must be an attnkit HFMask, a tensor or None, got "
                        f"{type(attention_mask).__name__}; load the model with "
                        f"attn_implementation set to the name register() returned so "
                        f"transformers builds the mask with attnkit's mask function")
    # attnkit.inspect() records the call (torch.compile cannot trace a context variable's
    # get; inspect never runs compiled, so a compiled forward skips the check)
    inspector = None if torch.compiler.is_compiling() else INSPECTOR.get()
    if inspector is not None:
        inspector.record(module, query, key, parts=parts, bias=bias, scaling=scaling,
                         softcap=softcap, sinks=s_aux, kv_length=S, mask=attention_mask)
    weights = _wants_weights(kwargs)
    result = _engine.attention(query, key, value, bias=bias, dropout_p=float(dropout),
                               scale=scaling, softcap=softcap, sinks=s_aux, backend=backend,
                               return_weights=weights, **parts)
    out, attn = result if weights else (result, None)
    if attn is not None and keys < S:  # the hidden tail has weight 0
        attn = torch.nn.functional.pad(attn, (0, S - keys))  # (B, H, T, S)
    return out.transpose(1, 2).contiguous(), attn  # (B, T, H, D)


def register(name: str = DEFAULT_NAME, backend: str = "auto") -> str:
    """Make ``attn_implementation=name`` run transformers models on attnkit.

    Importing this module already registers ``"attnkit"`` with backend ``"auto"``; call it
    to fix another backend or add another name (registering a name again replaces it).

    Args:
        name: the ``attn_implementation`` name to register (not one of transformers' own).
        backend: ``"auto"`` or a registered attnkit backend (``available_backends()``).

    Also registers ``f"{name}_flash"``, the flash-convention implementation for continuous
    batching and packed training (:mod:`attnkit.integrations.transformers_varlen`).

    Returns:
        ``name``, to pass as ``attn_implementation=``.

    Raises:
        ValueError: an empty name, one of transformers' built-in names, or an unknown
            backend.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    mapping = _api.get("transformers.AttentionInterface._global_mapping")
    builtin = {n for n, fn in mapping.items() if not hasattr(fn, "attnkit_backend")} | {"eager"}
    if name in builtin:
        raise ValueError(f"name {name!r} is one of transformers' own attention "
                         f"implementations; pick another, e.g. register(name=\"attnkit\")")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got "
                         f"{backend!r}")

    def attnkit_attention(module, query, key, value, attention_mask, **kwargs):
        return attention_forward(module, query, key, value, attention_mask, backend=backend,
                                 **kwargs)

    attnkit_attention.attnkit_backend = backend  # marks the names attnkit registered
    _AttentionInterface.register(name, attnkit_attention)
    _AttentionMaskInterface.register(name, mask_interface)
    _OURS[name] = backend
    from .transformers_varlen import register as register_flash  # imports this module's deps
    register_flash(f"{name}_flash", backend)
    return name


def unregister(name: str = DEFAULT_NAME) -> None:
    """Remove a name :func:`register` added (importing this module adds ``"attnkit"``),
    and its ``f"{name}_flash"`` twin.

    Raises:
        ValueError: a name that :func:`register` did not add.
    """
    if name not in _OURS:
        raise ValueError(f"{name!r} was not registered by attnkit; registered: "
                         f"{sorted(_OURS)}")
    _api.get("transformers.AttentionInterface._global_mapping").pop(name, None)
    _api.get("transformers.masking_utils.AttentionMaskInterface._global_mapping").pop(name,
                                                                                      None)
    del _OURS[name]
    from .transformers_varlen import _BACKENDS, unregister as unregister_flash

    if f"{name}_flash" in _BACKENDS:  # register() added its flash-convention twin
        unregister_flash(f"{name}_flash")


register()
