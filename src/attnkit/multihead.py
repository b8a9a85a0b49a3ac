"""The production multi-head attention module.

:class:`MultiHeadAttention` is the tutorial's module grown up, built by composition: linear
projections, optional rotary embeddings (:mod:`attnkit.rope`), an optional KV cache or
precomputed cross-attention context (:mod:`attnkit.kv_cache`), and :func:`attnkit.attention`
for the attention itself, so every backend, mask and grouped-query rule of the engine applies
unchanged.

Parameter layout (what ``state_dict`` holds):

* ``kv_dim`` unset or equal to ``embed_dim``: one fused ``qkv_proj`` with rows
  ``[q (H*D); k (Hkv*D); v (Hkv*D)]``. Self-attention is one matmul; cross-attention with a
  context of ``embed_dim`` features uses the q rows on ``x`` and the k/v rows on the context.
  With ``Hkv == H`` this is exactly ``nn.MultiheadAttention``'s ``in_proj_weight``.
* ``kv_dim != embed_dim``: ``q_proj`` (``E -> H*D``) and ``kv_proj`` (``kv_dim -> 2*Hkv*D``,
  rows ``[k; v]``); the module is cross-attention only.
* ``out_proj`` (``H*D -> E``) in both. Heads are contiguous: head ``h`` owns rows
  ``h*D:(h+1)*D`` of its block.

Shape letters: ``B`` batch, ``T`` query length, ``S`` key/value length, ``E`` embed dim,
``H`` query heads, ``Hkv`` key/value heads, ``D = E / H`` head dim.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import scores
from .backends import get_backend
from .engine import attention
from .kv_cache import ContextKV, KVCache
from .masks import and_masks, at_positions
from .rope import RoPE
from .spec import MaskSpec, window_mask

__all__ = ["MultiHeadAttention"]


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _warn_if_hides_a_row(name: str, mask, row_dims: str) -> None:
    """Warn when a bool mask hides every key of some row: most likely torch's polarity
    (True = padding / blocked) passed to attnkit's (True = may attend)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.numel() == 0 \
            or torch.compiler.is_compiling() or bool(mask.any(dim=-1).all()):
        return
    warnings.warn(f"{name} hides every key of some {row_dims} (a row with no True): attnkit's "
                  f"masks are True = may attend, the opposite of torch.nn.MultiheadAttention's "
                  f"(True = padding / not allowed). If this mask was written for torch, pass "
                  f"~{name}, or use attnkit.nn.MultiheadAttention (from_torch), which keeps "
                  f"torch's polarity. Rows that see no key give zeros.", UserWarning,
                  stacklevel=3)


def _check_tensor(name: str, t, features: int, feature_name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3 or t.shape[-1] != features:
        raise ValueError(f"{name} must be (B, length, {feature_name}={features}), got shape "
                         f"{tuple(t.shape)}")


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with GQA, RoPE, a KV cache and any backend.

    Args:
        embed_dim: ``E``, features in and out.
        num_heads: ``H``, query heads; must divide ``embed_dim`` (``D = E / H``).
        num_kv_heads: ``Hkv`` key/value heads (grouped-query attention; 1 is multi-query);
            must divide ``num_heads``. Default ``num_heads``.
        kv_dim: features of the cross-attention context; default ``embed_dim``.
        bias: add biases to the q/k/v projections (and, by default, ``out_proj``).
        out_bias: bias of ``out_proj``; default ``bias``.
        dropout: dropout on the attention weights, in training mode only.
        causal: each query sees only keys at or before its position.
        window: sliding-window attention, at most this many most recent keys per query
            (implies ``causal``).
        rope: ``True`` for rotary embeddings with base 10000, or an :class:`attnkit.rope.RoPE`
            for another base or scaling (self-attention only).
        backend: ``"auto"`` or a registered backend name (see :func:`attnkit.attention`).

    Raises:
        ValueError: sizes that are not positive ints, ``embed_dim % num_heads`` or
            ``num_heads % num_kv_heads`` not 0, ``dropout`` outside [0, 1), a bad
            ``window``, an unknown backend, a RoPE for another (or an odd) head dim, or
            ``rope`` on a cross-attention-only module (``kv_dim != embed_dim``).
        TypeError: ``rope`` that is not a bool or a RoPE.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 kv_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 dropout: float = 0.0, causal: bool = False, window: int | None = None,
                 rope: bool | RoPE | None = None, backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kv_dim = embed_dim if kv_dim is None else kv_dim
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("kv_dim", kv_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}) so every head gets embed_dim / num_heads features")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                             f"({num_kv_heads}): each key/value head serves a whole group")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if window is not None:
            window_mask(window)  # validates window with the engine's own message
        if backend != "auto":
            get_backend(backend)  # fail now, not at the first forward

        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.kv_dim = embed_dim // num_heads, kv_dim
        self.dropout, self.window = float(dropout), window
        self.causal = bool(causal) or window is not None  # a window only looks back (MaskSpec)
        self.backend = backend
        q_dim, kv_out = num_heads * self.head_dim, 2 * num_kv_heads * self.head_dim
        if kv_dim == embed_dim:
            self.qkv_proj = nn.Linear(embed_dim, q_dim + kv_out, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, q_dim, bias=bias)
            self.kv_proj = nn.Linear(kv_dim, kv_out, bias=bias)
        self.out_proj = nn.Linear(q_dim, embed_dim, bias=bias if out_bias is None else out_bias)
        self.rope = self._make_rope(rope)
        if self.rope is not None and kv_dim != embed_dim:
            raise ValueError(f"rope applies to self-attention, but kv_dim={kv_dim} != "
                             f"embed_dim={embed_dim} makes this module cross-attention only")

    def _make_rope(self, rope) -> RoPE | None:
        if rope is None or rope is False:
            return None
        if rope is True:
            if self.head_dim % 2:
                raise ValueError(f"rope needs an even head dim (features rotate in pairs), but "
                                 f"embed_dim / num_heads = {self.head_dim}")
            return RoPE(self.head_dim)
        if not isinstance(rope, RoPE):
            raise TypeError(f"rope must be True, False/None or an attnkit.rope.RoPE, got "
                            f"{type(rope).__name__}")
        if rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim ({rope.head_dim}) must equal the head dim "
                             f"embed_dim / num_heads = {self.head_dim}")
        return rope

    def extra_repr(self) -> str:
        extras = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}",
                  f"num_kv_heads={self.num_kv_heads}"]
        if self.kv_dim != self.embed_dim:
            extras.append(f"kv_dim={self.kv_dim}")
        extras += [f"causal={self.causal}", f"window={self.window}", f"dropout={self.dropout}",
                   f"backend={self.backend!r}"]
        return ", ".join(extras)

    def init_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                   device=None) -> KVCache:
        """A :class:`KVCache` sized for this layer (dtype/device default to the parameters').

        Raises:
            ValueError: ``batch_size`` or ``max_seq_len`` not a positive int.
        """
        weight = self.out_proj.weight
        return KVCache(batch_size, self.num_kv_heads, max_seq_len, self.head_dim,
                       dtype=weight.dtype if dtype is None else dtype,
                       device=weight.device if device is None else device)

    def cache_context(self, context: Tensor) -> ContextKV:
        """Project a cross-attention context once, to reuse at every decode step.

        ``forward(x, cache=self.cache_context(context))`` equals ``forward(x, context)`` (the
        same operations on the same numbers) but projects only the queries, so a decoder
        that attends to a fixed encoder output computes its keys/values once per input
        instead of once per generated token. Gradients flow through the result as usual.

        Args:
            context: ``(B, S, kv_dim)``, on the parameters' device and dtype.

        Returns:
            A :class:`ContextKV` with keys and values ``(B, Hkv, S, D)``, for this module only.

        Raises:
            TypeError: ``context`` not a tensor, or a dtype other than the parameters'.
            ValueError: a shape other than ``(B, S, kv_dim)``, another device, or a module
                with rope (self-attention only).
        """
        _check_tensor("context", context, self.kv_dim, "kv_dim")
        weight = self.out_proj.weight
        if self.rope is not None:
            raise ValueError("cache_context() makes a cross-attention context, but this module "
                             "uses rope, which applies to self-attention only")
        if context.device != weight.device:
            raise ValueError(f"context is on {context.device} but the module's parameters are "
                             f"on {weight.device}; move one of them")
        if context.dtype != weight.dtype and not torch.is_autocast_enabled(context.device.type):
            raise TypeError(f"context has dtype {context.dtype} but the module's parameters are "
                            f"{weight.dtype}; convert one of them")
        return ContextKV(*self._project_kv(context))

    def _check_context_kv(self, x, context, cache: ContextKV) -> None:
        if context is not None:
            raise ValueError("got both context= and a ContextKV in cache=; pass the context "
                             "either raw (context=) or projected once (cache=cache_context(...)), "
                             "not both")
        if self.rope is not None:
            raise ValueError("cache= got a ContextKV (cross-attention), but this module uses "
                             "rope, which applies to self-attention only; use the ContextKV with "
                             "the cross-attention layer whose cache_context() made it")
        if (cache.num_kv_heads, cache.head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"the ContextKV has num_kv_heads={cache.num_kv_heads}, head_dim="
                             f"{cache.head_dim} but this module has num_kv_heads="
                             f"{self.num_kv_heads}, head_dim={self.head_dim}; make it with this "
                             f"module's cache_context()")
        if cache.batch_size != x.shape[0]:
            raise ValueError(f"the ContextKV holds batch size {cache.batch_size} but x has "
                             f"{x.shape[0]}; make it from a context of this batch")
        if cache.k.dtype != x.dtype:
            raise TypeError(f"the ContextKV has dtype {cache.k.dtype} but x has {x.dtype}")
        if cache.k.device != x.device:
            raise ValueError(f"the ContextKV is on {cache.k.device} but x is on {x.device}")

    def _check_positions(self, x, positions) -> None:
        if self.rope is None:
            raise ValueError("positions= sets rotary positions, but this module has no rope; "
                             "build it with rope=True or drop positions=")
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be an integer torch.Tensor such as torch.arange(T), "
                            f"got {type(positions).__name__}")
        if positions.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"positions must be an integer tensor such as torch.arange(T), got "
                            f"dtype {positions.dtype}")
        B, T = x.shape[0], x.shape[1]
        if tuple(positions.shape) not in ((T,), (B, T)):
            raise ValueError(f"positions must have shape (T,) = ({T},) or (B, T) = ({B}, {T}), "
                             f"got {tuple(positions.shape)}")
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")

    def _check_inputs(self, x, context, cache, positions=None) -> None:
        _check_tensor("x", x, self.embed_dim, "embed_dim")
        weight = self.out_proj.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on "
                             f"{weight.device}; move one of them")
        # Under autocast the input may legitimately be bfloat16 while the weights are float32.
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are "
                            f"{weight.dtype}; convert one of them (x.to(...) or module.to(...))")
        if positions is not None and (context is not None or isinstance(cache, ContextKV)):
            raise ValueError("positions= are the rotary positions of self-attention; "
                             "cross-attention (context= or a ContextKV) takes none")
        if isinstance(cache, ContextKV):
            self._check_context_kv(x, context, cache)
            return
        if positions is not None:
            self._check_positions(x, positions)
        if context is None:
            if self.kv_dim != self.embed_dim:
                raise ValueError(f"this module projects keys/values from kv_dim={self.kv_dim} "
                                 f"features (cross-attention); pass context=(B, S, {self.kv_dim}) "
                                 f"or cache=cache_context(context)")
        else:
            _check_tensor("context", context, self.kv_dim, "kv_dim")
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"context batch size {context.shape[0]} differs from x's "
                                 f"{x.shape[0]}")
            if context.dtype != x.dtype:
                raise TypeError(f"context has dtype {context.dtype} but x has {x.dtype}")
            if context.device != x.device:
                raise ValueError(f"context is on {context.device} but x is on {x.device}")
            if cache is not None or self.rope is not None:
                raise ValueError("cache= and rope apply to self-attention only; a "
                                 "cross-attention context has its own positions")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from init_cache() or a ContextKV from "
                                f"cache_context(), got {type(cache).__name__}")
            cache.check_write(x.shape[0], x.shape[1])

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(B, H, T, D)``, k and v ``(B, Hkv, S, D)`` from the inputs."""
        if context is not None:
            return (self._project_q(x), *self._project_kv(context))
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), dim=-1)
        B, T = x.shape[0], x.shape[1]
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v

    def _split_fused(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """The fused ``qkv_proj`` as ``(w_q, b_q, w_kv, b_kv)``: q rows, then k/v rows."""
        q_rows, kv_rows = self.num_heads * self.head_dim, 2 * self.num_kv_heads * self.head_dim
        w_q, w_kv = self.qkv_proj.weight.split((q_rows, kv_rows))
        b = self.qkv_proj.bias
        b_q, b_kv = (None, None) if b is None else b.split((q_rows, kv_rows))
        return w_q, b_q, w_kv, b_kv

    def _project_q(self, x: Tensor) -> Tensor:
        """Cross-attention queries ``(B, H, T, D)`` from ``x`` ``(B, T, E)``."""
        if hasattr(self, "qkv_proj"):  # the fused rows: q reads x, k/v the context
            w_q, b_q, _, _ = self._split_fused()
            q = F.linear(x, w_q, b_q)  # (B, T, H*D)
        else:
            q = self.q_proj(x)  # (B, T, H*D)
        B, T = x.shape[0], x.shape[1]
        return q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values, each ``(B, Hkv, S, D)``, from ``(B, S, kv_dim)``."""
        if hasattr(self, "qkv_proj"):
            _, _, w_kv, b_kv = self._split_fused()
            kv = F.linear(context, w_kv, b_kv)  # (B, S, 2*Hkv*D)
        else:
            kv = self.kv_proj(context)  # (B, S, 2*Hkv*D)
        k, v = kv.chunk(2, dim=-1)  # (B, S, Hkv*D) each
        B, S, Hkv, D = context.shape[0], context.shape[1], self.num_kv_heads, self.head_dim
        k = k.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
        return k, v

    def forward(self, x: Tensor, context: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None, mask: Tensor | None = None,
                mask_mod=None, score_mod=None, sinks: Tensor | None = None, block_mask=None,
                cache: KVCache | ContextKV | None = None, positions: Tensor | None = None,
                need_weights: bool = False):
        """Attend from ``x`` to itself (or to ``context``) and project back to ``E``.

        Args:
            x: ``(B, T, E)``.
            context: ``(B, S, kv_dim)`` for cross-attention; ``None`` for self-attention.
            key_padding_mask: ``(B, S)`` bool, True = real key (the opposite of torch's
                ``nn.MultiheadAttention``; a row with no True warns, see below). With a
                :class:`KVCache`, ``S`` counts every cached position plus the new ones
                (``cache.pos + T``).
            mask: bool mask broadcastable to ``(B, H, T, S)``, True = may attend. A bool
                ``key_padding_mask`` or ``mask`` that hides every key of a row gives a
                ``UserWarning``: a sequence with no real token is rare, torch's polarity
                passed by mistake is not (``attnkit.nn.MultiheadAttention`` takes it).
            mask_mod: a mask description (:mod:`attnkit.masks`) or ``fn(b, h, q_idx,
                kv_idx)``, ANDed with the module's own ``causal``/``window``. It is written for
                the whole sequence: with a :class:`KVCache` it is evaluated at the step's
                global positions (queries from ``cache.pos``), so the same description works
                unchanged while decoding.
            score_mod: a score description (:mod:`attnkit.scores`) or ``fn(score, b, h,
                q_idx, kv_idx)``, at global positions like ``mask_mod``.
            sinks: ``(H,)`` float attention-sink logits, one per query head.
            block_mask: a ``BlockMask`` (torch's ``create_block_mask`` or
                :func:`attnkit.create_block_mask`): its ``mask_mod`` joins ``mask_mod``.
            cache: a :class:`KVCache` from :meth:`init_cache` (self-attention): the new
                keys/values are written at ``cache.pos`` (which advances by ``T``), rotary
                positions start there, and the queries attend over all ``cache.pos + T``
                cached positions with bottom-right causal alignment, so decoding token by
                token or chunk by chunk equals one full forward. Or a :class:`ContextKV` from
                :meth:`cache_context` (cross-attention): the queries attend to its
                precomputed keys/values, exactly as ``context=`` would, without projecting
                the context again. ``cache`` names whatever was computed before this call; a
                cross-attention layer has nothing to append, so the two kinds never mix.
            positions: integer rotary positions of the ``T`` new tokens, ``(T,)`` shared by
                the batch or ``(B, T)`` per sample (left-padded or packed batches). Default
                ``arange(cache.pos, cache.pos + T)``, or ``arange(T)`` without a cache. They
                only rotate queries and keys: cache slots and the causal mask still count
                positions from slot 0. Needs ``rope``; self-attention only.
            need_weights: also return the per-head attention weights ``(B, H, T, S)``. They
                come from the ``math`` backend, which builds the full ``B*H*T*S`` score
                tensor: O(B·H·T·S) memory and slower than the fused path; use it to inspect.

        Returns:
            ``out (B, T, E)``, or ``(out, weights)`` with ``need_weights``. Weights are after
            dropout; rows that see no key are all zero (and their output is ``out_proj``'s
            bias).

        Raises:
            TypeError: non-tensor inputs, a dtype other than the parameters' (outside
                autocast), non-bool masks, a cache that is neither a :class:`KVCache` nor a
                :class:`ContextKV`, non-integer ``positions``.
            ValueError: wrong rank or feature size, a context that does not fit,
                context with a cache or RoPE, a ContextKV with a context, on a rope module,
                or from a module with other ``num_kv_heads``/head dim, ``positions`` without
                rope, with cross-attention or of the wrong shape, masks that do not fit, a
                cache for another batch size, a device other than the parameters'.
            RuntimeError: the cache has no room for ``T`` more positions.
        """
        self._check_inputs(x, context, cache, positions)
        _warn_if_hides_a_row("key_padding_mask", key_padding_mask, "batch row")
        _warn_if_hides_a_row("mask", mask, "query")
        B, T, _ = x.shape
        if isinstance(cache, ContextKV):  # cross-attention, keys/values projected before
            context_kv, cache, S = cache, None, cache.length
        else:
            context_kv = None
            S = (context.shape[1] if context is not None
                 else T + (0 if cache is None else cache.pos))
        start = 0 if cache is None else cache.pos  # global position of the first query
        described = [m for m in (mask_mod, getattr(block_mask, "mask_mod", None)) if m is not None]
        if described:
            described = and_masks(*described)
            # With a cache, the description covers the whole sequence (global positions).
            mask_mod = described if cache is None else at_positions(described, start, 0)
        if score_mod is not None and cache is not None:
            score_mod = scores.at_positions(score_mod, start, 0)
        spec = MaskSpec.from_args(causal=self.causal, window=self.window, mask=mask,
                                  key_padding_mask=key_padding_mask,
                                  causal_align="top_left" if cache is None else "bottom_right",
                                  mask_mod=mask_mod or None, score_mod=score_mod, sinks=sinks)
        spec.validate(B, self.num_heads, T, S)  # before the cache is written

        if context_kv is not None:
            q, k, v = self._project_q(x), context_kv.k, context_kv.v  # k, v (B, Hkv, S, D)
        else:
            q, k, v = self._project(x, context)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(start, start + T, device=x.device)  # (T,)
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, pos + T, D) each

        dropout_p = self.dropout if self.training else 0.0  # the module owns the training check
        # One path into the engine; with need_weights auto picks a backend that declares
        # "weights" (math today), unless this module's own backend can return them.
        backend = self.backend
        if need_weights and (backend == "auto" or "weights" not in get_backend(backend).capabilities):
            backend = "auto"
        result = attention(q, k, v, spec=spec, dropout_p=dropout_p, backend=backend,
                           return_weights=need_weights)
        out, weights = result if need_weights else (result, None)  # out (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        out = self.out_proj(out)  # (B, T, E)
        return (out, weights) if need_weights else out

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, causal: bool = False,
                   window: int | None = None, backend: str = "auto") -> "MultiHeadAttention":
        """Copy an ``nn.MultiheadAttention``'s weights into a new module (same dtype/device).

        The result is attnkit's module: batch-first ``(B, T, E)`` input whatever the
        source's ``batch_first``, ``forward(x, context, ...)``, and masks in attnkit's
        polarity (True = may attend), the **opposite** of torch's boolean masks: pass
        ``~key_padding_mask``. To keep torch's call, shapes and polarity unchanged, use
        ``attnkit.nn.MultiheadAttention.from_torch(module)`` instead (the drop-in). A bool
        mask that hides every key of a row warns here (the likely sign of torch's polarity).

        Raises:
            TypeError: ``module`` is not an ``nn.MultiheadAttention``.
            ValueError: ``add_bias_kv``, ``add_zero_attn`` or ``kdim != vdim`` (no equivalent).
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch needs an nn.MultiheadAttention, got "
                            f"{type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn have no attnkit equivalent")
        if module.kdim != module.vdim:
            raise ValueError(f"kdim ({module.kdim}) != vdim ({module.vdim}): attnkit projects "
                             f"keys and values from one context (kv_dim)")
        # Building a module draws its initial weights from the global RNG; fork it so that
        # converting does not shift a caller's seeded stream.
        with torch.random.fork_rng(devices=[]):
            new = cls(module.embed_dim, module.num_heads, kv_dim=module.kdim,
                      bias=module.in_proj_bias is not None,
                      out_bias=module.out_proj.bias is not None, dropout=module.dropout,
                      causal=causal, window=window, backend=backend)
        new = new.to(module.out_proj.weight).train(module.training)
        with torch.no_grad():
            if hasattr(new, "qkv_proj"):  # kdim == vdim == embed_dim: one in_proj_weight
                new.qkv_proj.weight.copy_(module.in_proj_weight)
                if module.in_proj_bias is not None:
                    new.qkv_proj.bias.copy_(module.in_proj_bias)
            else:
                new.q_proj.weight.copy_(module.q_proj_weight)
                new.kv_proj.weight.copy_(torch.cat([module.k_proj_weight, module.v_proj_weight]))
                if module.in_proj_bias is not None:  # (3E,) = [q; k; v]
                    b_q, b_kv = module.in_proj_bias.split((module.embed_dim, 2 * module.embed_dim))
                    new.q_proj.bias.copy_(b_q)
                    new.kv_proj.bias.copy_(b_kv)
            new.out_proj.load_state_dict(module.out_proj.state_dict())
        return new

    @classmethod
    def from_tutorial(cls, module: nn.Module, *, backend: str = "auto") -> "MultiHeadAttention":
        """Copy the tutorial's ``MultiHeadAttention`` (:mod:`attnkit.tutorial`) weights.

        Reads ``W_query``, ``W_key``, ``W_value``, ``out_proj`` and ``num_heads`` (and the
        dropout probability from ``dropout``, an ``nn.Dropout``). The result is causal, like
        the tutorial's, without its ``context_length`` limit.

        Raises:
            ValueError: ``d_in != d_out`` (this module maps ``E`` features to ``E``).
        """
        w_q, w_k, w_v = module.W_query, module.W_key, module.W_value
        if w_q.in_features != w_q.out_features:
            raise ValueError(f"from_tutorial needs d_in == d_out, got d_in={w_q.in_features}, "
                             f"d_out={w_q.out_features}")
        drop = getattr(module, "dropout", None)
        with torch.random.fork_rng(devices=[]):  # leave the caller's seeded stream alone
            new = cls(w_q.out_features, module.num_heads, bias=w_q.bias is not None,
                      out_bias=module.out_proj.bias is not None,
                      dropout=drop.p if isinstance(drop, nn.Dropout) else 0.0, causal=True,
                      backend=backend)
        new = new.to(w_q.weight).train(module.training)
        with torch.no_grad():
            new.qkv_proj.weight.copy_(torch.cat([w_q.weight, w_k.weight, w_v.weight]))
            if w_q.bias is not None:
                new.qkv_proj.bias.copy_(torch.cat([w_q.bias, w_k.bias, w_v.bias]))
            new.out_proj.load_state_dict(module.out_proj.state_dict())
        return new
