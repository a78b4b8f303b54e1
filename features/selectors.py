"""Reads of usage, events, rules' reprocessing progress and the unmapped-events explorer."""

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from features.models import Event, EventStatus
from kana.jobs import JobStatus
from kana.models import Workspace
from users.models import EndUser
from users.selectors import sharing_an_email

from .models import Feature, MappingRule, ReprocessingJob, Usage


def usage_total_rows(
    workspace: Workspace,
    *,
    usage: QuerySet[Usage] | None = None,
    user_pk: int | None = None,
    feature_key: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> QuerySet:
    """Total usage per (user, feature) as a query of ``{"user_id", "feature__key", "total"}``
    rows, ordered by user then feature, so a caller can page through it without loading all.

    ``start`` is inclusive and ``end`` exclusive, on the events' original times. ``usage`` is
    where to start (the REST API's workspace-scoped queryset); default: the workspace's usage.
    """
    usage = usage if usage is not None else Usage.objects.for_workspace(workspace)
    if user_pk is not None:
        usage = usage.filter(user_id=user_pk)
    if feature_key is not None:
        usage = usage.filter(feature__key=feature_key)
    if start is not None:
        usage = usage.filter(occurred_at__gte=start)
    if end is not None:
        usage = usage.filter(occurred_at__lt=end)
    return usage.values("user_id", "feature__key").annotate(total=Sum("amount")).order_by("user_id", "feature__key")


def usage_totals(
    workspace: Workspace,
    *,
    user_pk: int | None = None,
    feature_key: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[dict]:
    """Total usage per (user, feature): ``[{"user_pk", "feature", "total"}]``.

    ``start`` is inclusive and ``end`` exclusive, on the events' original times.
    """
    rows = usage_total_rows(workspace, user_pk=user_pk, feature_key=feature_key, start=start, end=end)
    return [total_row(r) for r in rows]


def total_row(row: dict) -> dict:
    """A ``usage_total_rows`` row as ``{"user_pk", "feature", "total"}``."""
    return {"user_pk": row["user_id"], "feature": row["feature__key"], "total": Decimal(row["total"] or 0).normalize()}


def user_usage(workspace: Workspace, *, user_pk: int, start=None, end=None) -> list[dict]:
    """One row per feature of the workspace for one user (0 for features never used)."""
    totals = {r["feature"]: r["total"] for r in usage_totals(workspace, user_pk=user_pk, start=start, end=end)}
    return [
        {"feature": key, "name": name, "type": type_, "total": totals.get(key, Decimal(0))}
        for key, name, type_ in Feature.objects.for_workspace(workspace)
        .order_by("key")
        .values_list("key", "name", "type")
    ]


def user_usage_by_day(
    workspace: Workspace, *, user_pk: int, days: int = 30, today: date | None = None
) -> dict[str, list[tuple[date, Decimal]]]:
    """Daily usage totals (UTC days) of one user over the last ``days`` days, today included.

    One entry per feature of the workspace, each with every day of the range (0 when unused).
    """
    today = today or timezone.now().astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    rows = (
        Usage.objects.for_workspace(workspace)
        .filter(user_id=user_pk, occurred_at__gte=start, occurred_at__lt=start + timedelta(days=days))
        .annotate(day=TruncDate("occurred_at", tzinfo=UTC))
        .values("feature__key", "day")
        .annotate(total=Sum("amount"))
    )
    totals = {(r["feature__key"], r["day"]): Decimal(r["total"] or 0).normalize() for r in rows}
    span = [first + timedelta(days=n) for n in range(days)]
    return {
        key: [(day, totals.get((key, day), Decimal(0))) for day in span]
        for key in Feature.objects.for_workspace(workspace).order_by("key").values_list("key", flat=True)
    }


def event_list(
    workspace: Workspace,
    *,
    events: QuerySet[Event] | None = None,
    status: str | None = None,
    event: str | None = None,
    user_pk: int | None = None,
) -> QuerySet[Event]:
    """Events newest first. ``events`` is where to start (default: the workspace's events)."""
    events = events if events is not None else Event.objects.for_workspace(workspace)
    if status:
        events = events.filter(status=status)
    if event:
        events = events.filter(name=event)
    if user_pk is not None:
        events = events.filter(user_id=user_pk)
    return events.order_by("-received_at", "-pk")


@dataclass
class Progress:
    status: str
    scanned: int
    mapped: int
    job_id: int | None = None
    error: str = ""  # why the job failed ("" unless status is "failed")


def reprocessing_of(rule: MappingRule) -> Progress:
    """The progress of a rule's latest reprocessing job ("done" with zeros if it had none)."""
    return reprocessing_by_rule(rule.workspace_id, [rule.pk])[rule.pk]


def reprocessing_by_rule(workspace: Workspace | int, rule_pks: list[int]) -> dict[int, Progress]:
    """``reprocessing_of`` for a page of rules, in one query.

    A job split into parts (``features.reprocessing.job_parts``) is summed over them:
    scanned and mapped add up; it is failed if any part failed (with that part's error),
    done when every part is, queued while none has started, running otherwise."""
    parts: dict[int, list[tuple]] = {}
    jobs = (
        ReprocessingJob.objects.for_workspace(workspace)
        .filter(rule_id__in=rule_pks)
        .annotate(job=Coalesce("part_of_id", "pk"))
        .order_by("rule_id", "-job", "pk")
        .values_list("rule_id", "job", "status", "scanned", "mapped", "error")
    )
    for rule_pk, job_pk, status, scanned, mapped, error in jobs:
        latest = parts.setdefault(rule_pk, [])
        if not latest or latest[0][0] == job_pk:  # the rule's newest job only
            latest.append((job_pk, status, scanned, mapped, error))
    return {pk: _summed(parts[pk]) if pk in parts else Progress(status="done", scanned=0, mapped=0) for pk in rule_pks}


def _summed(parts: list[tuple]) -> Progress:
    statuses = [status for _job, status, _s, _m, _e in parts]
    failed = next((error for _job, status, _s, _m, error in parts if status == JobStatus.FAILED), None)
    if failed is not None:
        status, error = JobStatus.FAILED, failed
    elif all(s == JobStatus.DONE for s in statuses):
        status, error = JobStatus.DONE, ""
    elif all(s == JobStatus.QUEUED for s in statuses):
        status, error = JobStatus.QUEUED, ""
    else:
        status, error = JobStatus.RUNNING, ""
    return Progress(
        status=status.value,
        scanned=sum(p[2] for p in parts),
        mapped=sum(p[3] for p in parts),
        job_id=parts[0][0],
        error=error,
    )


# The explorer looks at the newest unmapped events only: enough to see what to write a rule
# for, and bounded in time and memory however many events are stored.
EXPLORER_SAMPLE = 5000
_MAX_VALUE_LENGTH = 80


def unmapped_by_event(workspace: Workspace, *, limit: int = 100) -> list[dict]:
    """Unmapped events grouped by event name with counts (all of them, not a sample)."""
    rows = (
        Event.objects.for_workspace(workspace)
        .filter(status=EventStatus.UNMAPPED)
        .values("name", "unmapped_reason")
        .annotate(count=Count("id"))
        .order_by("-count", "name")[:limit]
    )
    return [{"event": r["name"], "reason": r["unmapped_reason"], "count": r["count"]} for r in rows]


def _flatten(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        for inner in value:
            yield from _flatten(inner, prefix)
    else:
        yield prefix, value


def unmapped_by_property(workspace: Workspace, *, event: str | None = None, limit: int = 100) -> dict:
    """Property paths and values of recent unmapped events, with counts, most common first.

    Paths use the rules' dot notation, so a row can become a rule condition as it is.
    """
    events = Event.objects.for_workspace(workspace).filter(status=EventStatus.UNMAPPED)
    if event:
        events = events.filter(name=event)
    sample = list(events.order_by("-pk").values_list("payload__properties", flat=True)[:EXPLORER_SAMPLE])
    counts: Counter = Counter()
    for properties in sample:
        if not isinstance(properties, dict):
            continue
        seen = set()
        for path, value in _flatten(properties):
            shown = value if isinstance(value, (int, float, bool)) or value is None else str(value)[:_MAX_VALUE_LENGTH]
            key = (path, repr(shown), shown)
            if key[:2] not in seen:
                seen.add(key[:2])
                counts[key] += 1
    rows = [{"property": path, "value": shown, "count": n} for (path, _r, shown), n in counts.most_common(limit)]
    return {"sampled_events": len(sample), "rows": rows}


@dataclass
class SegmentStatus:
    last_event_at: object
    unmapped_events: int
    users_without_billing_id: int
    users_with_same_email: int


def segment_status(workspace: Workspace) -> SegmentStatus:
    """The Segment page's boxes: unmapped events, users without billing id, shared emails."""
    last = Event.objects.for_workspace(workspace).order_by("-received_at").values_list("received_at", flat=True).first()
    return SegmentStatus(
        last_event_at=last,
        unmapped_events=Event.objects.for_workspace(workspace).filter(status=EventStatus.UNMAPPED).count(),
        users_without_billing_id=EndUser.objects.for_workspace(workspace).filter(billing_id="").count(),
        users_with_same_email=sharing_an_email(EndUser.objects.for_workspace(workspace)).count(),
    )


def anonymous_event_counts(workspace: Workspace) -> dict[str, int]:
    """Held anonymous events: ``{"pending": n, "expired": n}`` (expired ones are kept, counted)."""
    rows = (
        Event.objects.for_workspace(workspace)
        .filter(status__in=[EventStatus.PENDING, EventStatus.EXPIRED])
        .values("status")
        .annotate(n=Count("id"))
    )
    counts = {row["status"]: row["n"] for row in rows}
    return {"pending": counts.get(EventStatus.PENDING, 0), "expired": counts.get(EventStatus.EXPIRED, 0)}
