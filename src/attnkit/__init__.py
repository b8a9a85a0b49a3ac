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
* :mod:`attnkit.tutorial` - the tutorial's ladder of attention classes, rung by rung.
* :class:`attnkit.MultiHeadAttention` - the production module (GQA, RoPE, KV cache,
  cached cross-attention context).
* :mod:`attnkit.viz` - attention heatmaps and head grids (optional extra ``viz``, lazy).
* :mod:`attnkit.apps` - what a person runs: walkthrough, translate, why-attention, gpt.
"""

from . import masks, scores, tutorial
from .backends import available_backends, register_backend
from .engine import Explanation, attention, explain
from .flex_api import create_block_mask, flex_attention
from .kv_cache import ContextKV, KVCache
from .masks import MaskSpec
from .multihead import MultiHeadAttention
from .rope import RoPE
from .varlen import varlen_attention

__version__ = "0.1.0"

__all__ = [
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
    "masks",
    "register_backend",
    "scores",
    "tutorial",
    "varlen_attention",
]
