"""A small character-level GPT built from :class:`attnkit.MultiHeadAttention`.

* :mod:`.data` - corpora (the Python help text by default), split, batches, baseline.
* :mod:`.model` - :class:`~.model.GPT` and its presets.
* :mod:`.app` - training, the prompt check and the attention figure.
* :mod:`.cli` - ``attnkit gpt train | generate | attention``.
"""
