"""The why-attention models: the tutorial's RNN encoder-decoder, with or without attention.

:class:`GRUSeq2Seq` is a GRU encoder-decoder; with ``attention=True`` every decoder state
queries every encoder state through an attnkit :class:`~attnkit.MultiHeadAttention`.

Shape letters: ``B`` batch, ``S`` source length, ``T`` target length, ``V`` vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import ContextKV, MultiHeadAttention

__all__ = ["GRUSeq2Seq"]


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
        """``states``: encoder states ``(B, S, 2*hidden)``, or the cross-attention's ContextKV."""
        out, hidden = self.decoder(self.embed(tgt_in), hidden)  # out (B, T, hidden)
        weights = None
        if self.cross_attn is not None:
            source = {"cache": states} if isinstance(states, ContextKV) else {"context": states}
            context = self.cross_attn(out, key_padding_mask=src_mask, need_weights=need_weights,
                                      **source)
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

        The cross-attention keys/values of the encoder states are projected once, into a
        :class:`attnkit.ContextKV`, and read by every step.

        Raises:
            ValueError: ``need_weights`` on a model without attention.
        """
        if need_weights and self.cross_attn is None:
            raise ValueError("need_weights=True needs a model built with attention=True")
        states, src_mask, hidden = self.encode(src)
        if self.cross_attn is not None:
            states = self.cross_attn.cache_context(states)  # k, v (B, H, S, hidden / H)
        token = torch.full((src.shape[0], 1), self.BOS, dtype=torch.long, device=src.device)
        tokens, weights = [], []
        for _ in range(length):
            logits, hidden, w = self._step(token, states, src_mask, hidden, need_weights)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(token)
            weights.append(w)
        tokens = torch.cat(tokens, dim=1)  # (B, L)
        return (tokens, torch.cat(weights, dim=2)) if need_weights else tokens
