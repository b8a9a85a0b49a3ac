"""Attention backends: one contract, several engines, a registry and an ``auto`` choice.

Each backend module exports one :class:`Backend` (``BACKEND``: function, check,
capabilities, cost rule); registering them here is all the wiring there is. The built-in
ones are ``math`` (the spec), ``sdpa`` (PyTorch's fused kernels), ``chunked`` (pure-PyTorch
online softmax in O(T) memory, block-sparse from the call's block summary), ``flex``
(``torch.nn.attention.flex_attention``, compiled; refused with the reason where torch or a
compiler cannot run it) and ``decode`` (short query blocks over long caches: grouped KV heads,
split-KV, half caches read as such). See :mod:`.registry` for the contract a new backend follows and
:func:`attnkit.attention` for the entry point.
"""

from . import chunked as _chunked
from . import decode as _decode
from . import flex as _flex
from . import math as _math
from . import sdpa as _sdpa
from .chunked import chunked_attention
from .decode import decode_attention
from .flex import flex_attention
from .math import math_attention, repeat_kv
from .registry import (CAPABILITIES, Backend, available_backends, get_backend, register,
                       register_backend)
from .sdpa import sdpa_attention

for _module in (_math, _sdpa, _chunked, _flex, _decode):
    register(_module.BACKEND)

__all__ = [
    "Backend",
    "CAPABILITIES",
    "available_backends",
    "chunked_attention",
    "decode_attention",
    "flex_attention",
    "get_backend",
    "math_attention",
    "register",
    "register_backend",
    "repeat_kv",
    "sdpa_attention",
]
