"""Sequence-to-sequence models built from :class:`attnkit.MultiHeadAttention`.

* :class:`TransformerSeq2Seq` - a small pre-norm Transformer encoder-decoder (the date
  translator). Every attention layer is an attnkit ``MultiHeadAttention``: encoder
  self-attention, causal decoder self-attention and decoder cross-attention. Greedy decoding
  keeps each decoder self-attention layer's keys/values in a :class:`attnkit.KVCache`; the
  cross-attention keys come from the encoder output, which is fixed for the whole decode.
* :class:`GRUSeq2Seq` - the tutorial's RNN encoder-decoder, with or without an attnkit
  cross-attention from the decoder state to every encoder state (``attnkit why-attention``).
* :class:`CharVocab` - a character vocabulary with named errors for unknown characters.

Shape letters: ``B`` batch, ``S`` source length, ``T`` target length, ``E`` model dim,
``H`` heads, ``V`` vocabulary size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .. import MultiHeadAttention

__all__ = ["CharVocab", "TransformerConfig", "TransformerSeq2Seq", "GRUSeq2Seq",
           "count_parameters"]


class CharVocab:
    """Characters to ids and back; id 0 is padding and ``specials`` follow it.

    Args:
        chars: the characters, in id order after the specials.
        specials: names of extra tokens (e.g. ``("<bos>",)``), ids 1, 2, ...

    Raises:
        ValueError: repeated characters.
    """

    def __init__(self, chars: str, specials: tuple[str, ...] = ()):
        if len(set(chars)) != len(chars):
            raise ValueError(f"chars must be distinct, got {chars!r}")
        self.chars, self.specials = chars, tuple(specials)
        self.offset = 1 + len(self.specials)
        self._ids = {c: i + self.offset for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return self.offset + len(self.chars)

    def special(self, name: str) -> int:
        """The id of special token ``name``."""
        return 1 + self.specials.index(name)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``'s characters.

        Raises:
            ValueError: characters outside the vocabulary (named in the message).
        """
        missing = self.unknown(text)
        if missing:
            raise ValueError(f"characters outside the vocabulary: "
                             f"{', '.join(repr(c) for c in missing)}")
        return [self._ids[c] for c in text]

    def decode(self, ids) -> str:
        """Characters of ``ids``, skipping padding and specials."""
        return "".join(self.chars[i - self.offset] for i in ids if i >= self.offset)

    def batch(self, texts: list[str], length: int | None = None) -> Tensor:
        """``(B, length)`` long tensor, right-padded with 0 (length: the longest text)."""
        rows = [self.encode(t) for t in texts]
        length = max(map(len, rows)) if length is None else length
        out = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out


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
        y = y + self.self_attn(self.norm_self(y), cache=cache)  # (B, T, E)
        out = self.cross_attn(self.norm_cross(y), memory, key_padding_mask=src_mask,
                              need_weights=need_weights)
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
        T = tgt_in.shape[1]
        positions = torch.arange(start, start + T, device=tgt_in.device)  # (T,)
        y = self.tgt_embed(tgt_in) + self.tgt_pos(positions)  # (B, T, E)
        weights = []
        for i, layer in enumerate(self.decoder):
            y, w = layer(y, memory, src_mask, None if caches is None else caches[i], need_weights)
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

        With ``use_cache`` each step feeds one token and the decoder self-attention reads the
        earlier keys/values from a :class:`attnkit.KVCache`; without it every step reruns the
        decoder on the whole prefix (the reference the cache is tested against).

        Args:
            src: source ids ``(B, S)``.
            length: tokens to generate, at most ``max_tgt_len``.
            use_cache: decode incrementally with KV caches.
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
        caches = ([layer.self_attn.init_cache(B, length) for layer in self.decoder]
                  if use_cache else None)
        logits, weights = [], []
        for step in range(length):
            if use_cache:
                out, w = self._decode(tokens[:, -1:], memory, src_mask, caches, step,
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


class GRUSeq2Seq(nn.Module):
    """GRU encoder-decoder, optionally with cross-attention from the decoder to the encoder.

    The encoder is a bidirectional GRU. Without attention the decoder starts from the final
    encoder states and sees nothing else of the source: the whole input is squeezed into one
    vector. With attention, each decoder state queries every encoder state through an
    attnkit :class:`~attnkit.MultiHeadAttention` (``kv_dim = 2 * hidden``) and the output
    layer reads ``[state; context]``.

    Args:
        vocab_size: ``V``; id 0 is padding, id 1 starts decoding.
        hidden_size: GRU width of each direction and of the decoder.
        embed_dim: token embedding width.
        attention: add the cross-attention.
        num_heads: heads of the cross-attention.

    Raises:
        ValueError: ``hidden_size`` not divisible by ``num_heads``.
    """

    BOS = 1

    def __init__(self, vocab_size: int, hidden_size: int, *, embed_dim: int = 32,
                 attention: bool = False, num_heads: int = 1):
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.encoder = nn.GRU(embed_dim, hidden_size, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden_size, hidden_size)
        self.decoder = nn.GRU(embed_dim, hidden_size, batch_first=True)
        self.cross_attn = (MultiHeadAttention(hidden_size, num_heads, kv_dim=2 * hidden_size)
                           if attention else None)
        self.head = nn.Linear(hidden_size * (2 if attention else 1), vocab_size)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(states (B, S, 2*hidden), src_mask (B, S), decoder start (1, B, hidden))``."""
        src_mask = src != 0
        lengths = src_mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(src), lengths, batch_first=True,
                                                   enforce_sorted=False)
        states, last = self.encoder(packed)  # last (2, B, hidden): both directions' ends
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True,
                                                     total_length=src.shape[1])
        start = torch.tanh(self.bridge(torch.cat([last[0], last[1]], dim=-1)))[None]
        return states, src_mask, start  # start (1, B, hidden)

    def _step(self, tgt_in, states, src_mask, hidden, need_weights=False):
        out, hidden = self.decoder(self.embed(tgt_in), hidden)  # out (B, T, hidden)
        weights = None
        if self.cross_attn is not None:
            context = self.cross_attn(out, states, key_padding_mask=src_mask,
                                      need_weights=need_weights)
            context, weights = context if need_weights else (context, None)
            out = torch.cat([out, context], dim=-1)  # (B, T, 2*hidden)
        return self.head(out), hidden, weights  # logits (B, T, V)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, V)`` for source ``(B, S)`` and target input ``(B, T)``."""
        states, src_mask, hidden = self.encode(src)
        return self._step(tgt_in, states, src_mask, hidden)[0]

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, length: int, *, need_weights: bool = False):
        """Greedy decoding of ``length`` tokens: ``tokens (B, L)`` [, ``weights (B, H, L, S)``].

        Raises:
            ValueError: ``need_weights`` on a model without attention.
        """
        if need_weights and self.cross_attn is None:
            raise ValueError("need_weights=True needs a model built with attention=True")
        states, src_mask, hidden = self.encode(src)
        token = torch.full((src.shape[0], 1), self.BOS, dtype=torch.long, device=src.device)
        tokens, weights = [], []
        for _ in range(length):
            logits, hidden, w = self._step(token, states, src_mask, hidden, need_weights)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(token)
            weights.append(w)
        tokens = torch.cat(tokens, dim=1)  # (B, L)
        return (tokens, torch.cat(weights, dim=2)) if need_weights else tokens
