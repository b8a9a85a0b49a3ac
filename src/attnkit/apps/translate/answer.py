"""Checked translation: the translator's answer is given only when it is the date written.

:func:`translate_many` never returns an unchecked answer: each input is read a second time,
independently of the model, with ``datetime.strptime``
(:func:`attnkit.apps.translate.dates.parse_date`), and the model's answer is returned only when
it is a real ISO date and that same date. Anything else is a ``ValueError`` saying why.
"""

from __future__ import annotations

import datetime as dt

from .._i18n import LocalizedError
from . import dates
from .model import SOURCE_VOCAB, TARGET_VOCAB
from .model import TransformerSeq2Seq

__all__ = ["WrongAnswer", "translate_many", "translate"]


class WrongAnswer(LocalizedError):
    """The input is one valid date, but the model's answer is not it (so it is not given)."""


def translate_many(model: TransformerSeq2Seq, texts: list[str]) -> list[str | ValueError]:
    """Translate ``texts`` in one batch; each answer is checked before it is returned.

    Each input is first read independently with ``datetime.strptime``
    (:func:`attnkit.apps.translate.dates.parse_date`); the model's answer is returned only
    when it is a real ISO date and the same date. Anything else becomes a ``ValueError``
    saying why, in place of the answer: an empty, over-long or unknown-character input, text
    that is not one date in 1900-2099 (an impossible day, a wrong weekday, an ambiguous
    ``06/05/2009``), or a model answer that is wrong.

    Returns:
        One entry per input: the ISO date, or the ``ValueError`` that explains the refusal
        (a :class:`WrongAnswer` when the input was fine and the model was not).
    """
    results: list[str | ValueError] = []
    todo = []  # (index, cleaned text, the date the text names)
    for i, text in enumerate(texts):
        cleaned = " ".join(text.split()).lower()  # the vocabulary is lower case
        try:
            if not cleaned:
                raise LocalizedError("error.date_empty")
            if len(cleaned) > model.config.max_src_len:
                raise LocalizedError("error.date_long", length=len(cleaned),
                                     limit=model.config.max_src_len)
            SOURCE_VOCAB.encode(cleaned)  # names unknown characters
            todo.append((i, cleaned, dates.parse_date(cleaned)))
            results.append(ValueError("not translated"))  # replaced below
        except ValueError as err:
            results.append(err)
    if todo:
        tokens, _ = model.greedy_decode(SOURCE_VOCAB.batch([t for _, t, _ in todo]))
        for (i, cleaned, expected), row in zip(todo, tokens.tolist()):
            answer = TARGET_VOCAB.decode(row)
            try:
                got = dt.date.fromisoformat(answer)
            except ValueError:
                got = None
            if got == expected:
                results[i] = answer
            else:
                results[i] = WrongAnswer(
                    "error.wrong_answer" if got is not None else "error.unreal_answer",
                    answer=repr(answer), text=repr(cleaned), date=expected.isoformat())
    return results


def translate(model: TransformerSeq2Seq, text: str) -> str:
    """The ISO date the model reads in ``text``, checked (see :func:`translate_many`).

    Raises:
        ValueError: the input is not one supported date in range, or the model's answer is
            not that date (the message says which).
    """
    (result,) = translate_many(model, [text])
    if isinstance(result, ValueError):
        raise result
    return result
