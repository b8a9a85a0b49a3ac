"""The date translator: human-written dates to ISO with a Transformer encoder-decoder.

* :mod:`.dates` - the generated data (formats, field spans, the ``strptime`` check).
* :mod:`.model` - :class:`~.model.TransformerSeq2Seq`, every attention an attnkit module.
* :mod:`.train` - `train(config) -> metrics`, evaluation, saving and loading.
* :mod:`.figures` - the cross-attention (alignment) figure.
* :mod:`.answer` - checked translation: an answer only when it is the date written.
* :mod:`.cli` - ``attnkit translate``.
"""
