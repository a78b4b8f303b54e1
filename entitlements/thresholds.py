"""Threshold notifications: a budget's usage crossed 80 % or 100 % in one of its periods.

Every path that grows usage (ingest, API records, reprocessing, merges, unmerges, paths added
later) leaves its (user, feature, UTC day) in ``features_usagetouch`` through the usage
table's triggers; nothing more happens in that path. A periodic task drains them and looks at
each budget they draw on (the user's own and those of its groups) in the periods that contain
those days, so a late or reprocessed event is judged in its own period. A crossing is recorded
once per (subject, feature, period start, threshold) by a unique constraint, and notified
(``kana.signals.notification``) in the same transaction, so it fires once whoever crossed it.
"""

from collections import defaultdict
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from features import counters
from features.models import Feature
from kana.models import Workspace
from kana.signals import notification, thresholds_wanted
from users.models import EndUser, Group

from .access import Entitlement, Subject, evaluate, number, period_dict, user_subject
from .models import Subscription, ThresholdCrossing


def thresholds(workspace_id: int) -> list[Decimal]:
    """The fractions of a budget whose crossing is recorded: the defaults, and whatever else
    the workspace asked for (its webhook endpoints' thresholds, through ``thresholds_wanted``)."""
    wanted = {Decimal(str(t)) for t in settings.KANA_USAGE_THRESHOLDS}
    for _receiver, answer in thresholds_wanted.send(sender=ThresholdCrossing, workspace_id=workspace_id):
        wanted.update(Decimal(str(t)) for t in answer or ())
    return sorted(wanted)


def notify_usage_thresholds(*, limit: int = 500, now=None) -> tuple[int, int]:
    """Drain up to ``limit`` touched keys and record (and notify) the crossings, in one
    transaction; returns (keys drained, crossings recorded)."""
    now = now or timezone.now()
    days_by_pair: dict[tuple[int, int, int], set] = defaultdict(set)
    crossed = 0
    with transaction.atomic():
        touched = counters.drain_touched_usage(limit)
        for workspace_id, user_pk, feature_id, day in touched:
            days_by_pair[workspace_id, user_pk, feature_id].add(day)
        fractions = {workspace_id: thresholds(workspace_id) for workspace_id, _, _ in days_by_pair}
        for (workspace_id, user_pk, feature_id), days in sorted(days_by_pair.items()):
            crossed += _check_pair(workspace_id, user_pk, feature_id, _moments(days, now), fractions[workspace_id])
    return len(touched), crossed


def _moments(days, now) -> list:
    """Times whose periods cover these days: each day's first and last instant (a period may
    begin inside a day), none after now (a future-dated event is judged in the current period)."""
    moments = set()
    for day in days:
        start = datetime.combine(day, time.min, tzinfo=UTC)
        moments |= {min(start, now), min(start + timedelta(days=1, microseconds=-1), now)}
    return sorted(moments)


def _budgets(workspace: Workspace, user_pk: int, feature: Feature, at) -> list[Entitlement]:
    """The budgets a user's usage of ``feature`` at ``at`` counts against: as the user checks
    it, and as each of its subscribed groups does."""
    subject = user_subject(workspace, user_pk)
    found = [evaluate(workspace, subject, feature, delta=Decimal(0), now=at)]
    subscribed_groups = set(
        Subscription.objects.for_workspace(workspace)
        .filter(group_id__in=subject.group_pks)
        .values_list("group_id", flat=True)
    )
    found += [
        evaluate(workspace, Subject(group_pk=pk), feature, delta=Decimal(0), now=at) for pk in sorted(subscribed_groups)
    ]
    return [e for e in found if e.consumption is not None and e.consumption.budget]


def _check_pair(workspace_id: int, user_pk: int, feature_id: int, moments: list, fractions: list[Decimal]) -> int:
    if not EndUser.objects.filter(pk=user_pk).exists():
        return 0  # deleted since
    workspace = Workspace.objects.get(pk=workspace_id)
    feature = Feature.objects.get(pk=feature_id)
    crossed, seen = 0, set()
    for at in moments:
        for budget in _budgets(workspace, user_pk, feature, at):
            if (budget.owner, budget.period[0]) in seen:
                continue
            seen.add((budget.owner, budget.period[0]))
            used, limit = budget.consumption.used, budget.consumption.budget
            for threshold in fractions:
                if used >= threshold * limit and _record_crossing(workspace, budget, threshold):
                    crossed += 1
    return crossed


def _record_crossing(workspace: Workspace, budget: Entitlement, threshold: Decimal) -> bool:
    period_start = budget.period[0]
    try:
        with transaction.atomic():  # a savepoint: a crossing recorded meanwhile is not an error
            ThresholdCrossing.objects.create(
                workspace=workspace,
                subject=budget.owner,
                feature=budget.feature,
                period_start=period_start,
                threshold=threshold,
                used=budget.consumption.used,
                budget=budget.consumption.budget,
            )
    except IntegrityError:
        return False
    kind, pk = budget.owner.split(":")
    data = {
        "user_id": EndUser.objects.filter(pk=pk).values_list("user_id", flat=True).first() if kind == "user" else None,
        "group_id": Group.objects.filter(pk=pk).values_list("group_id", flat=True).first() if kind == "group" else None,
        "feature": budget.feature.key,
        "threshold": number(threshold),
        "consumption": budget.consumption.as_dict(),
        "period": period_dict(budget.period),
    }
    key = f"{budget.owner}:{budget.feature.key}:{period_start.isoformat()}:{threshold.normalize()}"
    notification.send(
        sender=ThresholdCrossing,
        workspace_id=workspace.pk,
        event_type="usage.threshold_reached",
        data=data,
        event_key=f"usage.threshold_reached:{key}",
    )
    if threshold >= 1:
        notification.send(
            sender=ThresholdCrossing,
            workspace_id=workspace.pk,
            event_type="usage.limit_reached",
            data=data,
            event_key=f"usage.limit_reached:{key}",
        )
    return True
