"""Why attention: a GRU encoder-decoder with and without attention, same size, same data.

* :mod:`.model` - :class:`~.model.GRUSeq2Seq`.
* :mod:`.app` - the experiment and ``attnkit why-attention``.
"""
