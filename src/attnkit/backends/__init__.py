"""Attention backends: one contract, several engines, a registry and an ``auto`` choice.

The built-in backends are ``math`` (the spec), ``sdpa`` (PyTorch's fused kernels) and
``chunked`` (pure-PyTorch online softmax in O(T) memory). See :mod:`.registry` for the
contract a new backend must follow and :func:`attnkit.attention` for the entry point.
"""

from .chunked import chunked_attention, chunked_check
from .math import math_attention, repeat_kv
from .registry import Backend, available_backends, get_backend, register_backend
from .sdpa import sdpa_attention, sdpa_check

register_backend("math", math_attention)
register_backend("sdpa", sdpa_attention, check=sdpa_check)
register_backend("chunked", chunked_attention, check=chunked_check)

__all__ = [
    "Backend",
    "available_backends",
    "chunked_attention",
    "get_backend",
    "math_attention",
    "register_backend",
    "repeat_kv",
    "sdpa_attention",
]
