"""The learner-facing words of the apps, one catalogue per language.

Catalogues are JSON files, ``locale/<language>.json`` beside this module: flat objects from
a key (``"walkthrough.section.3.3.1"``, ``"explore.tab.mask"``) to a text with ``{name}``
fields. The walkthrough reads them here; the explorer's page gets the same files inlined and
fills the fields in JavaScript. Chinese (``zh``) uses the section titles and terms of the
tutorial attnkit grew from; numbers and variable names stay as in the code.

* :data:`LANGUAGES` - the languages there are catalogues for.
* :func:`catalogue` - one language's catalogue.
* :func:`translator` - ``tr(key, **fields)`` for one language.
* :func:`terminal_language` - ``zh`` when the terminal's locale is Chinese, else ``en``.
* :class:`LocalizedError` - a ``ValueError`` whose message is a catalogue text: ``str()`` is
  English (the command line prints it), :meth:`LocalizedError.text` gives any language (the
  explorer answers in the page's).
"""

from __future__ import annotations

import functools
import json
import os
import string
from importlib import resources

__all__ = ["LANGUAGES", "catalogue", "translator", "terminal_language", "fields",
           "Localized", "LocalizedError", "localized"]

LANGUAGES = ("en", "zh")


def _check(language) -> str:
    if not isinstance(language, str):
        raise TypeError(f"language must be a str, got {type(language).__name__}")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {list(LANGUAGES)}, got {language!r}")
    return language


@functools.lru_cache(maxsize=None)
def _load(language: str) -> dict:
    text = resources.files(__package__).joinpath("locale", f"{language}.json").read_text(
        encoding="utf-8")
    return json.loads(text)


def catalogue(language: str) -> dict[str, str]:
    """A copy of ``language``'s catalogue, ``{key: text}``.

    Raises:
        TypeError: ``language`` is not a str.
        ValueError: there is no catalogue for ``language`` (see :data:`LANGUAGES`).
    """
    return dict(_load(_check(language)))


def fields(text: str) -> set[str]:
    """The ``{name}`` fields of a catalogue text."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def translator(language: str):
    """``tr(key, **fields) -> str`` for ``language``.

    ``tr`` raises ``KeyError`` naming a key that is not in the catalogue (a bug, caught by the
    tests that compare the catalogues with the code).

    Raises:
        TypeError: ``language`` is not a str.
        ValueError: there is no catalogue for ``language``.
    """
    texts = _load(_check(language))

    def tr(key: str, **values) -> str:
        if key not in texts:
            raise KeyError(f"no text {key!r} in the {language!r} catalogue")
        return texts[key].format(**values) if values else texts[key]
    return tr


def terminal_language(environ=None) -> str:
    """``"zh"`` when the terminal's locale is Chinese, else ``"en"``.

    Reads ``LC_ALL``, ``LC_MESSAGES``, ``LANG`` and ``LANGUAGE`` in the order the C library
    does (the first one set decides; ``LANGUAGE`` may list several, ``zh_CN:en``).

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    for name in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE"):
        value = environ.get(name, "")
        if value:
            first = value.split(":")[0].lower()
            return "zh" if first.startswith("zh") else "en"
    return "en"


class Localized:
    """Mix-in for an exception worded by the catalogues: ``str(err)`` is the English text,
    ``err.text("zh")`` the Chinese one (same fields: numbers, names and quoted input as given).

    Args:
        key: the catalogue key.
        **fields: the text's ``{name}`` fields, already formatted as they should appear.
    """

    def __init__(self, key: str, **fields):
        self.key, self.fields = key, fields
        super().__init__(translator("en")(key, **fields))

    def text(self, language: str) -> str:
        """The message in ``language`` (``en`` for an unknown one)."""
        return translator(language if language in LANGUAGES else "en")(self.key, **self.fields)


class LocalizedError(Localized, ValueError):
    """A mistake in the input, worded by the catalogues (see :class:`Localized`)."""


def localized(err: BaseException, language: str) -> str:
    """``err``'s message in ``language`` when the catalogues word it, else ``str(err)``."""
    return err.text(language) if isinstance(err, Localized) else str(err)
