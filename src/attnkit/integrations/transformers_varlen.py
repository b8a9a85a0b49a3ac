"""transformers' flash convention on attnkit: continuous batching and packed training on CPU.

::

    from attnkit.integrations.transformers_varlen import register
    name = register()                          # "attnkit_flash"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    outputs = model.generate_batch(inputs, generation_config)   # continuous batching

Why the name contains "flash": transformers' continuous batching (``generate_batch``,
``ContinuousBatchingManager``) accepts only ``sdpa``, ``paged|eager`` or a name containing
"flash", and hands a flash implementation packed sequences with ``cu_seq_lens_q`` /
``cu_seq_lens_k`` and no mask, so attention costs the sum of the sequences' work instead of
a dense ``total_q x total_k`` float mask (what ``sdpa`` and ``paged|eager`` build). Packed
training (``DataCollatorWithFlattening``) reaches the same convention through
``position_ids`` or ``cu_seq_lens_*``, and a 2-D padding mask is unpadded the way flash-attn
does it, so documents never see each other.

What :func:`register` does:

* ``AttentionInterface.register(name, flash_attention_forward)``;
* ``AttentionMaskInterface.register(name, transformers' flash_attention_mask)`` (the 2-D
  padding mask or None, as for ``flash_attention_2``);
* primes transformers' one-slot flash loader (``modeling_flash_attention_utils``, the private
  names in :data:`PRIVATE_NAMES`) with this name, because ``set_attn_implementation`` and
  ``from_pretrained(attn_implementation=...)`` otherwise try to import a flash-attn package for
  any name containing "flash"; and wraps its loader (``_lazy_imports``) to answer for
  attnkit's names, so loading a real flash implementation later in the same process does not
  break the next model created with this name.

Shape letters: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``T`` queries, ``S``
keys, ``D`` head dim; packed tensors are ``(total, heads, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import transformers
    import transformers.modeling_flash_attention_utils as _mfu
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
except ImportError as exc:  # pragma: no cover - needs transformers hidden
    raise ImportError("attnkit.integrations.transformers_varlen needs transformers 5.x: "
                      "pip install \"attnkit[hf]\"") from exc

if not transformers.__version__.startswith("5."):
    raise ImportError(f"attnkit.integrations.transformers_varlen supports transformers 5.x, "
                      f"found {transformers.__version__}: pip install \"transformers>=5,<6\"")

from ..engine import attention
from . import transformers_api as _api
from ..masks import sliding_window as _sliding_window
from ..varlen import varlen_attention

__all__ = ["NAME", "PRIVATE_NAMES", "enable", "flash_attention_forward", "register"]

#: The default implementation name (contains "flash", which continuous batching requires).
NAME = "attnkit_flash"

#: transformers' private names this module relies on (checked by a test).
PRIVATE_NAMES = ("modeling_flash_attention_utils._loaded_implementation",
                 "modeling_flash_attention_utils._lazy_imports",
                 "modeling_flash_attention_utils._flash_fn",
                 "modeling_flash_attention_utils._flash_varlen_fn",
                 "modeling_flash_attention_utils._flash_with_kvcache_fn",
                 "modeling_flash_attention_utils._pad_fn",
                 "modeling_flash_attention_utils._unpad_fn",
                 "modeling_flash_attention_utils._process_flash_kwargs_fn",
                 "modeling_flash_attention_utils._process_with_kvcache_kwargs_fn")

_BACKENDS: dict[str, str] = {}


def _window(sliding_window_size, key_length: int):
    """transformers' flash rule: ``(w - 1, w - 1)`` when the keys outrun the window."""
    if sliding_window_size is None or key_length <= sliding_window_size:
        return None
    return (sliding_window_size - 1, sliding_window_size - 1)


def _packed_starts(position_ids, B: int, T: int, S: int) -> Tensor | None:
    """``cu_seqlens`` from packed ``position_ids (1, T)`` (a position that does not follow
    its predecessor starts a sequence), or None when they describe one sequence."""
    if position_ids is None or B != 1 or T != S or T < 2:
        return None
    pos = position_ids.reshape(-1)  # (T,)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).reshape(-1) + 1
    if starts.numel() == 0:
        return None
    ends = torch.tensor([T], device=pos.device)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=pos.device), starts, ends])


def flash_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                            dropout: float = 0.0, scaling: float | None = None,
                            sliding_window: int | None = None, softcap: float | None = None,
                            is_causal: bool | None = None, s_aux: Tensor | None = None, *,
                            backend: str = "auto", **kwargs):
    """transformers' flash-convention attention on attnkit.

    Args:
        module: the calling attention layer (its ``is_causal`` is the default).
        query: ``(B, H, T, D)``.
        key, value: ``(B, Hkv, S, D)``.
        attention_mask: None or the 2-D padding mask ``(B, S)`` (True/1 = real token).
        dropout, scaling, sliding_window, softcap, is_causal: as transformers passes them;
            ``s_aux`` (``(H,)``) are attention sinks.
        backend: the attnkit backend for every call.
        **kwargs: ``cu_seq_lens_q``, ``cu_seq_lens_k`` (continuous batching, flattening
            collator) or ``position_ids`` (packed rows); the rest is ignored.

    Returns:
        ``(out (B, T, H, D), None)``.
    """
    B, H, T, D = query.shape
    S = key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    window = _window(sliding_window, S)
    common = dict(causal=causal, window=window, softcap=softcap, sinks=s_aux, scale=scaling,
                  dropout_p=float(dropout), backend=backend)
    q = query.transpose(1, 2)  # (B, T, H, D)
    k, v = key.transpose(1, 2), value.transpose(1, 2)  # (B, S, Hkv, D)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and attention_mask is None:
        out = varlen_attention(q.reshape(-1, H, D), k.reshape(-1, *k.shape[2:]),
                               v.reshape(-1, *v.shape[2:]), cu_q, cu_k, **common)
        return out.view(B, -1, H, D), None  # (B, T, H, D)
    if attention_mask is not None:  # unpad as flash-attn: real tokens only, per row
        keep_k = attention_mask.bool()  # (B, S)
        keep_q = torch.ones(B, T, dtype=torch.bool, device=q.device) if T == 1 and S > 1 \
            else keep_k[:, -T:]  # (B, T)
        idx_q, idx_k = keep_q.reshape(-1).nonzero()[:, 0], keep_k.reshape(-1).nonzero()[:, 0]
        cu_q = F.pad(keep_q.sum(1).cumsum(0), (1, 0))  # (B + 1,)
        cu_k = F.pad(keep_k.sum(1).cumsum(0), (1, 0))  # (B + 1,)
        packed = varlen_attention(q.reshape(B * T, H, D).index_select(0, idx_q),
                                  k.flatten(0, 1).index_select(0, idx_k),
                                  v.flatten(0, 1).index_select(0, idx_k), cu_q, cu_k, **common)
        out = packed.new_zeros(B * T, H, packed.shape[-1]).index_copy(0, idx_q, packed)
        return out.view(B, T, H, -1), None  # (B, T, H, D)
    cu = _packed_starts(kwargs.get("position_ids"), B, T, S)
    if cu is not None:
        out = varlen_attention(q[0], k[0], v[0], cu, cu, **common)  # (T, H, D)
        return out.unsqueeze(0), None  # (1, T, H, D)
    common.pop("window")
    mod = None if window is None else _sliding_window(*window, align="bottom_right")
    out = attention(query, key, value, causal_align="bottom_right", mask_mod=mod, **common)
    return out.transpose(1, 2), None  # (B, T, H, D)


def _not_loaded(*args, **kwargs):
    raise RuntimeError(f"{NAME}: transformers called a flash-attn kernel function; attnkit's "
                       f"implementation replaces the whole attention call, so this path "
                       f"should not be reached. Please report it with the model name.")


def _lazy_imports_for(original):
    """transformers' flash loader, answering for attnkit's names with stubs: a model created
    with one of them after another flash implementation was loaded (which replaces the one
    loaded name :func:`_prime` set) still loads, instead of asking the Hub for a kernel."""
    if getattr(original, "attnkit", False):
        return original

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation in _BACKENDS:
            return _not_loaded, _not_loaded, None, _not_loaded, _not_loaded
        return original(implementation, *args, **kwargs)

    _lazy_imports.attnkit = True
    return _lazy_imports


def _prime(name: str) -> None:
    """Make transformers' flash loader treat ``name`` as loaded (see the module docstring)."""
    _mfu._lazy_imports = _lazy_imports_for(_mfu._lazy_imports)
    _mfu._loaded_implementation = name
    _mfu._flash_fn = _mfu._flash_varlen_fn = _mfu._pad_fn = _mfu._unpad_fn = _not_loaded
    _mfu._flash_with_kvcache_fn = None  # no block-table decode path: CB reads its cache itself
    _mfu._process_flash_kwargs_fn = _mfu._process_with_kvcache_kwargs_fn = dict


def register(name: str = NAME, backend: str = "auto") -> str:
    """Register attnkit's flash-convention implementation with transformers.

    Args:
        name: the ``attn_implementation`` name; must contain "flash" (continuous batching
            accepts no other custom name) and must not be one of transformers' own.
        backend: ``"auto"`` or an attnkit backend name.

    Returns:
        ``name``.

    Raises:
        ValueError: a name without "flash" or one of transformers' flash_attention_*.
    """
    if "flash" not in name:
        raise ValueError(f"name must contain 'flash' for continuous batching to accept it, got "
                         f"{name!r}; e.g. {NAME!r}")
    if name.startswith(("flash_attention_", "paged|")):
        raise ValueError(f"{name!r} is one of transformers' own implementations; pick another, "
                         f"e.g. {NAME!r}")

    def attnkit_flash(module, query, key, value, attention_mask, **kwargs):
        return flash_attention_forward(module, query, key, value, attention_mask,
                                       backend=_BACKENDS[name], **kwargs)

    _BACKENDS[name] = backend
    AttentionInterface.register(name, attnkit_flash)
    AttentionMaskInterface.register(name, flash_attention_mask)
    _prime(name)
    return name


def unregister(name: str = NAME) -> None:
    """Remove a name :func:`register` added.

    Raises:
        ValueError: ``name`` was not registered by :func:`register`.
    """
    if name not in _BACKENDS:
        raise ValueError(f"{name!r} was not registered by attnkit's flash convention; "
                         f"registered: {sorted(_BACKENDS)}")
    _api.get("transformers.AttentionInterface._global_mapping").pop(name, None)
    _api.get("transformers.masking_utils.AttentionMaskInterface._global_mapping").pop(name,
                                                                                      None)
    del _BACKENDS[name]


def enable(model, name: str = NAME):
    """Switch a loaded model to ``name`` by writing its config. Returns the model.

    Needed for models that list their own flash kernels (gpt-oss's
    ``_compatible_flash_implementations``: built with any other flash name they swap in a Hub
    kernel): build them with another implementation, then ``enable(model)``. Also robust to
    another flash implementation having been loaded since :func:`register`.

    Raises:
        ValueError: ``name`` was not registered by :func:`register`.
    """
    if name not in _BACKENDS:
        raise ValueError(f"{name!r} is not registered: call "
                         f"attnkit.integrations.transformers_varlen.register({name!r}) first")
    for config in {id(c): c for c in (model.config, *(getattr(model.config, a, None) for a in
                   ("text_config",)))}.values():
        if config is not None:
            config._attn_implementation = name
    return model
