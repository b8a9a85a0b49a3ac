"""Adapters that let other libraries run their attention on attnkit.

Each lives behind an optional extra and is imported explicitly; ``import attnkit`` never
imports this package's modules:

* :mod:`attnkit.integrations.transformers` - Hugging Face transformers 5.x models with
  ``attn_implementation="attnkit"`` (extra ``hf``: ``pip install "attnkit[hf]"``).
"""
