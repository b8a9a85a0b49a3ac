"""What a person runs: each app owns its model, data, training loop and command.

* :mod:`attnkit.apps.walkthrough` - ``attnkit walkthrough``: the tutorial step by step.
* :mod:`attnkit.apps.translate` - ``attnkit translate``: the date translator (Transformer
  encoder-decoder) and its alignment figures.
* :mod:`attnkit.apps.why_attention` - ``attnkit why-attention``: a GRU encoder-decoder with
  and without attention on growing sequence lengths.
* :mod:`attnkit.apps.gpt` - ``attnkit gpt``: a small character-level GPT.

Shared pieces: :mod:`attnkit.apps._cli` (common options, one usage-error type, exit 2),
:mod:`attnkit.apps._vocab` (one character vocabulary), :mod:`attnkit.apps._progress`.
The library core never imports this package.
"""
