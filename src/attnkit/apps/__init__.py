"""What a person runs: each app owns its model, data, training loop and command.

* :mod:`attnkit.apps.walkthrough` - ``attnkit walkthrough``: the tutorial step by step.
* :mod:`attnkit.apps.translate` - ``attnkit translate``: the date translator (Transformer
  encoder-decoder) and its alignment figures.
* :mod:`attnkit.apps.why_attention` - ``attnkit why-attention``: a GRU encoder-decoder with
  and without attention on growing sequence lengths.
* :mod:`attnkit.apps.gpt` - ``attnkit gpt``: a small character-level GPT.

* :mod:`attnkit.apps.explore` - ``attnkit explore``: the attention explorer in a browser.

Each trained app has one layout: ``model.py`` (the network), ``train.py`` (one
``train(config) -> result`` that prints nothing: report lines go to ``config.run.log``),
``cli.py`` (argparse, :class:`~attnkit.apps._cli.UsageError`, exit codes) and ``figures.py``.

Shared pieces: :mod:`attnkit.apps._cli` (common options, one usage-error type, exit 2),
:mod:`attnkit.apps._training` (resumable runs, :class:`~attnkit.apps._training.RunOptions`),
:mod:`attnkit.apps.checkpoint` (atomic checkpoints), :mod:`attnkit.apps._i18n` (the en/zh
catalogues in ``locale/``), :mod:`attnkit.apps._vocab` (one character vocabulary),
:mod:`attnkit.apps._progress`. The library core never imports this package.
"""
