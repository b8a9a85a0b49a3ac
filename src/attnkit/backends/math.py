"""The ``math`` backend: :mod:`attnkit.functional` (the spec) behind the backend contract.

It materialises the ``(B, H, T, S)`` scores, so it is the reference, the path that returns
attention weights, and the one to read, not the one to run at long T.
"""

from __future__ import annotations

from .. import functional
from .registry import BACKWARD_FACTOR, Backend, as_call

MATH_RATE = 8e9  # FLOP/s of one CPU thread, float32 (cost rule)


def repeat_kv(x, num_groups: int):
    """Repeat each of ``Hkv`` heads ``num_groups`` times: ``(B, Hkv, S, D) -> (B, H, S, D)``.

    Query head ``h`` uses key/value head ``h // num_groups`` (the grouped-query convention of
    ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)``).
    """
    return x if num_groups == 1 else x.repeat_interleave(num_groups, dim=1)


def math_attention(q, k, v, call, *, dropout_p: float, scale: float,
                   return_lse: bool, return_weights: bool = False):
    """Plain-math attention; see :mod:`attnkit.backends.registry` for the contract.

    Serves everything: masks and score functions are evaluated on full index grids, sinks
    join the softmax, and ``return_weights=True`` appends the weights ``(B, H, T, S)``
    (before the lse when both are asked for).
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    B, H, T = q.shape[:3]
    S = k.shape[-2]
    groups = H // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, S, D)
    mask = None if call.mask is None else call.mask.tile(B, H, 0, T, 0, S, q.device)
    return functional.scaled_dot_product_attention(
        q, k, v, mask=mask, dropout_p=dropout_p, scale=scale, return_weights=return_weights,
        return_lse=return_lse, score_mod=call.score, sinks=call.sinks)


def math_cost(call) -> float:
    passes = BACKWARD_FACTOR if call.grad else 1.0
    return call.flops() * passes / MATH_RATE + 3e-5


BACKEND = Backend("math", math_attention, None,
                  frozenset({"lse", "weights", "dropout", "grad", "score_mod", "sinks"}),
                  math_cost)
