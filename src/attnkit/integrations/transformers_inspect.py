"""``attnkit.inspect``: attention weights of chosen layers and heads of a transformers model,
recomputed from what attnkit's attention function saw during one normal forward.

::

    import attnkit.integrations.transformers          # registers "attnkit"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnkit")
    maps = attnkit.inspect(model, ids, layers=[0, 5], heads=[2, 3], tokenizer=tok)
    maps.model_view()                                 # or maps[5, 2] -> (B, T, S)

Why not ``output_attentions=True``: that runs the ``eager`` path (or attnkit's ``math``
backend) on every layer and keeps a ``(B, H, T, S)`` tensor per layer, ``4 H T^2`` bytes a
layer for one sequence. Here the model runs its normal fast path (SDPA, chunked, ...; the
weights are never built there), and :data:`.transformers.INSPECTOR` lets the attention
function hand this module, for the chosen layers only, the chosen query heads ``q`` (after
RoPE) and the key/value heads they read (GQA: query head ``h`` reads ``h // G``), the mask
description (causal, window, padding, packed documents, a static cache's visible keys), the
scaling, softcap, sinks and any position bias. After the forward the weights of each chosen
head are computed in float32 (or float64) by :func:`attnkit.functional.safe_softmax`'s
spec, block of rows by block of rows, so the extra memory is the kept q/k plus the result,
``4 T S`` bytes per head and sample, plus one block of scores.

What the weights are: the softmax of the (scaled, softcapped, biased) scores over the keys
the mask lets through, as transformers' ``eager`` ``output_attentions`` returns them. With
sinks (gpt-oss) the sink's share is left out, so a row sums to less than 1 (eager does the
same). A query row that sees no key (a left-padded position) is zeros; eager gives it
near-uniform weights from its ``finfo.min`` mask. Dropout is not applied (run the model in
``eval()`` mode to match what it computes).

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries, ``S``
keys, ``D`` head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional
from ..attention_maps import AttentionMaps
from ..spec import Call, MaskSpec
from . import transformers as _hf
from .transformers_masks import HFMask

__all__ = ["inspect"]

# Bytes of one block of float64 scores (B x rows x S); a few such temporaries live at once.
_BLOCK_BYTES = 8 * 2**20


@dataclass
class _Layer:
    """One chosen layer's attention call, cut to the chosen heads."""

    name: str
    q: Tensor  # (B, Hc, T, D): the chosen query heads, after RoPE
    k: Tensor  # (B, Hg, keys, D): the key heads they read
    kv_of: list  # chosen head j reads k[:, kv_of[j]]
    parts: dict  # attention()'s mask arguments: mask_mod= / causal= / mask=
    bias: Tensor | None  # broadcastable to (B, Hc, T, keys)
    scale: float
    softcap: float | None
    sinks: Tensor | None  # (Hc,)
    kv_length: int  # S; keys past `keys` (a static cache's empty tail) get weight 0
    info: str


def _pick_heads(t, H: int, idx: Tensor):
    """``t`` (broadcastable to ``(B, H, T, S)``) cut to the heads ``idx`` when it has them."""
    if isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] == H and H > 1:
        return t.index_select(1, idx.to(t.device))
    return t


def _describe(mask, parts: dict, scale: float, softcap, sinks, bias) -> str:
    if isinstance(mask, HFMask):
        text = mask.describe()
    elif "mask" in parts:
        text = f"dense mask {tuple(parts['mask'].shape)}"
    elif "causal" in parts:
        text = "causal"
    elif "mask_mod" in parts:
        text = parts["mask_mod"].describe()
    else:
        text = "all keys"
    text += f"; scale {scale:.4g}"
    if softcap is not None:
        text += f"; softcap {softcap:g}"
    if sinks is not None:
        text += "; sinks (their share left out)"
    if bias is not None:
        text += f"; bias {tuple(bias.shape)}"
    return text


class _Recorder:
    """Handed the attention calls of one forward (``INSPECTOR``); keeps the chosen ones.

    Layers are numbered by the order of the calls, as transformers numbers
    ``outputs.attentions``.
    """

    def __init__(self, layers, heads, names: dict):
        self.layers, self.heads, self.names = layers, heads, names
        self.calls = 0
        self.kept: dict[int, _Layer] = {}

    def record(self, module, query: Tensor, key: Tensor, *, parts: dict, bias, scaling,
               softcap, sinks, kv_length: int, mask) -> None:
        layer = self.calls
        self.calls += 1
        if self.layers is not None and layer not in self.layers:
            return
        B, H, T, D = query.shape
        groups = H // key.shape[1]
        heads = tuple(range(H)) if self.heads is None else self.heads
        if heads[-1] >= H:
            raise ValueError(f"heads={list(self.heads)} but layer {layer} has {H} query "
                             f"heads (0..{H - 1})")
        idx = torch.tensor(heads, device=query.device)
        kv = sorted({h // groups for h in heads})
        q = query.detach().index_select(1, idx)  # (B, Hc, T, D): a copy of the chosen heads
        k = key.detach().index_select(1, torch.tensor(kv, device=key.device))  # (B, Hg, keys, D)
        scale = 1.0 / math.sqrt(D) if scaling is None else float(scaling)
        parts = {name: _pick_heads(value, H, idx) for name, value in parts.items()}
        bias = _pick_heads(bias, H, idx)
        sinks = None if sinks is None else sinks.detach().index_select(0, idx.to(sinks.device))
        self.kept[layer] = _Layer(self.names.get(id(module), type(module).__name__), q, k,
                                  [kv.index(h // groups) for h in heads], parts, bias, scale,
                                  softcap, sinks, kv_length,
                                  _describe(mask, parts, scale, softcap, sinks, bias))


def _head_weights(layer: _Layer, j: int, dtype: torch.dtype) -> Tensor:
    """The weights ``(B, T, S)`` of chosen head ``j``, a block of rows at a time."""
    q = layer.q[:, j:j + 1].to(dtype)  # (B, 1, T, D)
    k = layer.k[:, layer.kv_of[j]:layer.kv_of[j] + 1].to(dtype)  # (B, 1, keys, D)
    B, _, T, _ = q.shape
    keys = k.shape[2]
    one = torch.tensor([j], device=q.device)
    parts = {n: _pick_heads(v, layer.q.shape[1], one) for n, v in layer.parts.items()}
    spec = MaskSpec.from_args(**parts, softcap=layer.softcap,
                              bias=_pick_heads(layer.bias, layer.q.shape[1], one),
                              sinks=None if layer.sinks is None else layer.sinks[j:j + 1])
    spec.validate(B, 1, T, keys)
    call = Call.of(q, k, spec, grad=False)  # the mask and scores lowered as the engine does
    v = q.new_zeros(B, 1, keys, 1)  # the output is not needed, only the weights
    out = torch.zeros(B, T, layer.kv_length, dtype=dtype, device=q.device)
    rows = max(1, _BLOCK_BYTES // (8 * B * max(keys, 1)))
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        mask = None if call.mask is None else call.mask.tile(B, 1, r0, r1, 0, keys, q.device)
        score = None if call.score is None else \
            (lambda s, b, h, qi, ki, r0=r0: call.score(s, b, h, qi + r0, ki))  # global rows
        _, w = functional.scaled_dot_product_attention(
            q[:, :, r0:r1], k, v, mask=mask, scale=layer.scale, score_mod=score,
            sinks=call.sinks, return_weights=True)  # w: (B, 1, rows, keys)
        out[:, r0:r1, :keys] = w[:, 0]
    return out


def _indices(value, name: str, limit: int | None, what: str):
    """``None`` or a sorted tuple of distinct ints in ``[0, limit)``."""
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{name} must be an int, a sequence of ints or None (all), got "
                        f"{type(value).__name__}") from None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise TypeError(f"{name} must be a non-empty sequence of ints or None (all), got "
                        f"{value!r}")
    negative = [i for i in items if i < 0]
    if negative:
        raise ValueError(f"{name}={value!r} has negative entries {negative}; count from 0")
    beyond = [i for i in items if limit is not None and i >= limit]
    if beyond:
        raise ValueError(f"{name}={value!r} has {beyond} out of range: the model has {limit} "
                         f"{what} (0..{limit - 1})")
    return tuple(sorted(set(items)))


def _check_model(model):
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None:
        raise TypeError(f"model must be a transformers model (a PreTrainedModel), got "
                        f"{type(model).__name__}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None)
    if impl not in _hf._OURS:
        hint = "" if not (isinstance(impl, str) and impl.endswith("_flash")) else \
            " (the flash convention's packed calls are not recorded)"
        raise ValueError(f"model runs attn_implementation={impl!r}{hint}, not attnkit's: "
                         f"inspect() reads q and k inside attnkit's attention function. Load "
                         f"it with attn_implementation=\"attnkit\" (after import "
                         f"attnkit.integrations.transformers) or call "
                         f"model.set_attn_implementation(\"attnkit\")")
    return config, text


def _token_text(tokenizer, ids: Tensor) -> list:
    if tokenizer is None:
        return [[str(i) for i in row] for row in ids.tolist()]
    return [[tokenizer.decode([i]) for i in row] for row in ids.tolist()]


def inspect(model, input_ids, *, layers=None, heads=None, attention_mask=None,
            tokenizer=None, dtype: torch.dtype = torch.float32,
            **forward_kwargs) -> AttentionMaps:
    """The attention weights of chosen layers and heads, from one forward on the fast path.

    Args:
        model: a transformers model loaded with ``attn_implementation="attnkit"`` (or a name
            from :func:`attnkit.integrations.transformers.register`). Its base model
            (``model.base_model``, no LM head) runs once under ``torch.no_grad()``.
        input_ids: ``(B, T)`` or ``(T,)`` token ids.
        layers: an int, ints, or None for all: attention calls in the order the forward
            makes them (for a decoder, the layer index; ``outputs.attentions``' order).
        heads: an int, ints, or None for all query heads.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding (left padding for
            decoders), passed to the model.
        tokenizer: decodes each id for the labels (``tokenizer.decode([id])``); else ids.
        dtype: ``torch.float32`` or ``torch.float64``, what the weights are computed and
            kept in.
        **forward_kwargs: passed to the forward as given (``position_ids`` ...; the
            weights are those of exactly this call). ``use_cache=False`` skips building the
            KV cache; transformers then also reads packed documents from restarting
            ``position_ids``, as in training (with a cache it does not).

    Returns:
        An :class:`attnkit.AttentionMaps`: ``maps[layer, head]`` is ``(B, T, S)``.

    Raises:
        TypeError: ``model`` is not a transformers model; ``input_ids`` not an integer
            tensor; ``layers``/``heads`` not ints; ``dtype`` not a torch dtype.
        ValueError: a model not on attnkit's attention; ``input_ids`` not 1-D or 2-D, empty,
            or longer than the model's ``max_position_embeddings``; an ``attention_mask``
            of another shape; a ``cache`` / ``past_key_values``; a layer or head out of
            range; another ``dtype``.
        RuntimeError: the forward made no attention call through attnkit.
    """
    config, text = _check_model(model)
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool or input_ids.is_complex():
        got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an integer tensor of token ids, got {got}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)  # (1, T)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) or (T,) with T >= 1, got shape "
                         f"{tuple(input_ids.shape)}")
    B, T = input_ids.shape
    longest = getattr(text, "max_position_embeddings", None)
    if isinstance(longest, int) and T > longest:
        raise ValueError(f"input_ids has {T} tokens but the model's max_position_embeddings "
                         f"is {longest}; pass at most {longest} (input_ids[:, :{longest}])")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be (B, T) = ({B}, {T}) like input_ids, got "
                         f"{tuple(attention_mask.shape)}")
    for name in ("cache", "past_key_values"):
        if forward_kwargs.get(name) is not None:
            raise ValueError(f"inspect() runs one forward over input_ids from the first "
                             f"token, got {name}=; pass the whole sequence as input_ids")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    decoder = not getattr(config, "is_encoder_decoder", False)
    n_layers = getattr(text, "num_hidden_layers", None) if decoder else None
    layers = _indices(layers, "layers", n_layers, "layers")
    heads = _indices(heads, "heads", getattr(text, "num_attention_heads", None), "heads")

    recorder = _Recorder(layers, heads, {id(m): n for n, m in model.named_modules()})
    base = getattr(model, "base_model", model)
    token = _hf.INSPECTOR.set(recorder)
    try:
        with torch.no_grad():
            base(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    finally:
        _hf.INSPECTOR.reset(token)
    if recorder.calls == 0:
        raise RuntimeError(f"the forward of {type(model).__name__} made no attention call "
                           f"through attnkit's attention function")
    missing = [l for l in (layers or ()) if l not in recorder.kept]
    if missing:
        raise ValueError(f"layers={list(layers)} but the forward made {recorder.calls} "
                         f"attention calls (layers 0..{recorder.calls - 1})")

    weights, names, info = {}, {}, {}
    for l in sorted(recorder.kept):
        layer = recorder.kept.pop(l)  # its q/k are freed once its heads are done
        chosen = heads if heads is not None else tuple(range(layer.q.shape[1]))
        for j, h in enumerate(chosen):
            weights[l, h] = _head_weights(layer, j, dtype).cpu()  # viewing happens on the host
        names[l], info[l] = layer.name, layer.info
    real = None if attention_mask is None else attention_mask.detach().to("cpu").bool()
    ids = input_ids.detach().cpu()
    S = next(iter(weights.values())).shape[-1]
    tokens = _token_text(tokenizer, ids)
    return AttentionMaps(weights, query_tokens=tokens,
                         key_tokens=tokens if S == T else None, query_real=real,
                         key_real=real if S == T else None, layer_names=names,
                         layer_info=info, title=f"{getattr(config, 'model_type', 'model')}")
