"""attnkit: attention mechanisms explained step by step and implemented for real training.

Layers, each using only the ones above it:

* :mod:`attnkit.functional` - the executable spec (plain-math attention).
* :mod:`attnkit.masks` - mask descriptions (``mask_mod``), composable, and builders
  (True = may attend); :mod:`attnkit.scores` - score functions (softcap, ALiBi, bias).
* :mod:`attnkit.backends` - ``math``, ``sdpa``, ``chunked``, ``flex``, ``decode`` engines
  behind one contract, each declaring its capabilities and cost.
* :func:`attnkit.attention` / :func:`attnkit.explain` - the engine entry point;
  :func:`attnkit.varlen_attention` - packed sequences, flash-attn's varlen convention.
* :func:`attnkit.flex_attention` / :func:`attnkit.create_block_mask` - FlexAttention's
  front end (all of torch's names in :mod:`attnkit.flex_api`), run eagerly (no compile,
  gradients on CPU).
* :mod:`attnkit.flash_attn` - flash-attn 2's functions (``flash_attn_func``, varlen, KV cache
  with block tables) and :mod:`attnkit.nn` - a drop-in ``torch.nn.MultiheadAttention``: the
  peers' own dialects on the engine (imported on use).
* :mod:`attnkit.tutorial` - the tutorial's ladder of attention classes, rung by rung.
* :class:`attnkit.MultiHeadAttention` - the production module (GQA, RoPE, KV cache,
  cached cross-attention context).
* :mod:`attnkit.viz` - attention heatmaps and head grids (optional extra ``viz``, lazy).
* :func:`attnkit.inspect` - the attention weights of chosen layers and heads of a
  transformers model running on attnkit, as an :class:`attnkit.AttentionMaps` (figures,
  zoom, summary); imports transformers only when called.
* :mod:`attnkit.apps` - what a person runs: walkthrough, translate, why-attention, gpt.
* :mod:`attnkit.widgets` - the explorer's views in a notebook (optional extra ``notebook``;
  not imported here). attnkit's own objects (``explain()``'s answer, block summaries and
  masks, mask descriptions) draw themselves in a notebook (:mod:`attnkit._display`).
"""

from . import masks, scores, tutorial
from .attention_maps import AttentionMaps
from .backends import available_backends, register_backend
from .engine import Explanation, attention, explain
from .flex_api import create_block_mask, flex_attention
from .kv_cache import ContextKV, KVCache
from .masks import MaskSpec
from .multihead import MultiHeadAttention
from .rope import RoPE
from .varlen import varlen_attention

__version__ = "0.1.0"


def inspect(model, input_ids, **kwargs) -> AttentionMaps:
    """The attention weights of chosen layers and heads of a transformers model on attnkit.

    :func:`attnkit.integrations.transformers_inspect.inspect` (arguments, returns and errors
    documented there); imported on the first call, so ``import attnkit`` never imports
    transformers.
    """
    from .integrations.transformers_inspect import inspect as _inspect

    return _inspect(model, input_ids, **kwargs)


__all__ = [
    "AttentionMaps",
    "ContextKV",
    "Explanation",
    "KVCache",
    "MaskSpec",
    "MultiHeadAttention",
    "RoPE",
    "attention",
    "available_backends",
    "create_block_mask",
    "explain",
    "flex_attention",
    "inspect",
    "masks",
    "register_backend",
    "scores",
    "tutorial",
    "varlen_attention",
]
