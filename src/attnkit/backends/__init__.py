"""Attention backends: one contract, several engines, a registry and an ``auto`` choice.

The built-in backends are ``math`` (the spec), ``sdpa`` (PyTorch's fused kernels),
``chunked`` (pure-PyTorch online softmax in O(T) memory, block-sparse from the mask
description) and ``flex`` (``torch.nn.attention.flex_attention``, compiled; refused with the
reason where torch or a compiler cannot run it). Each declares its capabilities and a cost
rule (:mod:`.cost`); see :mod:`.registry` for the contract a new backend follows and
:func:`attnkit.attention` for the entry point.
"""

from . import cost as _cost
from .chunked import chunked_attention, chunked_check
from .decode import CAPABILITIES as _DECODE_CAPS, decode_attention, decode_check, decode_cost
from .flex import flex_attention, flex_check, flex_cost
from .math import math_attention, repeat_kv
from .registry import (CAPABILITIES, Backend, available_backends, get_backend,
                       register_backend)
from .sdpa import sdpa_attention, sdpa_check

_ALL = ("lse", "weights", "dropout", "grad", "score_mod", "sinks")
register_backend("math", math_attention, capabilities=_ALL, cost=_cost.math_cost)
register_backend("sdpa", sdpa_attention, check=sdpa_check,
                 capabilities=("dropout", "grad", "score_mod"), cost=_cost.sdpa_cost)
register_backend("chunked", chunked_attention, check=chunked_check,
                 capabilities=("lse", "grad", "score_mod", "sinks"), cost=_cost.chunked_cost)
register_backend("flex", flex_attention, check=flex_check,
                 capabilities=("lse", "grad", "score_mod"), cost=flex_cost)
register_backend("decode", decode_attention, check=decode_check, capabilities=_DECODE_CAPS,
                 cost=decode_cost)

__all__ = [
    "Backend",
    "CAPABILITIES",
    "available_backends",
    "chunked_attention",
    "decode_attention",
    "flex_attention",
    "get_backend",
    "math_attention",
    "register_backend",
    "repeat_kv",
    "sdpa_attention",
]
