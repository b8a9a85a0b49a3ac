"""The tutorial's attention ladder, rung by rung, fixed and batched.

Each rung is a small function or class that a learner can diff against the one above it:

1. :func:`simple_self_attention` - no trainable weights: scores, softmax, weighted sum.
2. :class:`SelfAttentionV1` - trainable ``W_query``/``W_key``/``W_value`` as Parameters.
3. :class:`SelfAttentionV2` - the same projections as ``nn.Linear`` layers.
4. :func:`mask_after_softmax` / :func:`mask_before_softmax` - the two causal-masking methods.
5. :class:`CausalAttention` - a causal mask buffer and dropout on the weights.
6. :class:`MultiHeadAttentionWrapper` - several causal heads, outputs concatenated.
7. :class:`MultiHeadAttention` - one projection split into heads, plus ``out_proj``.

Names and argument order follow the tutorial (``d_in``, ``d_out``, ``context_length``,
``W_query``) so a reader can follow the text. Layers are created in the tutorial's order: with
``torch.manual_seed(123)`` before construction the rungs reproduce its published tables.
:func:`v1_from_v2` and :func:`mha_from_wrapper` prove that neighbouring rungs compute the same
thing. ``docs/tutorial.md`` walks the ladder with numbers and lists the seed code's bugs.

Shape letters: ``B`` batch, ``T`` tokens, ``H`` heads (``num_heads``), ``D`` head dim
(``d_out // num_heads``); ``d_in``/``d_out`` are the projection widths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import safe_softmax
from .masks import causal_mask

__all__ = [
    "simple_self_attention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "mask_after_softmax",
    "mask_before_softmax",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "v1_from_v2",
    "mha_from_wrapper",
]

_SHAPES = {2: "(T, d_in)", 3: "(B, T, d_in)"}


# --- validation shared by every rung -----------------------------------------------------

def _check_x(x, *, ranks, allowed=None, d_in=None, context_length=None, dtype=None,
             name="x") -> None:
    """Raise a message naming ``name``, what it got and what is allowed."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        ids = " (token ids need an nn.Embedding first)" if name == "x" else ""
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
                        f"convert with {name}.float(){ids}")
    if x.dim() not in ranks:
        allowed = allowed or " or ".join(_SHAPES[r] for r in ranks)
        hint = "; add a batch dim with x.unsqueeze(0)" if ranks == (3,) and x.dim() == 2 else ""
        raise ValueError(f"{name} must have shape {allowed}, got shape {tuple(x.shape)}{hint}")
    if d_in is not None and x.shape[-1] != d_in:
        raise ValueError(f"{name}'s last dim must equal d_in={d_in}, got shape {tuple(x.shape)}")
    if context_length is not None and x.shape[-2] > context_length:
        raise ValueError(f"{name} has {x.shape[-2]} tokens, more than context_length="
                         f"{context_length}; build the module with a larger context_length")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the weights are {dtype}; convert one "
                        f"of them, e.g. module.to({x.dtype})")


def _check_config(*, dropout=None, **sizes) -> None:
    for arg, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if "d_out" in sizes and sizes["d_out"] % sizes.get("num_heads", 1) != 0:
        raise ValueError(f"d_out must be divisible by num_heads, got d_out={sizes['d_out']} "
                         f"and num_heads={sizes['num_heads']}")
    if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                                or not 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def _resolve_mask(mask, t: Tensor, name: str) -> Tensor:
    """The bool mask to apply to ``t`` (..., T, S): the causal one when ``mask`` is None."""
    _check_x(t, ranks=range(2, 65), allowed="(..., T, S)", name=name)  # any rank >= 2
    T, S = t.shape[-2], t.shape[-1]
    if mask is None:
        return causal_mask(T, S, device=t.device)  # (T, S), True = may attend
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = may attend), got {got}; "
                        "for a 0/1 tensor use mask.bool()")
    try:
        ok = torch.broadcast_shapes(mask.shape, t.shape) == t.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {name}'s "
                         f"shape {tuple(t.shape)} (..., T, S)")
    return mask


# --- rung 1: no trainable weights ----------------------------------------------------------

def simple_self_attention(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's context vector is a softmax-weighted sum of all token embeddings.

    Scores are plain dot products of the embeddings with each other (no projections, no
    scaling); softmax turns each row into weights that sum to 1.

    Args:
        x: embeddings ``(T, d)`` or ``(B, T, d)``.

    Returns:
        ``(context, weights)``: context vectors shaped like ``x`` and weights ``(..., T, T)``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not 2-D or 3-D.
    """
    _check_x(x, ranks=(2, 3))
    attn_scores = x @ x.transpose(-2, -1)  # (..., T, T)
    attn_weights = torch.softmax(attn_scores, dim=-1)
    return attn_weights @ x, attn_weights  # (..., T, d), (..., T, T)


# --- rungs 2 and 3: trainable projections --------------------------------------------------

class SelfAttentionV1(nn.Module):
    """Self-attention with trainable query, key and value matrices (``nn.Parameter``).

    Adds over :func:`simple_self_attention`: each token is projected three ways
    (``x @ W_query``, ``x @ W_key``, ``x @ W_value``), and the scores are scaled by
    ``1/sqrt(d_k)`` so softmax does not saturate as ``d_out`` grows.

    Args:
        d_in: embedding width.
        d_out: projection width (``d_k``).

    Raises:
        ValueError: ``d_in`` or ``d_out`` is not a positive int.
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        _check_config(d_in=d_in, d_out=d_out)
        self.d_in, self.d_out = d_in, d_out
        # torch.rand, in this order, is what makes seed 123 reproduce the published tables.
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: Tensor, *, return_weights: bool = False):
        """Attend over the tokens of ``x``.

        Args:
            x: embeddings ``(T, d_in)`` or ``(B, T, d_in)``.
            return_weights: also return the attention weights ``(..., T, T)``.

        Returns:
            Context vectors ``(..., T, d_out)``, or ``(context, weights)``.

        Raises:
            TypeError: ``x`` is not a float tensor, or its dtype differs from the weights'.
            ValueError: ``x`` is not 2-D or 3-D, or its last dim is not ``d_in``.
        """
        _check_x(x, ranks=(2, 3), d_in=self.d_in, dtype=self.W_query.dtype)
        keys = x @ self.W_key  # (..., T, d_out)
        queries = x @ self.W_query  # (..., T, d_out)
        values = x @ self.W_value  # (..., T, d_out)
        attn_scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = attn_weights @ values  # (..., T, d_out)
        return (context_vec, attn_weights) if return_weights else context_vec


class SelfAttentionV2(nn.Module):
    """:class:`SelfAttentionV1` with ``nn.Linear`` projections.

    Adds over V1: ``nn.Linear`` stores its weight as ``(d_out, d_in)`` and computes
    ``x @ weight.T`` (+ an optional bias), and its default initialisation trains better than
    ``torch.rand``. :func:`v1_from_v2` copies V2's weights into a V1 with identical output.

    Args:
        d_in: embedding width.
        d_out: projection width (``d_k``).
        qkv_bias: give the three projections a bias.

    Raises:
        ValueError: ``d_in`` or ``d_out`` is not a positive int.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        _check_config(d_in=d_in, d_out=d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor, *, return_weights: bool = False):
        """Same contract as :meth:`SelfAttentionV1.forward`."""
        _check_x(x, ranks=(2, 3), d_in=self.d_in, dtype=self.W_query.weight.dtype)
        keys = self.W_key(x)  # (..., T, d_out)
        queries = self.W_query(x)  # (..., T, d_out)
        values = self.W_value(x)  # (..., T, d_out)
        attn_scores = queries @ keys.transpose(-2, -1)  # (..., T, T)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context_vec = attn_weights @ values  # (..., T, d_out)
        return (context_vec, attn_weights) if return_weights else context_vec


# --- rung 4: the two causal-masking methods ------------------------------------------------

def mask_after_softmax(attn_weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Causal method 1: zero the blocked weights, then renormalise each row to sum to 1.

    Args:
        attn_weights: softmax weights ``(..., T, S)``.
        mask: bool, broadcastable to ``(..., T, S)``, True = may attend; defaults to causal
            (query ``i`` sees keys ``j <= i``).

    Returns:
        Masked weights ``(..., T, S)``; a row with every key blocked is all zeros.

    Raises:
        TypeError: non-float ``attn_weights``; a mask that is not bool.
        ValueError: ``attn_weights`` with fewer than 2 dims; a mask that does not broadcast.
    """
    mask = _resolve_mask(mask, attn_weights, "attn_weights")
    masked_simple = attn_weights * mask  # (..., T, S), blocked cells now 0
    row_sums = masked_simple.sum(dim=-1, keepdim=True)  # (..., T, 1)
    # A fully blocked row sums to 0; dividing by 1 keeps it zero instead of 0/0 = NaN.
    return masked_simple / torch.where(row_sums > 0, row_sums, torch.ones_like(row_sums))


def mask_before_softmax(attn_scores: Tensor, d_k: int, mask: Tensor | None = None) -> Tensor:
    """Causal method 2: fill blocked scores with ``-inf``, scale by ``1/sqrt(d_k)``, softmax.

    ``exp(-inf) = 0``, so blocked keys get zero weight and the rest already sum to 1: the
    result equals :func:`mask_after_softmax` applied to ``softmax(attn_scores / sqrt(d_k))``
    with one normalisation instead of two.

    Args:
        attn_scores: unscaled scores ``(..., T, S)``.
        d_k: key width; scores are divided by ``sqrt(d_k)``.
        mask: as in :func:`mask_after_softmax`.

    Returns:
        Weights ``(..., T, S)``; a row with every key blocked is all zeros (not NaN).

    Raises:
        TypeError: non-float ``attn_scores``; a mask that is not bool.
        ValueError: ``d_k`` not a positive int; ``attn_scores`` with fewer than 2 dims; a
            mask that does not broadcast.
    """
    _check_config(d_k=d_k)
    mask = _resolve_mask(mask, attn_scores, "attn_scores")
    masked = attn_scores.masked_fill(~mask, -torch.inf)  # (..., T, S)
    # safe_softmax is torch.softmax except that an all -inf row gives zeros rather than NaN.
    return safe_softmax(masked / d_k ** 0.5, dim=-1)[0]


# --- rung 5: causal attention as a module --------------------------------------------------

class CausalAttention(nn.Module):
    """:class:`SelfAttentionV2` that hides future tokens and drops attention weights.

    Adds over V2: a ``(context_length, context_length)`` mask buffer applied with the ``-inf``
    method (:func:`mask_before_softmax`), and ``nn.Dropout`` on the attention weights, which
    is active in training mode only (``module.eval()`` turns it off). Input is batched.

    Args:
        d_in: embedding width.
        d_out: projection width.
        context_length: longest sequence the mask buffer covers.
        dropout: probability of zeroing an attention weight, in [0, 1).
        qkv_bias: give the three projections a bias.

    Raises:
        ValueError: a size that is not a positive int; ``dropout`` outside [0, 1).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 qkv_bias: bool = False):
        super().__init__()
        _check_config(d_in=d_in, d_out=d_out, context_length=context_length, dropout=dropout)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # The tutorial's form: True marks a BLOCKED cell (a future key). It is the negation
        # of the library's True = may attend rule (attnkit.masks.causal_mask).
        blocked = torch.ones(context_length, context_length, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("mask", blocked)  # (context_length, context_length)

    def forward(self, x: Tensor, *, return_weights: bool = False):
        """Attend causally over the tokens of ``x``.

        Args:
            x: embeddings ``(B, T, d_in)`` with ``T <= context_length``.
            return_weights: also return the weights ``(B, T, T)`` (after dropout).

        Returns:
            Context vectors ``(B, T, d_out)``, or ``(context, weights)``.

        Raises:
            TypeError: ``x`` is not a float tensor, or its dtype differs from the weights'.
            ValueError: ``x`` is not 3-D, its last dim is not ``d_in``, or
                ``T > context_length``.
        """
        _check_x(x, ranks=(3,), d_in=self.d_in, context_length=self.context_length,
                 dtype=self.W_query.weight.dtype)
        num_tokens = x.shape[1]
        keys = self.W_key(x)  # (B, T, d_out)
        queries = self.W_query(x)  # (B, T, d_out)
        values = self.W_value(x)  # (B, T, d_out)
        attn_scores = queries @ keys.transpose(-2, -1)  # (B, T, T)
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = attn_weights @ values  # (B, T, d_out)
        return (context_vec, attn_weights) if return_weights else context_vec


# --- rung 6: several heads side by side ----------------------------------------------------

class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent :class:`CausalAttention` heads, outputs concatenated.

    Adds over CausalAttention: several heads with their own weights, each free to attend to
    different positions. The output width is ``d_out * num_heads`` (each head is ``d_out``
    wide), and the heads run one after another. :func:`mha_from_wrapper` turns it into the
    equivalent :class:`MultiHeadAttention`.

    Args:
        d_in, d_out, context_length, dropout, qkv_bias: passed to every head.
        num_heads: number of heads.

    Raises:
        ValueError: as :class:`CausalAttention`; ``num_heads`` not a positive int.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False):
        super().__init__()
        _check_config(num_heads=num_heads)  # the heads check the rest
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias)
             for _ in range(num_heads)])

    def forward(self, x: Tensor, *, return_weights: bool = False):
        """Run every head on ``x`` and concatenate.

        Args:
            x: embeddings ``(B, T, d_in)`` with ``T <= context_length``.
            return_weights: also return the heads' weights ``(B, H, T, T)``.

        Returns:
            Context vectors ``(B, T, d_out * num_heads)``, or ``(context, weights)``.

        Raises:
            TypeError, ValueError: as :meth:`CausalAttention.forward`.
        """
        outputs = [head(x, return_weights=True) for head in self.heads]
        context_vec = torch.cat([out for out, _ in outputs], dim=-1)  # (B, T, H * d_out)
        if not return_weights:
            return context_vec
        return context_vec, torch.stack([w for _, w in outputs], dim=1)  # (B, H, T, T)


# --- rung 7: one projection split into heads -----------------------------------------------

class MultiHeadAttention(nn.Module):
    """Multi-head causal attention computed in one pass by splitting the projections.

    Adds over the wrapper: one ``(d_in -> d_out)`` projection each for queries, keys and
    values whose output is viewed as ``num_heads`` heads of ``head_dim = d_out // num_heads``,
    all heads attended in one batched matmul, and an ``out_proj`` (``Linear(d_out, d_out)``,
    with bias) that mixes the concatenated heads. The output width is ``d_out``.

    Args:
        d_in: embedding width.
        d_out: total output width; must be divisible by ``num_heads``.
        context_length: longest sequence the mask buffer covers.
        dropout: probability of zeroing an attention weight, in [0, 1); training mode only.
        num_heads: number of heads.
        qkv_bias: give the query/key/value projections a bias.

    Raises:
        ValueError: a size that is not a positive int; ``d_out % num_heads != 0``;
            ``dropout`` outside [0, 1).
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False):
        super().__init__()
        _check_config(d_in=d_in, d_out=d_out, context_length=context_length, dropout=dropout,
                      num_heads=num_heads)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        # Creation order W_query, W_key, W_value, out_proj fixes the seeded initial weights.
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # True marks a BLOCKED (future) key: the tutorial's form, the negation of the
        # library's True = may attend rule.
        blocked = torch.ones(context_length, context_length, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("mask", blocked)  # (context_length, context_length)

    def forward(self, x: Tensor, *, return_weights: bool = False):
        """Attend causally over the tokens of ``x`` with ``num_heads`` heads.

        Args:
            x: embeddings ``(B, T, d_in)`` with ``T <= context_length``.
            return_weights: also return the weights ``(B, H, T, T)`` (after dropout).

        Returns:
            Context vectors ``(B, T, d_out)`` (after ``out_proj``), or ``(context, weights)``.

        Raises:
            TypeError, ValueError: as :meth:`CausalAttention.forward`.
        """
        _check_x(x, ranks=(3,), d_in=self.d_in, context_length=self.context_length,
                 dtype=self.W_query.weight.dtype)
        b, num_tokens, _ = x.shape
        heads = (b, num_tokens, self.num_heads, self.head_dim)
        # Head h owns columns h*D:(h+1)*D of each projection's output.
        keys = self.W_key(x).view(heads).transpose(1, 2)  # (B, H, T, D)
        queries = self.W_query(x).view(heads).transpose(1, 2)  # (B, H, T, D)
        values = self.W_value(x).view(heads).transpose(1, 2)  # (B, H, T, D)

        attn_scores = queries @ keys.transpose(-2, -1)  # (B, H, T, T)
        attn_scores = attn_scores.masked_fill(self.mask[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (B, T, H, D)
        # The transpose made the memory non-contiguous; view() needs it laid out row by row.
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        context_vec = self.out_proj(context_vec)  # (B, T, d_out)
        return (context_vec, attn_weights) if return_weights else context_vec


# --- converters: neighbouring rungs compute the same thing ---------------------------------

def v1_from_v2(v2: SelfAttentionV2) -> SelfAttentionV1:
    """A :class:`SelfAttentionV1` with the same output as ``v2``.

    ``nn.Linear`` computes ``x @ weight.T`` with ``weight`` of shape ``(d_out, d_in)``, so
    each V1 Parameter ``(d_in, d_out)`` is the transposed Linear weight.

    Raises:
        TypeError: ``v2`` is not a SelfAttentionV2.
        ValueError: ``v2`` has biases (V1 has none).
    """
    if not isinstance(v2, SelfAttentionV2):
        raise TypeError(f"v2 must be a SelfAttentionV2, got {type(v2).__name__}")
    if v2.W_query.bias is not None:
        raise ValueError("v2 has qkv_bias=True, but SelfAttentionV1 has no bias; convert a "
                         "SelfAttentionV2 built with qkv_bias=False")
    # Building a module draws from the global RNG; fork it so converting does not shift a
    # reader's seeded stream.
    with torch.random.fork_rng(devices=[]):
        v1 = SelfAttentionV1(v2.d_in, v2.d_out)
    v1 = v1.to(v2.W_query.weight)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(v1, name).copy_(getattr(v2, name).weight.T)  # (d_in, d_out)
    return v1


def mha_from_wrapper(wrapper: MultiHeadAttentionWrapper) -> MultiHeadAttention:
    """A :class:`MultiHeadAttention` with the same output as ``wrapper``.

    Head ``h``'s ``(d_out, d_in)`` weights become rows ``h*d_out:(h+1)*d_out`` of the
    combined projection (the slice MultiHeadAttention's ``view`` hands to head ``h``), and
    ``out_proj`` is the identity with zero bias, so concatenation is all that happens after
    the heads. The result has ``d_out = num_heads * head width`` and the wrapper's dropout
    and training mode (dropout draws differ, so compare in eval mode or with dropout 0).

    Raises:
        TypeError: ``wrapper`` is not a MultiHeadAttentionWrapper.
    """
    if not isinstance(wrapper, MultiHeadAttentionWrapper):
        raise TypeError(f"wrapper must be a MultiHeadAttentionWrapper, got "
                        f"{type(wrapper).__name__}")
    heads, first = wrapper.heads, wrapper.heads[0]
    total = len(heads) * first.d_out
    with torch.random.fork_rng(devices=[]):
        mha = MultiHeadAttention(first.d_in, total, first.context_length, first.dropout.p,
                                 len(heads), qkv_bias=first.W_query.bias is not None)
    mha = mha.to(first.W_query.weight).train(wrapper.training)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            layer = getattr(mha, name)
            layer.weight.copy_(torch.cat([getattr(h, name).weight for h in heads]))  # (total, d_in)
            if layer.bias is not None:
                layer.bias.copy_(torch.cat([getattr(h, name).bias for h in heads]))  # (total,)
        mha.out_proj.weight.copy_(torch.eye(total))
        mha.out_proj.bias.zero_()
    return mha
