"""The date translator's model, built from :class:`attnkit.MultiHeadAttention`.

* :class:`TransformerSeq2Seq` - a small pre-norm Transformer encoder-decoder (the date
  translator). Every attention layer is an attnkit ``MultiHeadAttention``: encoder
  self-attention, causal decoder self-attention and decoder cross-attention. Greedy decoding
  keeps each decoder self-attention layer's keys/values in a :class:`attnkit.KVCache`, and
  projects each cross-attention layer's keys/values from the encoder output (fixed for the
  whole decode) once per input, into a :class:`attnkit.ContextKV`.

Shape letters: ``B`` batch, ``S`` source length, ``T`` target length, ``E`` model dim,
``H`` heads, ``V`` vocabulary size.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ... import ContextKV, MultiHeadAttention
from .._vocab import CharVocab

__all__ = ["TransformerConfig", "TransformerSeq2Seq", "count_parameters", "SOURCE_VOCAB",
           "TARGET_VOCAB", "MAX_SOURCE_LEN"]

# The network's alphabets: lower-case dates in, ISO dates out.
SOURCE_VOCAB = CharVocab(string.ascii_lowercase + string.digits + " ,./-", padding=True)
TARGET_VOCAB = CharVocab(string.digits + "-", specials=("<bos>",), padding=True)
MAX_SOURCE_LEN = 40


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a :class:`TransformerSeq2Seq` (all positive ints, ``embed_dim % num_heads == 0``).

    Raises:
        ValueError: a size that is not a positive int, or heads that do not divide the width.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    max_src_len: int = 40
    max_tgt_len: int = 10
    embed_dim: int = 64
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ff_dim: int = 128

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")


def _feed_forward(cfg: TransformerConfig) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cfg.embed_dim), nn.Linear(cfg.embed_dim, cfg.ff_dim),
                         nn.GELU(), nn.Linear(cfg.ff_dim, cfg.embed_dim))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.self_attn = MultiHeadAttention(cfg.embed_dim, cfg.num_heads)
        self.ff = _feed_forward(cfg)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm(x), key_padding_mask=src_mask)  # (B, S, E)
        return x + self.ff(x)


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_self, self.norm_cross = nn.LayerNorm(cfg.embed_dim), nn.LayerNorm(cfg.embed_dim)
        self.self_attn = MultiHeadAttention(cfg.embed_dim, cfg.num_heads, causal=True)
        self.cross_attn = MultiHeadAttention(cfg.embed_dim, cfg.num_heads)
        self.ff = _feed_forward(cfg)

    def forward(self, y, memory, src_mask, cache=None, need_weights=False):
        """``memory``: the encoder output ``(B, S, E)``, or this layer's ContextKV of it."""
        y = y + self.self_attn(self.norm_self(y), cache=cache)  # (B, T, E)
        source = {"cache": memory} if isinstance(memory, ContextKV) else {"context": memory}
        out = self.cross_attn(self.norm_cross(y), key_padding_mask=src_mask,
                              need_weights=need_weights, **source)
        out, weights = out if need_weights else (out, None)  # weights (B, H, T, S)
        y = y + out
        return y + self.ff(y), weights


class TransformerSeq2Seq(nn.Module):
    """Pre-norm Transformer encoder-decoder with learned positions and char vocabularies.

    Source id 0 is padding (masked out of every attention); target id 1 starts decoding.

    Args:
        config: the sizes.
    """

    BOS = 1

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.embed_dim)
        self.src_pos = nn.Embedding(cfg.max_src_len, cfg.embed_dim)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.embed_dim)
        self.tgt_pos = nn.Embedding(cfg.max_tgt_len, cfg.embed_dim)
        self.encoder = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(cfg.embed_dim), nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.tgt_vocab_size)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Encode source ids ``(B, S)``: ``(memory (B, S, E), src_mask (B, S) True = real)``.

        Raises:
            ValueError: ``S`` above ``max_src_len``.
        """
        S = src.shape[1]
        if S > self.config.max_src_len:
            raise ValueError(f"source length {S} exceeds max_src_len={self.config.max_src_len}")
        src_mask = src != 0
        x = self.src_embed(src) + self.src_pos(torch.arange(S, device=src.device))  # (B, S, E)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def _decode(self, tgt_in, memory, src_mask, caches=None, start=0, need_weights=False):
        """``memory``: the encoder output ``(B, S, E)``, or one ContextKV per decoder layer."""
        T = tgt_in.shape[1]
        positions = torch.arange(start, start + T, device=tgt_in.device)  # (T,)
        y = self.tgt_embed(tgt_in) + self.tgt_pos(positions)  # (B, T, E)
        memories = memory if isinstance(memory, list) else [memory] * len(self.decoder)
        weights = []
        for i, layer in enumerate(self.decoder):
            y, w = layer(y, memories[i], src_mask, None if caches is None else caches[i],
                         need_weights)
            weights.append(w)
        return self.head(self.dec_norm(y)), weights  # logits (B, T, V)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, V)`` for source ``(B, S)`` and target input ``(B, T)``.

        Raises:
            ValueError: a source or target longer than the configured maximum.
        """
        if tgt_in.shape[1] > self.config.max_tgt_len:
            raise ValueError(f"target length {tgt_in.shape[1]} exceeds max_tgt_len="
                             f"{self.config.max_tgt_len}")
        memory, src_mask = self.encode(src)
        return self._decode(tgt_in, memory, src_mask)[0]

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, length: int | None = None, *, use_cache: bool = True,
                      need_weights: bool = False):
        """Greedy decoding of ``length`` tokens (default ``max_tgt_len``).

        With ``use_cache`` each step feeds one token, the decoder self-attention reads the
        earlier keys/values from a :class:`attnkit.KVCache`, and each cross-attention layer
        reads the encoder output's keys/values from a :class:`attnkit.ContextKV` projected
        once before the first step. Without it every step reruns the decoder on the whole
        prefix and re-projects the encoder output (the reference the caches are tested
        against).

        Args:
            src: source ids ``(B, S)``.
            length: tokens to generate, at most ``max_tgt_len``.
            use_cache: decode incrementally with KV caches and cached cross-attention K/V.
            need_weights: also return cross-attention weights.

        Returns:
            ``(tokens (B, L), logits (B, L, V))``, plus ``weights (layers, B, H, L, S)`` with
            ``need_weights``.

        Raises:
            ValueError: ``length`` outside ``[1, max_tgt_len]``, or a source too long.
        """
        length = self.config.max_tgt_len if length is None else length
        if not 1 <= length <= self.config.max_tgt_len:
            raise ValueError(f"length must be in [1, {self.config.max_tgt_len}], got {length}")
        memory, src_mask = self.encode(src)
        B = src.shape[0]
        tokens = torch.full((B, 1), self.BOS, dtype=torch.long, device=src.device)
        caches = contexts = None
        if use_cache:  # self-attention K/V grow per step; cross-attention K/V are fixed
            caches = [layer.self_attn.init_cache(B, length) for layer in self.decoder]
            contexts = [layer.cross_attn.cache_context(memory) for layer in self.decoder]
        logits, weights = [], []
        for step in range(length):
            if use_cache:
                out, w = self._decode(tokens[:, -1:], contexts, src_mask, caches, step,
                                      need_weights)
            else:
                out, w = self._decode(tokens, memory, src_mask, None, 0, need_weights)
                w = [x[:, :, -1:] for x in w] if need_weights else w  # last query only
            logits.append(out[:, -1])  # (B, V)
            weights.append(w)
            tokens = torch.cat([tokens, out[:, -1].argmax(-1, keepdim=True)], dim=1)
        result = (tokens[:, 1:], torch.stack(logits, dim=1))  # (B, L), (B, L, V)
        if need_weights:
            per_layer = [torch.cat([step_w[i] for step_w in weights], dim=2)  # (B, H, L, S)
                         for i in range(len(self.decoder))]
            result += (torch.stack(per_layer),)  # (layers, B, H, L, S)
        return result
