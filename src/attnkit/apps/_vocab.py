"""One character vocabulary for every app (the translator's and the GPT's).

Ids are laid out as ``[<pad>] [specials...] chars...``: the padding id 0 exists only when
``padding=True`` (batches of unequal texts, the translator), the specials (e.g. ``<bos>``)
follow, then one id per character in the given order. The GPT uses ``padding=False`` and no
specials, so its ids are plain indices into ``chars``.

Shape letters: ``B`` batch, ``L`` text length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._i18n import LocalizedError

__all__ = ["CharVocab"]


class CharVocab:
    """Characters to ids and back, with errors that name the unknown characters.

    Args:
        chars: the distinct characters, in id order after the padding id and the specials.
        specials: names of extra tokens (e.g. ``("<bos>",)``).
        padding: reserve id 0 for padding (needed by :meth:`batch`).

    Raises:
        ValueError: an empty or repeated character list.
    """

    def __init__(self, chars, *, specials: tuple[str, ...] = (), padding: bool = False):
        chars = list(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character, got none")
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary repeats characters; pass distinct characters")
        self.chars, self.specials, self.padding = chars, tuple(specials), bool(padding)
        self.offset = int(self.padding) + len(self.specials)  # id of chars[0]
        self._ids = {c: i + self.offset for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, **kwargs) -> "CharVocab":
        """The vocabulary of every distinct character of ``text``, sorted by code point.

        Raises:
            ValueError: ``text`` is empty.
        """
        return cls(sorted(set(text)), **kwargs)

    def __len__(self) -> int:
        return self.offset + len(self.chars)

    @property
    def vocab_size(self) -> int:
        """Number of ids (padding and specials included)."""
        return len(self)

    def __repr__(self) -> str:
        return (f"CharVocab(vocab_size={len(self)}, specials={self.specials}, "
                f"padding={self.padding})")

    def special(self, name: str) -> int:
        """The id of special token ``name``.

        Raises:
            ValueError: ``name`` is not one of the specials.
        """
        if name not in self.specials:
            raise ValueError(f"unknown special token {name!r}; this vocabulary has "
                             f"{list(self.specials)}")
        return int(self.padding) + self.specials.index(name)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of ``text`` outside the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._ids))

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``.

        Raises:
            ValueError: characters outside the vocabulary (the message names them).
        """
        missing = self.unknown(text)
        if missing:
            raise LocalizedError("error.vocab_unknown", count=len(missing),
                                 chars=", ".join(repr(c) for c in missing))
        return [self._ids[c] for c in text]

    def decode(self, ids) -> str:
        """The text of ``ids`` (ints or a 1-D tensor), skipping padding and specials."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i - self.offset] for i in ids if i >= self.offset)

    def batch(self, texts: list[str], length: int | None = None) -> Tensor:
        """``(B, L)`` long tensor of ``texts``, right-padded with id 0 (``L``: the longest).

        Raises:
            ValueError: the vocabulary has no padding id, or a text has unknown characters.
        """
        if not self.padding:
            raise ValueError("batch() pads with id 0; build the vocabulary with padding=True")
        rows = [self.encode(t) for t in texts]
        length = max(map(len, rows)) if length is None else length
        out = torch.zeros(len(rows), length, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out
