"""The attention explorer: ``attnkit explore`` serves a page (or exports one HTML file) that
walks the tutorial step by step on a typed sentence, draws mask patterns with the backend's
choice, and shows the trained translator's and GPT's attention. See ``docs/explore.md``.

Modules: :mod:`.tutorial_view`, :mod:`.mask_view`, :mod:`.model_view` compute each view's
JSON with torch; :mod:`.server` serves them with the page in ``assets/``; :mod:`.cli` is the
command. :mod:`.scripts` joins the page's scripts into the one function the page and
:mod:`.widget` (``attnkit.widgets``: the views in a notebook) both run.
"""
