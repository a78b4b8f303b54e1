"""Usage periods counted from a subscription's anchor, in UTC (pure functions).

Every boundary is computed from the anchor, never from the previous boundary, as Stripe's
billing anchor is: a monthly anchor on Jan 31 gives Feb 28 (Feb 29 in a leap year), then
Mar 31 again, not Mar 28. A yearly anchor on Feb 29 falls on Feb 28 in other years. ``never``
is one period from the anchor, without end.
"""

from calendar import monthrange
from datetime import UTC, datetime, timedelta

DAY, WEEK, MONTH, YEAR, NEVER = "day", "week", "month", "year", "never"


def _add_months(anchor: datetime, months: int) -> datetime:
    """The anchor ``months`` later, its day clamped to the month's last day."""
    year, month_index = divmod(anchor.month - 1 + months, 12)
    year += anchor.year
    day = min(anchor.day, monthrange(year, month_index + 1)[1])
    return anchor.replace(year=year, month=month_index + 1, day=day)


def boundary(anchor: datetime, reset_period: str, n: int) -> datetime:
    """The start of period ``n`` (0: the anchor; negative: before it)."""
    anchor = anchor.astimezone(UTC)
    if reset_period == DAY:
        return anchor + timedelta(days=n)
    if reset_period == WEEK:
        return anchor + timedelta(weeks=n)
    if reset_period == MONTH:
        return _add_months(anchor, n)
    if reset_period == YEAR:
        return _add_months(anchor, 12 * n)
    raise ValueError(f"no periods for reset_period {reset_period!r}")


def period_index(anchor: datetime, reset_period: str, at: datetime) -> int:
    """Which period ``at`` falls in: n with boundary(n) <= at < boundary(n + 1)."""
    anchor, at = anchor.astimezone(UTC), at.astimezone(UTC)
    if reset_period in (DAY, WEEK):
        step = timedelta(days=1 if reset_period == DAY else 7)
        return (at - anchor) // step
    months = (at.year - anchor.year) * 12 + (at.month - anchor.month)
    n = months if reset_period == MONTH else months // 12
    # The estimate is off by at most one either way (day and time of day within the month).
    while boundary(anchor, reset_period, n) > at:
        n -= 1
    while boundary(anchor, reset_period, n + 1) <= at:
        n += 1
    return n


def period_containing(anchor: datetime, reset_period: str, at: datetime) -> tuple[datetime, datetime | None]:
    """The period ``[start, end)`` that contains ``at``; ``never``: ``(anchor, None)``."""
    if reset_period == NEVER:
        return anchor.astimezone(UTC), None
    n = period_index(anchor, reset_period, at)
    return boundary(anchor, reset_period, n), boundary(anchor, reset_period, n + 1)


def past_periods(anchor: datetime, reset_period: str, at: datetime, count: int) -> list[tuple[datetime, datetime]]:
    """Up to ``count`` periods before the one containing ``at``, newest first, none before the anchor."""
    if reset_period == NEVER:
        return []
    n = period_index(anchor, reset_period, at)
    return [
        (boundary(anchor, reset_period, k), boundary(anchor, reset_period, k + 1))
        for k in range(n - 1, max(n - 1 - count, -1), -1)
    ]
