"""``attnkit.nn``: ``torch.nn.MultiheadAttention``, drop-in, running on attnkit's engine.

:class:`MultiheadAttention` *is* a ``torch.nn.MultiheadAttention`` (a subclass): the same
constructor, parameters, initialisation and ``state_dict`` keys (``in_proj_weight`` or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight``, ``in_proj_bias``, ``out_proj.*``,
``bias_k``, ``bias_v``), so ``load_state_dict`` works both ways and ``isinstance`` checks
pass. Only ``forward`` changes: the projections are torch's, the attention is
:func:`attnkit.attention` (every backend, described masks, exact gradients).

It keeps torch's conventions exactly, including the ones attnkit's own API reverses: boolean
masks mark what is **not** allowed (``key_padding_mask`` True = padding, ``attn_mask`` True =
blocked), float masks are added to the scores, inputs are ``(L, N, E)`` unless
``batch_first``, unbatched ``(L, E)`` inputs work, ``need_weights`` defaults to True and
``average_attn_weights`` averages them over heads, ``is_causal`` is a hint that
``attn_mask`` is the causal mask (used as torch uses it). Error messages are torch's; shape
and mask-type errors are ``ValueError``/``TypeError`` that are also ``AssertionError`` (what
torch raises).

One deliberate difference: a query whose keys are all masked gives zeros (and zero weights),
where torch gives NaN (attnkit's rule for fully masked rows).

Shape letters: ``N`` batch, ``L`` target length, ``S`` source length, ``E`` embed dim, ``H``
heads, ``D = E / H``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import get_backend
from .engine import attention

__all__ = ["MultiheadAttention", "MultiheadAttentionShapeError", "MultiheadAttentionTypeError"]


class MultiheadAttentionShapeError(ValueError, AssertionError):
    """A shape torch's ``MultiheadAttention`` refuses; torch raises ``AssertionError``,
    attnkit's rule is ``ValueError``: this is both."""


class MultiheadAttentionTypeError(TypeError, AssertionError):
    """A mask dtype torch's ``MultiheadAttention`` refuses (``AssertionError`` there,
    ``TypeError`` by attnkit's rule): both."""


def _shape_check(query, key, value, key_padding_mask, attn_mask, num_heads) -> bool:
    """torch's shape rules (and messages); returns whether the input is batched."""
    if query.dim() not in (2, 3):
        raise MultiheadAttentionShapeError(f"query should be unbatched 2D or batched 3D tensor "
                                           f"but received {query.dim()}-D query tensor")
    batched = query.dim() == 3
    kind, want = ("batched (3-D)", 3) if batched else ("unbatched (2-D)", 2)
    if key.dim() != want or value.dim() != want:
        raise MultiheadAttentionShapeError(
            f"For {kind} `query`, expected `key` and `value` to be {want}-D but found "
            f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != want - 1:
        raise MultiheadAttentionShapeError(
            f"For {kind} `query`, expected `key_padding_mask` to be `None` or {want - 1}-D but "
            f"found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None:
        if attn_mask.dim() not in (2, 3):
            raise MultiheadAttentionShapeError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                f"{attn_mask.dim()}-D tensor instead")
        expected = (num_heads, query.shape[0], key.shape[0])
        if not batched and attn_mask.dim() == 3 and tuple(attn_mask.shape) != expected:
            raise MultiheadAttentionShapeError(f"Expected `attn_mask` shape to be {expected} "
                                               f"but got {attn_mask.shape}")
    return batched


def _check_key_value(key, value, batched: bool, batch_first: bool, same_dim: bool) -> None:
    """torch's key/value agreement check, its shapes shown as torch shows them (sequence
    first, unbatched inputs with a batch of 1)."""
    def seq_first(t):
        return t.unsqueeze(1) if not batched else t.transpose(0, 1) if batch_first else t
    key, value = seq_first(key), seq_first(value)
    if same_dim and key.shape != value.shape:
        raise MultiheadAttentionShapeError(f"key shape {key.shape} does not match value shape "
                                           f"{value.shape}")
    if not same_dim and key.shape[:2] != value.shape[:2]:
        raise MultiheadAttentionShapeError(f"key's sequence and batch dims {key.shape[:2]} do "
                                           f"not match value's {value.shape[:2]}")


def _check_mask_type(mask, name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise MultiheadAttentionTypeError(f"only bool and floating types of {name} are "
                                          f"supported, got {mask.dtype}")


def _pad_key(mask: Tensor | None) -> Tensor | None:
    """One more key column (bias_k or the zero key): visible (False / 0.0)."""
    return None if mask is None else F.pad(mask, (0, 1))


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on attnkit's engine (see the module docstring).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
        batch_first, device, dtype: exactly ``torch.nn.MultiheadAttention``'s.
        backend: attnkit's backend for the attention (``"auto"`` or a registered name).

    Raises:
        ValueError: what torch raises for the sizes, and an unknown ``backend``.
        AssertionError: ``embed_dim`` not divisible by ``num_heads`` (torch's check).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend: str = "auto"):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
                         kdim, vdim, batch_first, device, dtype)
        if backend != "auto":
            get_backend(backend)  # fail now, not at the first forward
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *,
                   backend: str = "auto") -> "MultiheadAttention":
        """The drop-in twin of a ``torch.nn.MultiheadAttention``: same options, weights
        (``load_state_dict``), dtype, device and training mode; torch's mask polarity.

        Raises:
            TypeError: ``module`` is not an ``nn.MultiheadAttention``.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch needs a torch.nn.MultiheadAttention, got "
                            f"{type(module).__name__}")
        weight = module.out_proj.weight
        with torch.random.fork_rng(devices=[]):  # leave the caller's seeded stream alone
            new = cls(module.embed_dim, module.num_heads, dropout=module.dropout,
                      bias=module.in_proj_bias is not None,
                      add_bias_kv=module.bias_k is not None,
                      add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                      batch_first=module.batch_first, device=weight.device, dtype=weight.dtype,
                      backend=backend)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """A plain ``torch.nn.MultiheadAttention`` with this module's options and weights."""
        weight = self.out_proj.weight
        with torch.random.fork_rng(devices=[]):
            plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout,
                                          self.in_proj_bias is not None,
                                          self.bias_k is not None, self.add_zero_attn,
                                          self.kdim, self.vdim, self.batch_first,
                                          weight.device, weight.dtype)
        plain.load_state_dict(self.state_dict())
        return plain.train(self.training)

    def _project(self, query, key, value) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(N, L, E)``, k ``(N, S, E)``, v ``(N, S, E)``: torch's in-projections."""
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, b_q),
                    F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        if query is key and key is value:  # self-attention: one matmul
            return F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``torch.nn.MultiheadAttention.forward``, same arguments, shapes and polarity.

        Args:
            query: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)``.
            key: ``(S, N, kdim)`` (batch first likewise) or ``(S, kdim)``.
            value: ``(S, N, vdim)`` or ``(S, vdim)``.
            key_padding_mask: ``(N, S)`` or ``(S,)``: bool True = padding (ignored), or
                float added to the scores.
            need_weights: also return the attention weights (the ``math`` backend builds
                them: pass False for the fast path, as with torch).
            attn_mask: ``(L, S)`` or ``(N * H, L, S)``: bool True = not allowed, or float
                added to the scores.
            average_attn_weights: average the weights over heads.
            is_causal: a hint that ``attn_mask`` is the causal mask (it must be given):
                without ``key_padding_mask`` and ``need_weights`` the causal kind is used
                and ``attn_mask`` is not read, as in torch.

        Returns:
            ``(attn_output, attn_weights)``: output shaped like ``query`` with ``E``
            features; weights ``(N, L, S)`` (``(N, H, L, S)`` without averaging; no ``N``
            when unbatched) or None.

        Raises:
            MultiheadAttentionShapeError: (ValueError and AssertionError) torch's shape
                checks, with torch's messages.
            MultiheadAttentionTypeError: (TypeError and AssertionError) masks that are
                neither bool nor float.
            RuntimeError: ``is_causal`` without ``attn_mask``, or an ``attn_mask`` of the
                wrong size (torch's messages).
        """
        batched = _shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        _check_mask_type(key_padding_mask, "key_padding_mask")
        _check_mask_type(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None \
                and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        _check_key_value(key, value, batched, self.batch_first, self._qkv_same_embed_dim)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use "
                               "the Transformer module method `generate_square_subsequent_mask` "
                               "to create this mask.")
        if not batched:  # one sequence: add the batch dim in front, batch-first from here
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            same_kv, same_qk = key is value, query is key
            key = key.transpose(0, 1)  # (N, S, kdim)
            value = key if same_kv else value.transpose(0, 1)  # (N, S, vdim)
            query = key if same_qk and same_kv else query.transpose(0, 1)  # (N, L, E)
        out, weights = self._attend(query, key, value, key_padding_mask, attn_mask,
                                    need_weights, is_causal)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S)
        if not batched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend(self, query, key, value, key_padding_mask, attn_mask, need_weights,
                is_causal):
        """Batch-first ``(out (N, L, E), weights (N, H, L, S) or None)``."""
        N, L, E = query.shape
        if E != self.embed_dim:
            raise MultiheadAttentionShapeError(f"was expecting embedding dimension of "
                                               f"{self.embed_dim}, but got {E}")
        S, H, D = key.shape[1], self.num_heads, self.head_dim
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if attn_mask is not None and not use_causal:
            want = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                                   f"{attn_mask.shape}, but should be {torch.Size(want)}.")
        if key_padding_mask is not None:
            for i, want in enumerate((N, S)):
                if key_padding_mask.shape[i] != want:
                    raise MultiheadAttentionShapeError(
                        f"Expected key_padded_mask.shape[{i}] to be {want}, but got "
                        f"{key_padding_mask.shape[i]}")
        attn_mask = None if use_causal else attn_mask
        q, k, v = self._project(query, key, value)  # (N, L, E), (N, S, E), (N, S, E)
        if self.bias_k is not None and self.bias_v is not None:  # one learned key more
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)  # (N, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)  # (N, S + 1, E)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q = q.reshape(N, L, H, D).transpose(1, 2)  # (N, H, L, D)
        k = k.reshape(N, k.shape[1], H, D).transpose(1, 2)  # (N, H, S', D)
        v = v.reshape(N, v.shape[1], H, D).transpose(1, 2)  # (N, H, S', D)
        if self.add_zero_attn:  # one all-zero key and value more
            zero = k.new_zeros(N, H, 1, D)
            k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)  # (N, H, S'', D)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        mask, bias = None, None  # torch's masks in attnkit's terms (True = may attend)
        if attn_mask is not None:
            m = attn_mask if attn_mask.dim() == 2 else \
                attn_mask.view(N, H, L, attn_mask.shape[-1])  # (L, S) or (N, H, L, S)
            mask, bias = (~m, None) if m.dtype == torch.bool else (None, m)
        kpm = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                kpm = ~key_padding_mask  # (N, S): True = real key
            else:
                add = key_padding_mask.view(N, 1, 1, -1)  # (N, 1, 1, S)
                bias = add if bias is None else bias + add
        dropout_p = self.dropout if self.training else 0.0
        backend = self.backend
        if need_weights and backend != "auto" and "weights" not in get_backend(backend).capabilities:
            backend = "auto"  # auto picks a backend that builds the weights
        res = attention(q, k, v, mask=mask, key_padding_mask=kpm, bias=bias,
                        causal=use_causal, dropout_p=dropout_p, backend=backend,
                        return_weights=need_weights)
        out, weights = res if need_weights else (res, None)  # (N, H, L, D), (N, H, L, S)
        out = out.transpose(1, 2).reshape(N, L, E)  # (N, L, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights
