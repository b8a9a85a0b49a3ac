"""Adapters that let other libraries run their attention on attnkit.

Each lives behind an optional extra and is imported explicitly; ``import attnkit`` never
imports this package's modules:

* :mod:`attnkit.integrations.transformers` - Hugging Face transformers 5.x models with
  ``attn_implementation="attnkit"`` (extra ``hf``: ``pip install "attnkit[hf]"``); importing
  it registers the name. Its mask reader is :mod:`.transformers_masks`, and every
  transformers name it relies on is in the table of :mod:`.transformers_api`;
  :mod:`.transformers_inspect` is :func:`attnkit.inspect` (attention weights of chosen
  layers and heads from one fast-path forward).
"""
