"""Period totals read from the daily usage counters, and their rebuild from the usage rows.

``UsageCounter`` holds usage per (user, feature, UTC day), kept by database triggers on the
usage table (see ``features/migrations/0004_feature_units_and_usage_counters.py``), so every
path that writes usage (ingest, API records, reprocessing, merges, unmerges, voids, deletes,
and any added later) moves the counters in its own statement. A period's total is the sum of
the counters of the whole days inside it plus the exact usage rows of its (at most two)
partial boundary days: a check never scans usage history, whatever its age.
"""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from django.db import connection, transaction
from django.db.models import Q, Sum
from django.db.models.functions import TruncDate

from .models import Usage, UsageCounter, UsageTouch


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def split_period(start: datetime, end: datetime | None) -> tuple[date, date | None, list[tuple[datetime, datetime]]]:
    """A period as whole UTC days ``[first_day, end_day)`` and the partial ranges around them.

    ``end`` None: the period never ends (``end_day`` None). The partial ranges are half-open
    ``[from, to)`` time ranges read from the usage rows themselves.
    """
    start = start.astimezone(UTC)
    first_day = start.date() if start.timetz() == time.min.replace(tzinfo=UTC) else start.date() + timedelta(days=1)
    if end is None:
        partial = [] if first_day == start.date() else [(start, _midnight(first_day))]
        return first_day, None, partial
    end = end.astimezone(UTC)
    end_day = end.date()  # days before it end at or before ``end``
    if first_day >= end_day:
        return first_day, first_day, [(start, end)] if start < end else []
    partial = []
    if start < _midnight(first_day):
        partial.append((start, _midnight(first_day)))
    if _midnight(end_day) < end:
        partial.append((_midnight(end_day), end))
    return first_day, end_day, partial


def period_used(
    workspace_id: int, *, user_pks: list[int], feature_id: int, start: datetime, end: datetime | None
) -> Decimal:
    """The usage of these users for one feature in ``[start, end)`` (``end`` None: from
    ``start`` on): counters for whole days, usage rows for the partial days. Two indexed reads."""
    if not user_pks:
        return Decimal(0)
    first_day, end_day, partial = split_period(start, end)
    total = Decimal(0)
    if end_day is None or first_day < end_day:
        days = UsageCounter.objects.for_workspace(workspace_id).filter(
            user_id__in=user_pks, feature_id=feature_id, day__gte=first_day
        )
        if end_day is not None:
            days = days.filter(day__lt=end_day)
        total += days.aggregate(total=Sum("amount"))["total"] or 0
    if partial:
        ranges = Q()
        for range_start, range_end in partial:
            ranges |= Q(occurred_at__gte=range_start, occurred_at__lt=range_end)
        rows = Usage.objects.for_workspace(workspace_id).filter(ranges, user_id__in=user_pks, feature_id=feature_id)
        total += rows.aggregate(total=Sum("amount"))["total"] or 0
    return Decimal(total)


@dataclass(frozen=True)
class CounterDifference:
    workspace_id: int
    user_id: int
    feature_id: int
    day: date
    counted: Decimal  # what the counter said
    actual: Decimal  # what the usage rows sum to


def _actual_by_key(workspace_id: int | None) -> dict[tuple, Decimal]:
    usage = Usage.objects.all() if workspace_id is None else Usage.objects.for_workspace(workspace_id)
    rows = (
        usage.annotate(day=TruncDate("occurred_at", tzinfo=UTC))
        .values_list("workspace_id", "user_id", "feature_id", "day")
        .annotate(total=Sum("amount"))
        .order_by()
    )
    return {(ws, user, feature, day): Decimal(total) for ws, user, feature, day, total in rows if total}


def _counted_by_key(workspace_id: int | None) -> dict[tuple, Decimal]:
    counters = UsageCounter.objects.all() if workspace_id is None else UsageCounter.objects.for_workspace(workspace_id)
    return {
        (ws, user, feature, day): Decimal(amount)
        for ws, user, feature, day, amount in counters.values_list(
            "workspace_id", "user_id", "feature_id", "day", "amount"
        )
        if amount
    }


def counter_differences(workspace_id: int | None = None) -> list[CounterDifference]:
    """Where the counters disagree with the usage rows (zero rows count as absent)."""
    actual, counted = _actual_by_key(workspace_id), _counted_by_key(workspace_id)
    return [
        CounterDifference(*key, counted=counted.get(key, Decimal(0)), actual=actual.get(key, Decimal(0)))
        for key in sorted(actual.keys() | counted.keys())
        if actual.get(key, Decimal(0)) != counted.get(key, Decimal(0))
    ]


def rebuild_usage_counters(workspace_id: int | None = None) -> list[CounterDifference]:
    """Recompute the counters from the usage rows; returns the differences found (and fixed).

    Writers of usage are held off for the rebuild (PostgreSQL: the usage table locked in
    SHARE mode), so no change can fall between the read and the rewrite.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {Usage._meta.db_table} IN SHARE MODE")
        differences = counter_differences(workspace_id)
        counters = (
            UsageCounter.objects.all() if workspace_id is None else UsageCounter.objects.for_workspace(workspace_id)
        )
        counters.delete()
        UsageCounter.objects.bulk_create(
            [
                UsageCounter(workspace_id=ws, user_id=user, feature_id=feature, day=day, amount=amount)
                for (ws, user, feature, day), amount in sorted(_actual_by_key(workspace_id).items())
            ],
            batch_size=2000,
        )
    return differences


# --- Touched pairs: what the threshold notifications look at -------------------------------


def drain_touched_usage(limit: int = 500) -> list[tuple[int, int, int, date]]:
    """Take up to ``limit`` touched (workspace, user, feature, day) keys, oldest first,
    removing them. Call it inside the transaction that handles them: a rollback puts them back.

    PostgreSQL: keys a transaction still holds (its usage not committed yet) are skipped and
    taken at a later drain, once visible; a key touched again after this drain is re-added.
    """
    if connection.vendor != "postgresql":
        rows = list(
            UsageTouch.objects.order_by("pk").values_list("pk", "workspace_id", "user_id", "feature_id", "day")[:limit]
        )
        UsageTouch.objects.filter(pk__in=[pk for pk, *_ in rows]).delete()
        return [tuple(rest) for _, *rest in rows]
    table = UsageTouch._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING workspace_id, user_id, feature_id, day",
            [limit],
        )
        return sorted(cursor.fetchall())
