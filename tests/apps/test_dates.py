"""The date generator: formats, round trips through strptime, field spans, held-out split."""

import datetime as dt
import random

import pytest

from attnkit.apps.translate import dates
from attnkit.apps.translate.dates import FORMATS, parse_date, render, sample_pairs, split_dates

# Boundaries, leap days, single- and two-digit days/months, and the %y pivot years.
EDGE_DATES = [dt.date(1900, 1, 1), dt.date(2099, 12, 31), dt.date(2000, 2, 29),
              dt.date(1904, 2, 29), dt.date(1969, 1, 1), dt.date(2068, 12, 31),
              dt.date(2009, 6, 25), dt.date(1999, 11, 3), dt.date(2012, 10, 22)]


def _check_spans(pair):
    source = pair.source.lower()
    day = source[slice(*pair.spans["day"])]
    assert int(day.rstrip("stndrh")) == pair.date.day
    month = source[slice(*pair.spans["month"])]
    names = dates._MONTHS[pair.date.month - 1]
    assert month in (names, names[:3]) or int(month) == pair.date.month
    year = source[slice(*pair.spans["year"])]
    assert int(year) == (pair.date.year if len(year) == 4 else pair.date.year % 100)


def test_about_twenty_distinct_formats():
    assert len(FORMATS) >= 20
    assert len({f.template for f in FORMATS}) == len(FORMATS)


@pytest.mark.parametrize("index", range(len(FORMATS)))
def test_every_format_round_trips_with_spans(index):
    rng = random.Random(index)
    for date in EDGE_DATES:
        if not FORMATS[index].accepts(date):
            continue
        for seed_rng in (None, rng):  # plain lower case, and random case/spacing
            pair = render(date, index, seed_rng)
            assert pair.target == date.isoformat()
            assert parse_date(pair.source) == date, pair.source
            _check_spans(pair)


def test_issue_examples():
    date = dt.date(2009, 6, 25)
    written = {render(date, i).source for i in range(len(FORMATS))}
    for example in ("25th of june, 2009", "06/25/09", "thursday june 25 2009", "25.06.09",
                    "25 jun 2009", "june 25, 2009", "2009 06 25"):
        assert example in written


def test_two_digit_years_follow_posix():
    short = next(i for i, f in enumerate(FORMATS) if f.template == "{dd}.{mm}.{yy}")
    assert parse_date("01.01.69") == dt.date(1969, 1, 1)
    assert parse_date("31.12.68") == dt.date(2068, 12, 31)
    with pytest.raises(ValueError, match="two-digit years"):
        render(dt.date(1968, 12, 31), short)
    with pytest.raises(ValueError, match="two-digit years"):
        render(dt.date(2069, 1, 1), short)


def test_random_samples_parse_back_and_vary_in_case_and_spacing():
    train, _ = split_dates(2000, seed=0)
    pairs = sample_pairs(train, 1500, random.Random(3))
    for pair in pairs:
        assert parse_date(pair.source) == pair.date, pair.source
        _check_spans(pair)
    sources = [p.source for p in pairs]
    assert any(s.isupper() for s in sources) and any(s.islower() for s in sources)
    assert any("  " in s for s in sources)
    assert {p.format_index for p in pairs} == set(range(len(FORMATS)))
    assert min(p.date for p in pairs).year < 1920 and max(p.date for p in pairs).year > 2080


def test_split_is_disjoint_complete_and_seeded():
    train, heldout = split_dates(2000, seed=0)
    assert len(heldout) == 2000
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == (dates.LAST_DATE - dates.FIRST_DATE).days + 1
    assert split_dates(2000, seed=0) == (train, heldout)
    assert split_dates(2000, seed=1)[1] != heldout


def test_errors():
    with pytest.raises(ValueError, match="1900-01-01"):
        render(dt.date(1899, 12, 31), 0)
    with pytest.raises(ValueError, match="format_index"):
        render(dt.date(2000, 1, 1), len(FORMATS))
    with pytest.raises(ValueError, match="not a date in a supported format"):
        parse_date("not a date")
    with pytest.raises(ValueError, match="num_heldout"):
        split_dates(0)
    with pytest.raises(ValueError, match="empty"):
        sample_pairs([], 1, random.Random(0))


@pytest.mark.parametrize("text, message", [
    ("February 30, 2020", "not a real date"),
    ("13/13/2013", "not a date in a supported format"),
    ("hello world", "not a date in a supported format"),
    ("July 4, 1776", "1776-07-04, outside the range"),
    ("thursday june 26 2009", "wrong weekday: 2009-06-26 is a friday"),
    ("06/05/2009", r"ambiguous: it reads as 2009-05-06 \(day first\) or 2009-06-05 \(month "
                   r"first\)"),
])
def test_parse_date_refuses_what_is_not_one_date_in_range(text, message):
    with pytest.raises(ValueError, match=message):
        parse_date(text)


@pytest.mark.parametrize("text", ["2009-06-25", "25/06/2009", "25/6/09", "June 25 2009",
                                  "jun 25 2009", "June 25th 2009", "25th Jun 2009",
                                  "June 25, 09", "06/25/09", "thursday june 25 2009"])
def test_common_forms_are_supported_formats(text):
    assert parse_date(text) == dt.date(2009, 6, 25)
    assert any(render(dt.date(2009, 6, 25), i).source == text.lower()
               for i in range(len(FORMATS)))


def test_numeric_slash_formats_write_only_unambiguous_dates():
    slash = [i for i, f in enumerate(FORMATS) if f.numeric_slash]
    assert len(slash) == 4
    for i in slash:
        assert not FORMATS[i].accepts(dt.date(2009, 6, 5))
        assert FORMATS[i].accepts(dt.date(2009, 6, 6)) and FORMATS[i].accepts(dt.date(2009, 6, 25))


@pytest.mark.parametrize("text, trained", [
    ("2001-3-1", "2001-03-01"), ("1th of march, 2001", "1st of march, 2001"),
    ("3/1/2001x", None), ("1.3.2001", "01.03.2001"), ("2001 3 1", "2001 03 01"),
])
def test_spellings_the_model_never_saw_are_unsupported_formats(text, trained):
    if trained is None:
        with pytest.raises(ValueError, match="not a date in a supported format"):
            dates.parse_date(text)
        return
    with pytest.raises(ValueError, match=f"unsupported format: the translator was trained on "
                                         f"'{trained}' but never on this spelling"):
        dates.parse_date(text)
    assert dates.parse_date(trained) == dt.date(2001, 3, 1)
    assert dates.readings(text) == []


def test_the_checker_accepts_every_training_spelling_and_lists_the_same_table():
    rng = random.Random(1)
    for pair in dates.sample_pairs(dates.split_dates()[0], 3000, rng):
        assert dates.parse_date(pair.source) == pair.date, pair
    assert len(dates.supported_examples()) == len(dates.FORMATS)
