"""Why attention: a GRU encoder-decoder with and without attention, same size, same data.

* :mod:`.model` - :class:`~.model.GRUSeq2Seq`.
* :mod:`.train` - the experiment, ``train(config) -> results``.
* :mod:`.figures` - accuracy against length beside one alignment.
* :mod:`.cli` - ``attnkit why-attention``.
"""
