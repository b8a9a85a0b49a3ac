"""The ``sdpa`` backend: PyTorch's fused ``F.scaled_dot_product_attention``.

On CPU it runs the flash kernel (O(T) memory, forward and backward); on CUDA flash,
memory-efficient or cuDNN kernels. It is the fastest path for plain causal or unmasked
attention. Its limits, which ``check`` reports: it cannot return the log-sum-exp, and any
mask other than top-left causal reaches it as a dense tensor.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..masks import MaskSpec


def _as_sdpa_mask(spec: MaskSpec, T: int, S: int, device):
    """``(is_causal, attn_mask)`` for SDPA: the ``is_causal`` hint whenever it is exact."""
    plain_causal = spec.causal and spec.window is None and (
        spec.causal_align == "top_left" or T == S)
    if plain_causal and spec.key_padding_mask is None and spec.mask is None:
        return True, None
    if spec.causal and spec.window is None and spec.causal_align == "bottom_right" and T == 1:
        # One query that is the last position sees every key: no causal mask needed.
        spec = MaskSpec(key_padding_mask=spec.key_padding_mask, mask=spec.mask)
    return False, spec.dense(T, S, device=device)


def sdpa_check(q, k, v, spec: MaskSpec, *, dropout_p: float, return_lse: bool):
    if return_lse:
        return "F.scaled_dot_product_attention does not return the log-sum-exp"
    return None


def sdpa_attention(q, k, v, spec: MaskSpec, *, dropout_p: float, scale: float,
                   return_lse: bool):
    """Attention through ``F.scaled_dot_product_attention``; contract in ``registry``."""
    is_causal, attn_mask = _as_sdpa_mask(spec, q.shape[-2], k.shape[-2], q.device)
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **gqa)
