"""The date translator: human-written dates to ISO with a Transformer encoder-decoder.

* :mod:`.dates` - the generated data (formats, field spans, the ``strptime`` check).
* :mod:`.model` - :class:`~.model.TransformerSeq2Seq`, every attention an attnkit module.
* :mod:`.app` - training, evaluation, alignment figures, saving and loading.
* :mod:`.answer` - checked translation: an answer only when it is the date written.
* :mod:`.cli` - ``attnkit translate``.
"""
