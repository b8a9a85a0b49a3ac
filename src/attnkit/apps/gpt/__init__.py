"""A small character-level GPT built from :class:`attnkit.MultiHeadAttention`.

* :mod:`.data` - corpora (the Python help text by default), split, batches, baseline.
* :mod:`.model` - :class:`~.model.GPT` and its presets.
* :mod:`.train` - `train(config) -> TrainResult`.
* :mod:`.figures` - the loss curve and the layer x head attention grid.
* :mod:`.cli` - ``attnkit gpt train | generate | attention``.
"""
