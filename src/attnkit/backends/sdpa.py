"""The ``sdpa`` backend: PyTorch's fused ``F.scaled_dot_product_attention``.

On CPU it runs the flash kernel (O(T) memory, forward and backward); on CUDA flash,
memory-efficient or cuDNN kernels. It is the fastest path for plain causal or unmasked
attention, whatever spelling the call used (the lowering in :mod:`attnkit.spec` turns every
exactly-causal description into ``is_causal``). Its limits, which ``check`` reports: it cannot
return the log-sum-exp or the weights, it has no sinks and no score function other than an
additive bias, and any other mask reaches it as a dense ``T x S`` tensor.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scores import Bias
from ._edges import may_hold_nan, restore_nan
from ._rates import rate
from .registry import BACKWARD_FACTOR, Backend, as_call

SDPA_RATE = 40e9  # FLOP/s of one CPU thread, float32
SDPA_MASKED_SLOWDOWN = 1.3  # the masked kernel path, plus reading the mask
MASK_BUILD_S_PER_ELEMENT = 2e-9  # building a bool T x S mask and SDPA's float copy of it
# Bytes/s its kernel reads K and V at on one thread, float32 and bfloat16/float16: the
# defaults of this machine's measured sdpa_read_fp32 / sdpa_read_half (_rates.py).
SDPA_READ_RATE = 12e9
SDPA_HALF_READ_RATE = 2.6e9


def _as_sdpa_mask(call, device):
    """``(is_causal, attn_mask)`` for SDPA: the ``is_causal`` hint whenever it is exact."""
    if call.score is None and call.plain_causal:
        return True, None
    mask = None
    if call.mask is not None:
        mask = call.mask.tile(call.B, call.H, 0, call.T, 0, call.S, device)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, T, S)
    if call.score is None:
        return False, mask
    bias = call.score.bias
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))  # (B|1, H|1, T, S)
    return False, bias


def sdpa_check(q, k, v, call, *, dropout_p: float, return_lse: bool,
               return_weights: bool = False):
    if return_lse:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if return_weights:
        return "F.scaled_dot_product_attention does not return the attention weights"
    if call.sinks is not None:
        return "F.scaled_dot_product_attention has no attention sinks"
    score = call.score
    if score is not None:
        if not isinstance(score, Bias):
            return (f"F.scaled_dot_product_attention takes no score function "
                    f"({score.describe()}) other than an additive bias")
        if score.bias.requires_grad:
            return "a bias that requires grad: SDPA's CPU kernels give no gradient for it"
    return None


def sdpa_attention(q, k, v, call, *, dropout_p: float, scale: float,
                   return_lse: bool, return_weights: bool = False):
    """Attention through ``F.scaled_dot_product_attention``; contract in ``registry``.

    A NaN reaches every row that sees it, as on every other backend: the fused CPU kernel
    returns zeros for rows whose visible scores are all NaN, and :mod:`._edges` restores them.
    """
    call = as_call(q, k, v, call)  # a bare MaskSpec works too
    is_causal, attn_mask = _as_sdpa_mask(call, q.device)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **gqa)
    if not torch.compiler.is_compiling() and not may_hold_nan(q, k, v):
        return out  # no NaN anywhere: the kernel gets every row right (one cheap check)
    # Branch-free (no sync, no graph break): one pass over q and k, O((T + S)·D).
    if is_causal:
        visible = 0
    elif attn_mask is not None and attn_mask.is_floating_point():
        visible = attn_mask > float("-inf")
    else:
        visible = attn_mask
    return restore_nan(out, q, k, visible)  # (B, H, T, D)


def sdpa_cost(call) -> float:
    """Estimated seconds: the FLOPs at the fused kernel's rate (half for ``is_causal``, more
    plus the mask for a dense mask), but never less than reading K and V once per *query*
    head, which is what bounds a short query block (SDPA's CPU kernel re-reads a GQA head's
    cache for every query head of its group, at this machine's measured rate:
    :mod:`._rates`' ``sdpa_read_fp32`` / ``sdpa_read_half``)."""
    passes = BACKWARD_FACTOR if call.grad else 1.0
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    read = 2.0 * call.B * call.H * call.S * call.D * itemsize / (
        rate("sdpa_read_fp32", SDPA_READ_RATE) if itemsize >= 4 else
        rate("sdpa_read_half", SDPA_HALF_READ_RATE))
    if call.plain_causal and call.score is None:
        compute = 0.5 * call.flops() * passes / SDPA_RATE
    elif call.mask is None and call.score is None:
        compute = call.flops() * passes / SDPA_RATE
    else:
        per_sample = any(t.dim() > 0 and t.shape[0] > 1 for t in call.spec.tensors())
        build = MASK_BUILD_S_PER_ELEMENT * call.T * call.S * (call.B if per_sample else 1)
        compute = call.flops() * passes * SDPA_MASKED_SLOWDOWN / SDPA_RATE + build
    return (read if read > compute else compute) + 2e-5


BACKEND = Backend("sdpa", sdpa_attention, sdpa_check,
                  frozenset({"dropout", "grad", "score_mod"}), sdpa_cost)
