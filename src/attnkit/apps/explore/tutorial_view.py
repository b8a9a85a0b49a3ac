"""The tutorial view's numbers: every rung of :mod:`attnkit.tutorial` on a typed sentence.

:func:`tutorial_view` returns plain JSON-able data (lists of floats, ``None`` for ``-inf``)
that the page draws step by step under the tutorial's section titles and variable names. On
the default sentence the embeddings, seeds and modules are those of
:mod:`attnkit.apps.walkthrough`, so every number equals the walkthrough's and the published
values are checked here too (``checks``).

Other words get a deterministic 3-d embedding: the tutorial's own vector when the word is one
of its six tokens (case-insensitive), else ``torch.rand(3)`` from a generator seeded by the
word's CRC-32, rounded to 2 decimals like the tutorial's. The same word always gets the same
vector, so a learner can change one word and see what moves.

Shape letters: ``T`` tokens, ``H`` heads; ``d_in = 3`` embedding width, ``d_out = 2``.
"""

from __future__ import annotations

import math
import threading
import zlib

import torch
from torch import Tensor, nn

from ... import tutorial
from .. import walkthrough
from .._i18n import LocalizedError

__all__ = ["MAX_WORDS", "MAX_WORD_LEN", "DROPOUT_P", "embed", "tutorial_view", "to_json"]

MAX_WORDS = 16
MAX_WORD_LEN = 24
DROPOUT_P = 0.5
_KNOWN = {tok.lower(): vec for tok, vec in zip(walkthrough.TOKENS, walkthrough.EMBEDDINGS)}
# Seeding uses torch's global generator (the tutorial's modules draw from it); the server runs
# requests in threads, so one lock keeps two requests from interleaving their draws.
_SEED_LOCK = threading.Lock()


def to_json(t: Tensor, digits: int = 6):
    """A tensor as nested lists of floats rounded to ``digits``; ``-inf``/NaN become None."""
    def clean(x: float):
        return round(x, digits) if math.isfinite(x) else None
    values = t.detach().double().tolist()
    if not isinstance(values, list):
        return clean(values)

    def walk(v):
        return [walk(x) for x in v] if isinstance(v, list) else clean(v)
    return walk(values)


def _tokens(sentence) -> list[str]:
    if not isinstance(sentence, str):
        raise TypeError(f"sentence must be a str, got {type(sentence).__name__}")
    tokens = sentence.split()
    if not tokens:
        raise LocalizedError("error.sentence_empty", example=walkthrough.SENTENCE)
    if len(tokens) > MAX_WORDS:
        raise LocalizedError("error.sentence_words", words=len(tokens), limit=MAX_WORDS)
    for token in tokens:
        if len(token) > MAX_WORD_LEN:
            raise LocalizedError("error.word_long", word=repr(token[:MAX_WORD_LEN]),
                                 length=len(token), limit=MAX_WORD_LEN)
        bad = [c for c in token if not c.isprintable()]
        if bad:
            raise LocalizedError("error.word_unprintable", word=repr(token),
                                 chars=", ".join(repr(c) for c in dict.fromkeys(bad)))
    return tokens


def embed(tokens: list[str]) -> Tensor:
    """The ``(T, 3)`` embeddings of ``tokens`` (the tutorial's vectors for its own words)."""
    rows = []
    for token in tokens:
        known = _KNOWN.get(token.lower())
        if known is None:
            gen = torch.Generator().manual_seed(zlib.crc32(token.lower().encode("utf-8")))
            known = [round(x, 2) for x in torch.rand(3, generator=gen).tolist()]
        rows.append(known)
    return torch.tensor(rows)  # (T, 3)


def _simple(inputs: Tensor) -> dict:
    """3.3: scores, softmax and context vectors without trainable weights."""
    context, weights = tutorial.simple_self_attention(inputs)
    return {"attn_scores": to_json(inputs @ inputs.T), "attn_weights": to_json(weights),
            "context_vecs": to_json(context)}


def _trainable(inputs: Tensor) -> tuple[dict, nn.Module]:
    """3.4: SelfAttentionV1 (seed 123) step by step, and SelfAttentionV2 (seed 789)."""
    torch.manual_seed(123)
    sa_v1 = tutorial.SelfAttentionV1(3, 2)
    W_query, W_key, W_value = (p.detach() for p in (sa_v1.W_query, sa_v1.W_key, sa_v1.W_value))
    queries, keys, values = inputs @ W_query, inputs @ W_key, inputs @ W_value  # (T, 2) x3
    scores = queries @ keys.T  # (T, T)
    context, weights = sa_v1(inputs, return_weights=True)
    torch.manual_seed(789)
    sa_v2 = tutorial.SelfAttentionV2(3, 2)
    return {"seed_v1": 123, "seed_v2": 789, "d_k": 2,
            "W_query": to_json(W_query), "W_key": to_json(W_key), "W_value": to_json(W_value),
            "queries": to_json(queries), "keys": to_json(keys), "values": to_json(values),
            "attn_scores": to_json(scores), "attn_weights": to_json(weights),
            "context_vecs": to_json(context), "sa_v2": to_json(sa_v2(inputs))}, sa_v2


def _causal(inputs: Tensor, sa_v2: nn.Module) -> dict:
    """3.5.1-3.5.2: both causal-masking methods on sa_v2's scores, then dropout."""
    queries, keys = sa_v2.W_query(inputs).detach(), sa_v2.W_key(inputs).detach()  # (T, 2)
    attn_scores = queries @ keys.T  # (T, T)
    d_k = keys.shape[-1]
    attn_weights = torch.softmax(attn_scores / d_k ** 0.5, dim=-1)
    T = attn_scores.shape[0]
    method1 = tutorial.mask_after_softmax(attn_weights)
    blocked = torch.ones(T, T).triu(diagonal=1).bool()  # the tutorial's form: True = blocked
    method2 = tutorial.mask_before_softmax(attn_scores, d_k)
    dropout = nn.Dropout(DROPOUT_P)  # a fresh module is in training mode
    torch.manual_seed(123)
    dropped = dropout(method2)
    return {"attn_scores": to_json(attn_scores), "attn_weights": to_json(attn_weights),
            "mask_simple": to_json(torch.tril(torch.ones(T, T))),
            "masked_simple_norm": to_json(method1),
            "masked_scores": to_json(attn_scores.masked_fill(blocked, -torch.inf)),
            "causal_weights": to_json(method2),
            "max_difference": float((method1 - method2).abs().max()),
            "dropout_p": DROPOUT_P, "dropout_seed": 123, "dropped": to_json(dropped)}


def _heads(inputs: Tensor) -> dict:
    """3.5.3-3.6.2: CausalAttention, stacked heads and the weight-split MultiHeadAttention."""
    T = inputs.shape[0]
    batch = torch.stack((inputs, inputs))  # (B, T, d_in) = (2, T, 3), the tutorial's batch
    torch.manual_seed(123)
    ca = tutorial.CausalAttention(3, 2, T, 0.0)(batch)
    torch.manual_seed(123)
    wrapper_out, wrapper_w = tutorial.MultiHeadAttentionWrapper(3, 2, T, 0.0, num_heads=2)(
        batch, return_weights=True)  # (B, T, 4), (B, H, T, T)
    torch.manual_seed(123)
    mha_out, mha_w = tutorial.MultiHeadAttention(3, 2, T, 0.0, num_heads=2)(
        batch, return_weights=True)  # (B, T, 2), (B, H, T, T)
    return {"seed": 123, "num_heads": 2, "ca": to_json(ca[0]),
            "wrapper": to_json(wrapper_out[0]), "wrapper_weights": to_json(wrapper_w[0]),
            "mha": to_json(mha_out[0]), "mha_weights": to_json(mha_w[0])}


def _checks(view: dict) -> list[dict]:
    """The walkthrough's published values, compared with this view's numbers."""
    got = {"attn_weights_2": view["simple"]["attn_weights"][1],
           "context_vec_2": view["simple"]["context_vecs"][1],
           "sa_v1 row 0": view["trainable"]["context_vecs"][0],
           "sa_v2 row 0": view["trainable"]["sa_v2"][0],
           "ca row 0": view["heads"]["ca"][0],
           "mha wrapper row 0": view["heads"]["wrapper"][0],
           "mha row 0": view["heads"]["mha"][0]}
    return [{"name": name, "published": list(expected), "got": got[name],
             "ok": all(abs(a - b) <= 5e-5 for a, b in zip(got[name], expected))}
            for name, expected in walkthrough.PUBLISHED.items()]


def tutorial_view(sentence: str = walkthrough.SENTENCE) -> dict:
    """Every step of the tutorial on ``sentence``, as JSON-able data.

    Args:
        sentence: words separated by spaces (1 to :data:`MAX_WORDS`).

    Returns:
        ``{"sentence", "tokens", "inputs", "simple", "trainable", "causal", "heads",
        "checks"}``; ``checks`` lists the published values with ``ok`` flags when the
        sentence is the tutorial's own (else it is empty).

    Raises:
        TypeError: ``sentence`` is not a str.
        ValueError: an empty sentence, too many or too long words, unprintable characters.
    """
    tokens = _tokens(sentence)
    inputs = embed(tokens)  # (T, 3)
    with _SEED_LOCK, torch.random.fork_rng(devices=[]), torch.no_grad():
        trainable, sa_v2 = _trainable(inputs)
        view = {"sentence": " ".join(tokens), "tokens": tokens, "inputs": to_json(inputs),
                "simple": _simple(inputs), "trainable": trainable,
                "causal": _causal(inputs, sa_v2), "heads": _heads(inputs)}
    default = tokens == walkthrough.TOKENS
    view["checks"] = _checks(view) if default else []
    return view
