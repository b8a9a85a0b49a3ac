"""Character-level text data for the GPT demo: corpora, split, batches, baseline.

The tokenizer is the apps' shared :class:`attnkit.apps._vocab.CharVocab`.

The default corpus ships with every Python install: the help-topics text behind
``help("topics")`` (the standard library's ``pydoc_data.topics``, about 465 k characters of
English technical prose), so training needs no download. Any UTF-8 file works instead.

Shape letters: ``B`` batch, ``T`` sequence length, ``V`` vocabulary size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .._i18n import LocalizedError

__all__ = ["default_corpus", "load_text", "split_ids", "get_batch",
           "unigram_loss"]


def default_corpus() -> str:
    """The Python help-topics text (``pydoc_data.topics``), topics in sorted order.

    Sorting the topic names makes the text (and so the split) identical on every run.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_text(path=None) -> str:
    """The text of a UTF-8 file, or :func:`default_corpus` when ``path`` is None.

    Raises:
        ValueError: the file is missing, unreadable, not UTF-8, or shorter than 2 characters.
    """
    if path is None:
        return default_corpus()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"text file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 ({err.reason} at byte "
                         f"{err.start})") from None
    except OSError as err:
        raise ValueError(f"cannot read text file {str(path)!r}: {err.strerror}") from None
    if len(text) < 2:
        raise ValueError(f"text file {str(path)!r} has {len(text)} character(s); a language "
                         f"model needs at least 2 (an input and its next character)")
    return text


def split_ids(ids: Tensor, val_fraction: float = 0.1, *,
              chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Deterministic train/validation split: every k-th chunk of the text is validation.

    Interleaved chunks rather than one tail keep validation representative of the whole text
    (the default corpus is sorted by topic, so its tail is a few topics only). No randomness:
    the same text always gives the same split.

    Args:
        ids: ``(N,)`` token ids.
        val_fraction: share of chunks held out, in [0, 0.5].
        chunk: characters per chunk at most; shorter texts use smaller chunks so that
            at least 10 chunks are held out (keeping the held-out share near
            ``val_fraction``).

    Returns:
        ``(train, val)``, 1-D tensors; ``val`` is empty when ``val_fraction`` is 0.

    Raises:
        ValueError: ``val_fraction`` outside [0, 0.5] or ``ids`` not 1-D.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (N,), got shape {tuple(ids.shape)}")
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5], got {val_fraction!r}")
    if val_fraction == 0.0:
        return ids, ids[:0]
    every = max(2, round(1 / val_fraction))  # chunk i is validation when i % every == every - 1
    chunk = max(1, min(chunk, len(ids) // (10 * every)))
    chunks = ids.split(chunk)
    val = [c for i, c in enumerate(chunks) if i % every == every - 1]
    train = [c for i, c in enumerate(chunks) if i % every != every - 1]
    return torch.cat(train), torch.cat(val) if val else ids[:0]


def get_batch(data: Tensor, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random windows of ``data`` and the same windows shifted by one (the targets).

    Args:
        data: ``(N,)`` token ids, ``N > block_size``.
        batch_size: ``B``.
        block_size: ``T``, tokens per window.
        generator: seeds the window starts (deterministic training and evaluation).

    Returns:
        ``(x, y)``, each ``(B, T)`` int64; ``y[:, t]`` is the token after ``x[:, t]``.

    Raises:
        ValueError: ``data`` holds no more than ``block_size`` tokens.
    """
    if len(data) <= block_size:
        raise ValueError(f"the data has {len(data)} tokens; windows of block_size={block_size} "
                         f"need at least {block_size + 1} (use a shorter context or more text)")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = starts[:, None] + torch.arange(block_size + 1)  # (B, T + 1)
    window = data[offsets].long()  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


def unigram_loss(train: Tensor, val: Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/char) on ``val`` of character frequencies counted on ``train``.

    The baseline a model beats by using context at all; add-one smoothing keeps characters
    unseen in training finite.

    Raises:
        ValueError: ``val`` is empty.
    """
    if len(val) == 0:
        raise ValueError("the unigram baseline needs validation data; val is empty")
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0  # (V,)
    log_p = counts.log() - math.log(float(counts.sum()))  # (V,)
    return float(-log_p[val.long()].mean())


def encode_prompt(prompt, model, vocab) -> torch.Tensor:
    """The token ids ``(T,)`` of a prompt the model can read.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: an empty prompt, characters the model never saw (named), or more
            characters than the model's context.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise LocalizedError("error.prompt_empty")
    missing = vocab.unknown(prompt)
    if missing:
        raise LocalizedError("error.prompt_unknown", count=len(missing),
                             chars=", ".join(repr(c) for c in missing))
    limit = model.config.max_seq_len
    if len(prompt) > limit:
        raise LocalizedError("error.prompt_long", length=len(prompt), limit=limit)
    return torch.tensor(vocab.encode(prompt), dtype=torch.long)  # (T,)
