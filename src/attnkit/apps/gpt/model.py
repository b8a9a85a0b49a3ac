"""A small decoder-only GPT built from :class:`attnkit.MultiHeadAttention`.

Token embedding, rotary (default) or learned positions, pre-norm blocks of causal
multi-head attention and an MLP, a final LayerNorm and an output head tied to the token
embedding. Optional grouped-query attention (``num_kv_heads``) and sliding-window attention
(``window``) go straight to the attention module. :meth:`GPT.generate` decodes with one
:class:`attnkit.KVCache` per layer, or (``use_cache=False``) recomputes the whole context
every step, for comparison.

Shape letters: ``B`` batch, ``T`` tokens, ``E`` embed dim, ``V`` vocabulary size,
``H`` heads, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import KVCache, MultiHeadAttention
from .. import checkpoint

__all__ = ["GPTConfig", "GPT", "PRESETS", "save_checkpoint", "load_checkpoint"]

_POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class GPTConfig:
    """Sizes and options of a :class:`GPT`.

    Args:
        vocab_size: ``V``, token ids are in ``[0, V)``.
        max_seq_len: context length: the most tokens the model attends over (and the size
            of the learned position table).
        num_layers: ``L`` Transformer blocks.
        num_heads: ``H`` query heads per block; must divide ``embed_dim``.
        embed_dim: ``E``.
        num_kv_heads: key/value heads (GQA); default ``num_heads``.
        mlp_ratio: hidden size of the MLP as a multiple of ``embed_dim``.
        dropout: on attention weights, residual branches and embeddings (training only).
        positions: ``"rope"`` (rotary, in every attention layer) or ``"learned"``.
        window: sliding-window attention span in tokens, or None for full causal attention.
        backend: attention backend name (see :func:`attnkit.attention`).

    Raises:
        ValueError: a size that is not a positive int, an unknown ``positions``, ``dropout``
            outside [0, 1), or head counts that do not divide (as MultiHeadAttention).
    """

    vocab_size: int
    max_seq_len: int = 128
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    num_kv_heads: int | None = None
    mlp_ratio: int = 4
    dropout: float = 0.0
    positions: str = "rope"
    window: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "embed_dim",
                     "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.positions not in _POSITIONS:
            raise ValueError(f"GPTConfig.positions must be one of {_POSITIONS}, got "
                             f"{self.positions!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        # Head divisibility, window and backend: build one block's attention on the meta
        # device so the messages are MultiHeadAttention's own and no memory is touched.
        with torch.device("meta"):
            _attention(self)

    @classmethod
    def preset(cls, name: str, vocab_size: int, **overrides) -> "GPTConfig":
        """A named configuration from :data:`PRESETS` with ``vocab_size`` and overrides.

        Raises:
            ValueError: an unknown preset name, or overrides that fail validation.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# "tiny" trains in seconds (tests); "small" is nanoGPT's CPU configuration (4 layers, 4 heads,
# 128 dims) with a 128-character context: a few minutes on 2 cores (docs/gpt.md).
PRESETS = {
    "tiny": dict(max_seq_len=32, num_layers=2, num_heads=2, embed_dim=32),
    "small": dict(max_seq_len=128, num_layers=4, num_heads=4, embed_dim=128),
}


def _attention(config: GPTConfig) -> MultiHeadAttention:
    return MultiHeadAttention(config.embed_dim, config.num_heads,
                              num_kv_heads=config.num_kv_heads, dropout=config.dropout,
                              causal=True, window=config.window,
                              rope=config.positions == "rope", backend=config.backend)


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.embed_dim
        self.ln_1 = nn.LayerNorm(config.embed_dim)
        self.attn = _attention(config)
        self.ln_2 = nn.LayerNorm(config.embed_dim)
        self.mlp = nn.Sequential(nn.Linear(config.embed_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, config.embed_dim))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, need_weights: bool = False):
        """``x (B, T, E)`` -> ``(B, T, E)``, plus the weights ``(B, H, T, S)`` if asked."""
        attended = self.attn(self.ln_1(x), cache=cache, need_weights=need_weights)
        attended, weights = attended if need_weights else (attended, None)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.ln_2(x)))
        return x, weights


class GPT(nn.Module):
    """Decoder-only Transformer language model.

    Args:
        config: a :class:`GPTConfig`.

    Raises:
        TypeError: ``config`` is not a GPTConfig.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.embed_dim)
        self.pos_emb = (nn.Embedding(config.max_seq_len, config.embed_dim)
                        if config.positions == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.embed_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's init: N(0, 0.02) keeps the tied head's initial logits near uniform, so the
        # first loss is about ln(V) instead of PyTorch's larger default Embedding scale.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters (the tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def init_caches(self, batch_size: int, max_seq_len: int | None = None) -> list[KVCache]:
        """One :class:`KVCache` per layer (default capacity ``config.max_seq_len``)."""
        size = self.config.max_seq_len if max_seq_len is None else max_seq_len
        return [block.attn.init_cache(batch_size, size) for block in self.blocks]

    def forward(self, idx: Tensor, *, caches: list[KVCache] | None = None,
                need_weights: bool = False):
        """Next-token logits for every position.

        Args:
            idx: ``(B, T)`` int64 token ids.
            caches: from :meth:`init_caches`; the tokens continue the cached sequence (their
                positions start at ``caches[0].pos``) and are appended to it.
            need_weights: also return each layer's attention weights.

        Returns:
            ``logits (B, T, V)``, or ``(logits, weights)`` with ``weights`` a list of ``L``
            tensors ``(B, H, T, S)``.

        Raises:
            ValueError: ``idx`` not 2-D integer ids in ``[0, V)``, or positions beyond
                ``max_seq_len`` with learned positions.
            RuntimeError: a cache without room for ``T`` more tokens.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be (B, T) integer token ids, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        start = 0 if caches is None else caches[0].pos
        T = idx.shape[1]
        x = self.tok_emb(idx)  # (B, T, E)
        if self.pos_emb is not None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"positions up to {start + T} exceed the learned position "
                                 f"table (max_seq_len={self.config.max_seq_len})")
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))  # (B, T, E)
        x = self.dropout(x)
        weights = []
        for layer, block in enumerate(self.blocks):
            x, w = block(x, None if caches is None else caches[layer], need_weights)
            weights.append(w)
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)  # (B, T, V): head tied to tok_emb
        return (logits, weights) if need_weights else logits

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (nats/token) of predicting ``targets (B, T)`` from ``idx (B, T)``."""
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def generate_stream(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[int]:
        """Yield new token ids one at a time, continuing ``prompt``.

        The model sees the tokens since the current context start. When the context is full
        (``max_seq_len`` tokens), it restarts from the last ``max_seq_len // 2`` tokens: the
        cached path refills its caches from them, the uncached path crops to them, so both
        modes compute the same logits at every step and greedy decoding gives the same tokens.

        Args:
            prompt: ``(T,)`` or ``(1, T)`` token ids, ``1 <= T <= max_seq_len``.
            max_new_tokens: tokens to generate (>= 0).
            temperature: softmax temperature; 0 picks the most likely token (greedy).
            top_k: sample among the ``top_k`` most likely tokens only.
            generator: seeds the sampling.
            use_cache: decode with KV caches (one new token per step) instead of recomputing
                the whole context every step.

        Raises:
            ValueError: an empty or too long prompt, a negative ``max_new_tokens`` or
                ``temperature``, ``top_k < 1``.
        """
        seq = prompt.reshape(-1).tolist()  # (T,) as a Python list, appended to as we go
        limit = self.config.max_seq_len
        if not 1 <= len(seq) <= limit:
            raise ValueError(f"the prompt must have 1 to max_seq_len={limit} tokens, got "
                             f"{len(seq)}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 1; got "
                             f"{max_new_tokens}, {temperature}, {top_k}")
        was_training = self.training
        self.eval()
        device = self.tok_emb.weight.device
        caches = self.init_caches(1) if use_cache else None
        start, fed = 0, 0  # context = seq[start:]; the caches hold seq[start:fed]
        try:
            for _ in range(max_new_tokens):
                if len(seq) - start > limit:  # context full: keep its second half
                    start = len(seq) - limit // 2
                    if caches is not None:
                        for cache in caches:
                            cache.reset()
                        fed = start
                new = seq[fed:] if caches is not None else seq[start:]
                ids = torch.tensor([new], dtype=torch.long, device=device)  # (1, T)
                logits = self(ids, caches=caches)[0, -1]  # (V,)
                fed = len(seq)
                token = _sample(logits, temperature, top_k, generator)
                seq.append(token)
                yield token
        finally:
            self.train(was_training)

    def generate(self, prompt: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """The prompt followed by ``max_new_tokens`` generated ids, ``(T + N,)``.

        Keyword arguments and errors as :meth:`generate_stream`.
        """
        new = list(self.generate_stream(prompt, max_new_tokens, **kwargs))
        return torch.cat([prompt.reshape(-1).cpu(), torch.tensor(new, dtype=torch.long)])


def _sample(logits: Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> int:
    """One token id from ``logits (V,)``."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).cpu()  # (V,); multinomial on CPU so the generator applies
    return int(torch.multinomial(probs, 1, generator=generator))


def save_checkpoint(path, model: GPT, **metadata) -> Path:
    """Write the model's config, weights and ``metadata`` to ``path`` atomically.

    Uses :func:`attnkit.apps.checkpoint.save_checkpoint` (kind ``"gpt"``): an interrupted save
    leaves the previous checkpoint (or none), never a truncated one.

    Returns:
        The path written.
    """
    return checkpoint.save_checkpoint(path, model.state_dict(),
                                      dataclasses.asdict(model.config), kind="gpt",
                                      metadata=metadata)


def load_checkpoint(path, map_location="cpu") -> tuple[GPT, dict]:
    """The model (in eval mode) and metadata saved by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        attnkit.apps.checkpoint.CheckpointError: a corrupt file or another model's checkpoint
            (a ``ValueError``).
    """
    payload = checkpoint.load_checkpoint(path, kind="gpt", map_location=map_location)
    model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["metadata"]
