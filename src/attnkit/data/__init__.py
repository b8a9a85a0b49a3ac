"""Locally generated data sets for the demos (no downloads).

* :mod:`attnkit.data.dates` - human-readable dates paired with ISO dates, with field spans.
* :mod:`attnkit.data.text` - character tokenizer and text corpora (the Python help text by
  default) for the GPT.
"""
