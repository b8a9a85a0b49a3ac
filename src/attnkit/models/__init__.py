"""Small models built only from attnkit's pieces (the proof that the pieces work).

* :mod:`attnkit.models.seq2seq` - Transformer encoder-decoder (date translator) and GRU
  encoder-decoder with or without attention.
* :mod:`attnkit.models.gpt` - a small decoder-only GPT.

Names are imported on first use, so ``import attnkit.models`` stays cheap and one model's
module never has to load the other's.
"""

import importlib

_EXPORTS = {
    "CharVocab": "seq2seq",
    "GRUSeq2Seq": "seq2seq",
    "TransformerConfig": "seq2seq",
    "TransformerSeq2Seq": "seq2seq",
    "GPT": "gpt",
    "GPTConfig": "gpt",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attnkit.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
