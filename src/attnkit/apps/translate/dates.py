"""Human-readable dates paired with ISO dates, generated locally from the standard library.

Every date from 1900-01-01 to 2099-12-31 can be written in about twenty human formats
("25th of June, 2009", "06/25/09", "thursday june 25 2009", ...). A :class:`DatePair` keeps the
source text, the ISO target ``YYYY-MM-DD``, the format used and the character span of each
field (day, month, year) in the source, so an attention map can be scored against the truth.

* Formats are templates of fields (``{dd}``, ``{Month}``, ``{yy}`` ...) and literal text; each
  has a ``strptime`` twin, so every generated source parses back to its date independently of
  the generator (:func:`parse_date`).
* Two-digit years follow the POSIX ``%y`` rule (69-99 -> 19xx, 00-68 -> 20xx), so a format with
  ``{yy}`` is used only for dates in 1969-2068, where the short form is unambiguous.
* Case (lower, Title, UPPER, as written) and spacing (an occasional doubled space) vary.
* :func:`split_dates` shuffles all 73,049 days once with a seed and holds some out; held-out
  dates never appear in training, whatever format they would be written in.

Month and weekday names come from ``calendar`` in the C locale, i.e. English, whatever the
user's locale (the ``strptime`` check temporarily relies on the same C-locale names).
"""

from __future__ import annotations

import datetime as dt
import random
import re
import time
from dataclasses import dataclass

from .._i18n import LocalizedError

__all__ = ["FORMATS", "DateFormat", "DatePair", "FIELDS", "render", "readings", "parse_date",
           "supported_examples", "split_dates", "sample_pairs", "FIRST_DATE", "LAST_DATE"]

FIRST_DATE = dt.date(1900, 1, 1)
LAST_DATE = dt.date(2099, 12, 31)
FIELDS = ("day", "month", "year")
# Short years are read with POSIX %y: 69-99 -> 19xx, 00-68 -> 20xx.
_SHORT_YEAR_RANGE = (1969, 2068)

# English names written out here rather than read from calendar.month_name, which follows
# the process locale once someone calls locale.setlocale.
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december")
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# field token -> (field it belongs to or None, how to write it, strptime directive)
_TOKENS = {
    "d": ("day", lambda d: str(d.day), "%d"),
    "dd": ("day", lambda d: f"{d.day:02d}", "%d"),
    "dth": ("day", lambda d: _ordinal(d.day), "%d"),  # the suffix is stripped before strptime
    "m": ("month", lambda d: str(d.month), "%m"),
    "mm": ("month", lambda d: f"{d.month:02d}", "%m"),
    "Month": ("month", lambda d: _MONTHS[d.month - 1], "%B"),
    "mon": ("month", lambda d: _MONTHS[d.month - 1][:3], "%b"),
    "yyyy": ("year", lambda d: f"{d.year:04d}", "%Y"),
    "yy": ("year", lambda d: f"{d.year % 100:02d}", "%y"),
    "weekday": (None, lambda d: _WEEKDAYS[d.weekday()], "%A"),
    "wkd": (None, lambda d: _WEEKDAYS[d.weekday()][:3], "%a"),
}
_PIECE = re.compile(r"\{(\w+)\}|([^{]+)")


@dataclass(frozen=True)
class DateFormat:
    """One human date format: a template such as ``"{dth} of {Month}, {yyyy}"``.

    Attributes:
        template: literal text and ``{token}`` fields (tokens: ``d dd dth m mm Month mon
            yyyy yy weekday wkd``).
        pieces: the parsed template, ``(token, None)`` or ``(None, literal)`` in order.
        strptime: the equivalent ``datetime.strptime`` pattern (ordinal suffixes removed).
        short_year: the format writes the year with two digits.
    """

    template: str

    @property
    def pieces(self) -> tuple[tuple[str | None, str | None], ...]:
        return tuple((m.group(1), m.group(2)) for m in _PIECE.finditer(self.template))

    @property
    def strptime(self) -> str:
        return "".join(_TOKENS[tok][2] if tok else lit.replace("%", "%%")
                       for tok, lit in self.pieces)

    @property
    def short_year(self) -> bool:
        return "{yy}" in self.template

    @property
    def numeric_slash(self) -> bool:
        """Day then month, or month then day, as numbers between slashes (``06/25/09``).

        Slashes come in both orders (month first in the US, day first elsewhere), so such a
        source names one date only when the day cannot be a month.
        """
        tokens = {tok for tok, _ in self.pieces if tok}
        year_first = self.template.startswith("{yyyy}")  # 2009/06/25 is always y-m-d
        return ("/" in self.template and not year_first and bool(tokens & {"d", "dd"})
                and bool(tokens & {"m", "mm"}))

    def write(self, date: dt.date, weekday: int | None = None) -> str:
        """``date`` in this format, lower case and single-spaced, with no range checks.

        Args:
            date: the date to write.
            weekday: the weekday to write (0 = Monday) when it is not ``date``'s own, so a
                text's shape can be compared whatever weekday it names.
        """
        if weekday is not None and weekday != date.weekday():
            names = {"weekday": _WEEKDAYS[weekday], "wkd": _WEEKDAYS[weekday][:3]}
        else:
            names = {}
        return "".join(names.get(tok) or _TOKENS[tok][1](date) if tok else lit
                       for tok, lit in self.pieces).lower()

    def accepts(self, date: dt.date) -> bool:
        """Whether ``date`` can be written in this format so that it reads as one date only."""
        if self.short_year and not _SHORT_YEAR_RANGE[0] <= date.year <= _SHORT_YEAR_RANGE[1]:
            return False
        return not self.numeric_slash or date.day > 12 or date.day == date.month


# "." and "-" between numbers are day first and a leading four-digit year is year-month-day;
# "/" comes in both orders, so numeric slash formats write only dates whose day cannot be a
# month (DateFormat.accepts). No generated source reads as two different dates.
FORMATS: tuple[DateFormat, ...] = tuple(DateFormat(t) for t in (
    "{dth} of {Month}, {yyyy}",        # 25th of June, 2009
    "{mm}/{dd}/{yy}",                  # 06/25/09
    "{weekday} {Month} {d} {yyyy}",    # thursday june 25 2009
    "{dd}.{mm}.{yy}",                  # 25.06.09
    "{d} {mon} {yyyy}",                # 25 jun 2009
    "{Month} {d}, {yyyy}",             # June 25, 2009
    "{yyyy} {mm} {dd}",                # 2009 06 25
    "{m}/{d}/{yyyy}",                  # 6/25/2009
    "{dd}.{mm}.{yyyy}",                # 25.06.2009
    "{d} {Month} {yyyy}",              # 25 June 2009
    "{mon} {d}, {yyyy}",               # Jun 25, 2009
    "{wkd}, {d} {mon} {yyyy}",         # Thu, 25 Jun 2009
    "{weekday}, {Month} {d}, {yyyy}",  # Thursday, June 25, 2009
    "{dd}-{mon}-{yy}",                 # 25-jun-09
    "{yyyy}/{mm}/{dd}",                # 2009/06/25
    "{dth} {Month} {yyyy}",            # 25th June 2009
    "{Month} {dth}, {yyyy}",           # June 25th, 2009
    "{d} {mon} {yy}",                  # 25 jun 09
    "{yyyy}{mm}{dd}",                  # 20090625
    "{dd}-{mm}-{yyyy}",                # 25-06-2009
    "{weekday} {d} {Month} {yyyy}",    # thursday 25 june 2009
    "{yyyy}-{mm}-{dd}",                # 2009-06-25 (ISO 8601)
    "{dd}/{mm}/{yyyy}",                # 25/06/2009 (day first)
    "{d}/{m}/{yy}",                    # 25/6/09 (day first)
    "{Month} {d} {yyyy}",              # June 25 2009
    "{mon} {d} {yyyy}",                # Jun 25 2009
    "{Month} {dth} {yyyy}",            # June 25th 2009
    "{dth} {mon} {yyyy}",              # 25th Jun 2009
    "{Month} {d}, {yy}",               # June 25, 09
))


@dataclass(frozen=True)
class DatePair:
    """A source text, its ISO target and where each field sits in the source.

    Attributes:
        source: the human-written date.
        target: ``YYYY-MM-DD``.
        date: the date itself.
        format_index: index into :data:`FORMATS`.
        spans: ``{"day": (start, stop), "month": ..., "year": ...}``, half-open character
            ranges of ``source``.
    """

    source: str
    target: str
    date: dt.date
    format_index: int
    spans: dict


def render(date: dt.date, format_index: int, rng: random.Random | None = None) -> DatePair:
    """Write ``date`` in format ``FORMATS[format_index]``, with random case and spacing.

    Args:
        date: a date in 1900-2099.
        format_index: which of :data:`FORMATS`.
        rng: source of the case/spacing choices; ``None`` writes lower case, single spaces.

    Returns:
        The :class:`DatePair` with field spans.

    Raises:
        ValueError: a date outside 1900-2099, a format index out of range, or a two-digit-year
            format for a date outside 1969-2068.
    """
    if not FIRST_DATE <= date <= LAST_DATE:
        raise ValueError(f"date must be in {FIRST_DATE}..{LAST_DATE}, got {date}")
    if not 0 <= format_index < len(FORMATS):
        raise ValueError(f"format_index must be in [0, {len(FORMATS)}), got {format_index}")
    fmt = FORMATS[format_index]
    if not fmt.accepts(date):
        raise ValueError(f"format {fmt.template!r} writes two-digit years, which read back "
                         f"as {_SHORT_YEAR_RANGE[0]}-{_SHORT_YEAR_RANGE[1]}; got {date}")
    case = "lower" if rng is None else rng.choice(("lower", "lower", "title", "upper", "as"))
    parts, spans, pos = [], {}, 0
    for token, literal in fmt.pieces:
        if token:
            field, write, _ = _TOKENS[token]
            text = write(date)
            if case == "as" and token in ("Month", "weekday"):
                text = text.capitalize()  # as in the template's "June": names capitalised
            if field:
                spans[field] = (pos, pos + len(text))
        else:
            # An occasional doubled space: real input is not always tidy.
            text = literal if rng is None or rng.random() > 0.1 else literal.replace(" ", "  ")
        parts.append(text)
        pos += len(text)
    source = "".join(parts)
    if case == "upper":
        source = source.upper()
    elif case == "title":
        source = source.title()  # "25Th Of June" - title() capitalises after digits too
    return DatePair(source, date.isoformat(), date, format_index, spans)


_ORDINAL = re.compile(r"(\d+)(st|nd|rd|th)\b", flags=re.IGNORECASE)


def supported_examples(date: dt.date = dt.date(2009, 6, 25)) -> list[str]:
    """``date`` written in each of :data:`FORMATS`, in order (for help and refusals)."""
    return [fmt.write(date) for fmt in FORMATS]


def _strptime(text: str):
    """``(format, date or None, strptime's error or None)`` for each of :data:`FORMATS`, and
    whether ``text`` is written exactly as that format writes the date (its *shape*).

    ``strptime`` is lenient (``%m`` takes ``3`` as well as ``03``, ``%d`` takes ``1th``), but
    the model was trained only on what :data:`FORMATS` writes, so a date counts as read in a
    format only when the format writes it back as ``text`` (case and spacing aside).
    """
    normal = " ".join(text.split()).lower()
    cleaned = _ORDINAL.sub(r"\1", normal)
    for fmt in FORMATS:
        try:
            parsed = time.strptime(cleaned, fmt.strptime)
        except ValueError as err:
            yield fmt, None, err, None, False
            continue
        date = dt.date(parsed.tm_year, parsed.tm_mon, parsed.tm_mday)
        yield fmt, date, None, parsed.tm_wday, fmt.write(date, parsed.tm_wday) == normal


def readings(text: str) -> list[tuple[dt.date, DateFormat]]:
    """Every ``(date, format)`` that ``text`` is written in, read with ``strptime`` only.

    This is the generator-independent check behind :func:`parse_date`: case and runs of
    spaces are ignored, ordinal suffixes are removed first, any year ``strptime`` accepts is
    returned (the range check is :func:`parse_date`'s), a format that names the weekday
    matches only when the weekday is right, and the text must have the format's exact shape
    (``2001-03-01``, not ``2001-3-1``; ``1st``, not ``1th``): one table, :data:`FORMATS`,
    says both what the training data contains and what the checker accepts.
    """
    return [(date, fmt) for date, fmt, shape in _readings(text) if shape]


def _readings(text: str) -> list[tuple[dt.date, DateFormat, bool]]:
    """``(date, format, exact shape)`` for every format ``strptime`` reads ``text`` in with
    the right weekday, leniently (the ambiguity check: a person may mean either reading)."""
    return [(date, fmt, shape) for fmt, date, _, weekday, shape in _strptime(text)
            if date is not None and weekday == date.weekday()]


def _why_not(text: str) -> LocalizedError:
    """Why ``text`` matches no format: an impossible day, a wrong weekday, a shape the model
    was not trained on, or no format at all."""
    loose = None
    for fmt, date, err, weekday, shape in _strptime(text):
        if err is not None and "out of range" in str(err):  # the day does not exist
            return LocalizedError("error.date_unreal", text=repr(text))
        if date is not None and shape:
            return LocalizedError("error.date_weekday", text=repr(text), date=date.isoformat(),
                                  weekday=_WEEKDAYS[date.weekday()])
        if date is not None and loose is None:
            loose = fmt, date
    if loose is not None:
        fmt, date = loose
        return LocalizedError("error.date_unsupported", text=repr(text),
                              trained=repr(fmt.write(date)),
                              formats="; ".join(supported_examples()))
    return LocalizedError("error.date_unknown", text=repr(text))


def _order(fmt: DateFormat) -> str:
    """How a format orders day and month, for an ambiguity message."""
    return "day first" if fmt.template.index("{d") < fmt.template.index("{m") else "month first"


def parse_date(text: str) -> dt.date:
    """The one date ``text`` names, checked with ``datetime`` and the supported range.

    Raises:
        ValueError: ``text`` matches no format (an impossible day such as February 30, a
            month 13, a wrong weekday, or not a date at all), reads as two different dates
            (``06/05/2009``: June 5 or May 6), is a spelling the model was not trained on
            (``2001-3-1``: an unsupported format, with the list), or names a date outside
            1900-2099. The message says which.
    """
    found = _readings(text)
    distinct = sorted({date for date, _, _ in found})
    if len(distinct) > 1:
        shown = " or ".join(f"{d.isoformat()} ({_order(f)})" for d, f in
                            sorted({d: f for d, f, _ in found}.items()))
        raise LocalizedError("error.date_ambiguous", text=repr(text), readings=shown)
    if not any(shape for _, _, shape in found):
        raise _why_not(text)
    date = distinct[0]
    if not FIRST_DATE <= date <= LAST_DATE:
        raise LocalizedError("error.date_range", text=repr(text), date=date.isoformat(),
                             first=FIRST_DATE.isoformat(), last=LAST_DATE.isoformat())
    return date


def split_dates(num_heldout: int = 2000, seed: int = 0) -> tuple[list[dt.date], list[dt.date]]:
    """Every date of 1900-2099 shuffled with ``seed``: ``(train_dates, heldout_dates)``.

    Raises:
        ValueError: ``num_heldout`` not in ``[1, number of days)``.
    """
    total = (LAST_DATE - FIRST_DATE).days + 1
    if not 1 <= num_heldout < total:
        raise ValueError(f"num_heldout must be in [1, {total}), got {num_heldout}")
    dates = [FIRST_DATE + dt.timedelta(days=i) for i in range(total)]
    random.Random(seed).shuffle(dates)
    return dates[num_heldout:], dates[:num_heldout]


def sample_pairs(dates: list[dt.date], count: int, rng: random.Random) -> list[DatePair]:
    """``count`` pairs: a random date of ``dates`` in a random format that can write it.

    Raises:
        ValueError: ``dates`` is empty.
    """
    if not dates:
        raise ValueError("dates must not be empty")
    pairs = []
    for _ in range(count):
        date = rng.choice(dates)
        usable = [i for i, fmt in enumerate(FORMATS) if fmt.accepts(date)]
        pairs.append(render(date, rng.choice(usable), rng))
    return pairs
