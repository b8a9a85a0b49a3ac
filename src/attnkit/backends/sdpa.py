"""The ``sdpa`` backend: PyTorch's fused ``F.scaled_dot_product_attention``.

On CPU it runs the flash kernel (O(T) memory, forward and backward); on CUDA flash,
memory-efficient or cuDNN kernels. It is the fastest path for plain causal or unmasked
attention. Its limits, which ``check`` reports: it cannot return the log-sum-exp or the
weights, it has no sinks and no score function other than an additive bias, and any mask
other than top-left causal reaches it as a dense ``T x S`` tensor.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries,
``S`` keys, ``D`` head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import MaskSpec
from ..scores import Bias
from ._edges import restore_nan


def _as_sdpa_mask(spec: MaskSpec, B: int, H: int, T: int, S: int, device):
    """``(is_causal, attn_mask)`` for SDPA: the ``is_causal`` hint whenever it is exact."""
    score = spec.score_mod_for(T, S)
    if score is None and spec.plain_causal(T, S):
        return True, None
    if (spec.causal and spec.window is None and spec.offset(T, S) >= S - 1
            and spec.offset(T, S) >= 0):
        # The queries' positions are at or past the last key: causal hides nothing.
        spec = MaskSpec(key_padding_mask=spec.key_padding_mask, mask=spec.mask,
                        mask_mod=spec.mask_mod)
    mask = spec.dense(T, S, device=device, B=B, H=H)
    if score is None:
        return False, mask
    bias = score.bias
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))  # (B|1, H|1, T, S)
    return False, bias


def sdpa_check(q, k, v, spec: MaskSpec, *, dropout_p: float, return_lse: bool,
               return_weights: bool = False):
    if return_lse:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    if return_weights:
        return "F.scaled_dot_product_attention does not return the attention weights"
    if spec.sinks is not None:
        return "F.scaled_dot_product_attention has no attention sinks"
    score = spec.score_mod
    if score is not None:
        if not isinstance(score, Bias):
            return (f"F.scaled_dot_product_attention takes no score function "
                    f"({score.describe()}) other than an additive bias")
        if score.bias.requires_grad:
            return "a bias that requires grad: SDPA's CPU kernels give no gradient for it"
    return None


def sdpa_attention(q, k, v, spec: MaskSpec, *, dropout_p: float, scale: float,
                   return_lse: bool, return_weights: bool = False):
    """Attention through ``F.scaled_dot_product_attention``; contract in ``registry``.

    A NaN reaches every row that sees it, as on every other backend: the fused CPU kernel
    returns zeros for rows whose visible scores are all NaN, and :mod:`._edges` restores them.
    """
    B, H, T = q.shape[:3]
    is_causal, attn_mask = _as_sdpa_mask(spec, B, H, T, k.shape[-2], q.device)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **gqa)
    # Branch-free (no sync, no graph break): one pass over q and k, O((T + S)·D).
    if is_causal:
        visible = 0
    elif attn_mask is not None and attn_mask.is_floating_point():
        visible = attn_mask > float("-inf")
    else:
        visible = attn_mask
    return restore_nan(out, q, k, visible)  # (B, H, T, D)
