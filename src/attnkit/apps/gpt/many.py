"""Generate for several prompts at once through one paged KV cache.

Every step packs each sequence's new tokens into one row (the whole prompt on the first step,
then one token each), runs the projections and MLPs once over the row, and attends per
sequence over its own pages (:class:`attnkit.paged.PagedKVCache`, read in place). Each
sequence keeps :meth:`GPT.generate_stream`'s rules (context restart at ``max_seq_len``, its
own sampling generator), so every continuation is the one it would get alone.

Shape letters: ``N`` packed new tokens, ``H`` heads, ``Hkv`` key/value heads, ``D`` head dim,
``E`` embedding dim, ``V`` vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...paged import PagedKVCache
from .model import GPT, _sample


def _forward_packed(model: GPT, cache: PagedKVCache, ids: Tensor, positions: Tensor,
                    spans: list[tuple[object, int, int, int]]) -> Tensor:
    """Logits ``(len(spans), V)`` at each sequence's last new token.

    ``ids, positions (N,)``; ``spans`` = ``(seq_id, a, b, start)``: packed tokens ``a:b`` are
    the sequence's positions ``start ..`` (already reserved in ``cache``).
    """
    x = model.tok_emb(ids)[None]  # (1, N, E)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions)[None]  # (1, N, E)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = attn._project(block.ln_1(x), None)  # (1, H, N, D), (1, Hkv, N, D) x 2
        if attn.rope is not None:
            q, k = attn.rope(q, positions), attn.rope(k, positions)
        outs = []
        for seq_id, a, b, start in spans:
            cache.write(layer, seq_id, start, k[0, :, a:b], v[0, :, a:b])
            outs.append(cache.attend(layer, seq_id, q[:, :, a:b], window=attn.window,
                                     backend=attn.backend))  # (1, H, b - a, D)
        out = torch.cat(outs, dim=2).transpose(1, 2).flatten(2)  # (1, N, H*D)
        x = x + attn.out_proj(out)
        x = x + block.mlp(block.ln_2(x))
    last = torch.tensor([b - 1 for _, _, b, _ in spans], device=ids.device)
    return F.linear(model.ln_f(x[0, last]), model.tok_emb.weight)  # (len(spans), V)


@torch.no_grad()
def generate_many(model: GPT, prompts: list[Tensor], max_new_tokens: int, *,
                  temperature: float = 1.0, top_k: int | None = None,
                  generators: list[torch.Generator | None] | None = None,
                  page_size: int = 16) -> list[list[int]]:
    """New token ids for every prompt, generated together through one paged cache.

    Args:
        model: a :class:`GPT`.
        prompts: ``(T_i,)`` token ids each, ``1 <= T_i <= max_seq_len``.
        max_new_tokens: tokens to generate per prompt (>= 0).
        temperature, top_k: as :meth:`GPT.generate_stream`.
        generators: one per prompt (seed each as you would the prompt alone), or None.
        page_size: positions per cache page.

    Returns:
        One list of ``max_new_tokens`` ids per prompt, each equal to what
        ``model.generate_stream(prompt, ...)`` with the same generator yields.

    Raises:
        ValueError: no prompts, an empty or too long prompt, ``generators`` of another length,
            or the sampling arguments :meth:`GPT.generate_stream` refuses.
    """
    limit = model.config.max_seq_len
    seqs = [p.reshape(-1).tolist() for p in prompts]
    generators = [None] * len(seqs) if generators is None else list(generators)
    if not seqs or len(generators) != len(seqs):
        raise ValueError(f"need at least one prompt and one generator per prompt, got "
                         f"{len(seqs)} prompts and {len(generators)} generators")
    for i, s in enumerate(seqs):
        if not 1 <= len(s) <= limit:
            raise ValueError(f"prompt {i} must have 1 to max_seq_len={limit} tokens, got {len(s)}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_k}")
    attn = model.blocks[0].attn
    pages = math.ceil(limit / page_size) + 1  # a sequence never holds more than its context
    cache = PagedKVCache(pages * len(seqs), page_size, attn.num_kv_heads, attn.head_dim,
                         num_layers=len(model.blocks), dtype=model.tok_emb.weight.dtype,
                         device=model.tok_emb.weight.device)
    start, fed = [0] * len(seqs), [0] * len(seqs)  # context seq[start:], cached seq[start:fed]
    for i, s in enumerate(seqs):
        cache.allocate(i, capacity=min(limit, len(s) + max_new_tokens))
    new: list[list[int]] = [[] for _ in seqs]
    was_training = model.training
    model.eval()
    device = model.tok_emb.weight.device
    try:
        for _ in range(max_new_tokens):
            ids, positions, spans = [], [], []
            for i, s in enumerate(seqs):
                if len(s) - start[i] > limit:  # context full: keep its second half
                    start[i] = fed[i] = len(s) - limit // 2
                    cache.free(i)
                    cache.allocate(i, capacity=limit)
                first = cache.reserve(i, len(s) - fed[i])
                spans.append((i, len(ids), len(ids) + len(s) - fed[i], first))
                positions += range(fed[i] - start[i], len(s) - start[i])
                ids += s[fed[i]:]
                fed[i] = len(s)
            logits = _forward_packed(model, cache, torch.tensor(ids, device=device),
                                     torch.tensor(positions, device=device), spans)
            for i, s in enumerate(seqs):
                token = _sample(logits[i], temperature, top_k, generators[i])
                s.append(token)
                new[i].append(token)
    finally:
        model.train(was_training)
    return new
