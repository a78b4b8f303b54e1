"""Helpers for the usage, rules and reprocessing tests: features, rules and stored events."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.db.models import Sum

from features.models import Event, EventStatus, Feature, MappingRule, MessageType, UnmappedReason, Usage
from features.services import RuleDefinition, feature_create, rule_create
from kana.models import Workspace
from users.models import EndUser, UserIdentity

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def make_feature(workspace: Workspace, key: str, **fields) -> Feature:
    return feature_create(workspace=workspace, key=key, **fields)


def make_rule(
    workspace: Workspace, feature: str, *, event: str | None = None, name: str = "rule", **definition
) -> MappingRule:
    """A rule made by the service; ``definition``: the rest of RuleDefinition (conditions,
    amount_property, active), its defaults when left out."""
    definition = RuleDefinition(name=name, feature_key=feature, event_name=event, **definition)
    return rule_create(workspace=workspace, definition=definition)


def make_user(workspace: Workspace, user_id: str) -> EndUser:
    user = EndUser.objects.create(workspace=workspace, user_id=user_id, created_at=T0)
    UserIdentity.objects.create(workspace=workspace, user=user, external_id=user_id, created_at=T0)
    return user


def store_unmapped_events(
    workspace: Workspace,
    user: EndUser,
    specs: list[tuple[str, dict]],
    *,
    prefix: str = "stored",
    reason: str = UnmappedReason.NO_MATCHING_RULE,
    start: datetime = T0,
) -> list[Event]:
    """Unmapped track events as ingest would have stored them, one a minute from ``start``.

    Bulk-inserted: fault tests need tens of thousands of them quickly.
    """
    events = [
        Event(
            workspace=workspace,
            message_id=f"{prefix}-{index}",
            type=MessageType.TRACK,
            name=name,
            user=user,
            external_user_id=user.user_id or "",
            payload={"type": "track", "event": name, "userId": user.user_id, "properties": properties},
            occurred_at=start + timedelta(minutes=index),
            received_at=start + timedelta(minutes=index),
            status=EventStatus.UNMAPPED,
            unmapped_reason=reason,
        )
        for index, (name, properties) in enumerate(specs)
    ]
    return Event.objects.bulk_create(events, batch_size=5000)


def usage_total(workspace: Workspace, feature: str) -> Decimal:
    total = Usage.objects.for_workspace(workspace).filter(feature__key=feature).aggregate(t=Sum("amount"))["t"]
    return Decimal(total or 0).normalize()


def usage_count(workspace: Workspace, feature: str) -> int:
    return Usage.objects.for_workspace(workspace).filter(feature__key=feature).count()
