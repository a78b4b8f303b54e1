"""Periods counted from the anchor in UTC (entitlements.periods, SPEC §11), at their boundaries."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from entitlements.periods import boundary, past_periods, period_containing


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_monthly_anchor_on_the_31st_ends_short_months_on_their_last_day():
    anchor = utc(2025, 1, 31, 10)
    assert [boundary(anchor, "month", n) for n in range(5)] == [
        utc(2025, 1, 31, 10),
        utc(2025, 2, 28, 10),
        utc(2025, 3, 31, 10),  # from the anchor, not from Feb 28
        utc(2025, 4, 30, 10),
        utc(2025, 5, 31, 10),
    ]
    assert boundary(utc(2024, 1, 31), "month", 1) == utc(2024, 2, 29)  # leap year


def test_the_period_containing_a_time_is_half_open():
    anchor = utc(2025, 1, 31, 10)
    assert period_containing(anchor, "month", utc(2025, 2, 28, 9, 59, 59)) == (anchor, utc(2025, 2, 28, 10))
    assert period_containing(anchor, "month", utc(2025, 2, 28, 10)) == (utc(2025, 2, 28, 10), utc(2025, 3, 31, 10))
    assert period_containing(anchor, "month", utc(2025, 3, 31, 9)) == (utc(2025, 2, 28, 10), utc(2025, 3, 31, 10))
    assert period_containing(anchor, "month", utc(2026, 1, 1)) == (utc(2025, 12, 31, 10), utc(2026, 1, 31, 10))


def test_a_yearly_anchor_on_february_29():
    anchor = utc(2024, 2, 29, 12)
    assert [boundary(anchor, "year", n) for n in range(5)] == [
        utc(2024, 2, 29, 12),
        utc(2025, 2, 28, 12),
        utc(2026, 2, 28, 12),
        utc(2027, 2, 28, 12),
        utc(2028, 2, 29, 12),
    ]
    assert period_containing(anchor, "year", utc(2028, 2, 29, 11)) == (utc(2027, 2, 28, 12), utc(2028, 2, 29, 12))


def test_days_and_weeks():
    anchor = utc(2025, 3, 1, 18, 30)
    assert period_containing(anchor, "day", utc(2025, 3, 5, 18, 29)) == (
        utc(2025, 3, 4, 18, 30),
        utc(2025, 3, 5, 18, 30),
    )
    assert period_containing(anchor, "week", utc(2025, 3, 8, 18, 30)) == (
        utc(2025, 3, 8, 18, 30),
        utc(2025, 3, 15, 18, 30),
    )
    assert period_containing(anchor, "day", utc(2025, 3, 1, 18, 0)) == (utc(2025, 2, 28, 18, 30), anchor)


def test_never_is_one_period_from_the_anchor():
    anchor = utc(2025, 3, 1)
    assert period_containing(anchor, "never", utc(2030, 1, 1)) == (anchor, None)
    assert past_periods(anchor, "never", utc(2030, 1, 1), 6) == []


def test_anchors_in_other_offsets_are_counted_in_utc():
    anchor = datetime(2025, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # Feb 1, 04:30 UTC
    assert period_containing(anchor, "month", utc(2025, 2, 15)) == (utc(2025, 2, 1, 4, 30), utc(2025, 3, 1, 4, 30))


def test_past_periods_are_newest_first_and_stop_at_the_anchor():
    anchor = utc(2025, 1, 31)
    assert past_periods(anchor, "month", utc(2025, 4, 1), 6) == [
        (utc(2025, 2, 28), utc(2025, 3, 31)),
        (utc(2025, 1, 31), utc(2025, 2, 28)),
    ]


@pytest.mark.parametrize("period", ["day", "week", "month", "year"])
def test_every_time_falls_in_exactly_one_period(period):
    anchor = utc(2024, 1, 31, 7)
    at = utc(2023, 11, 1)
    while at < utc(2026, 6, 1):
        start, end = period_containing(anchor, period, at)
        assert start <= at < end
        at += timedelta(hours=37)
