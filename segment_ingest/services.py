"""Applying validated Segment messages: store every one, then hand it to users/features.

Usage messages (track, page, screen) are handled in bulk, one transaction per run of
consecutive usage messages, with a fixed number of queries whatever the run's length:
rules lock + version, replay check, userId resolution, event insert, usage insert (on
PostgreSQL, runs of COPY_MIN_EVENTS or more: event ids, then COPY of events and usage).
Identify, alias and group are applied one at a time, in order, by the identity service.
"""

import json
from dataclasses import dataclass, field

from django.db import connection, transaction

from features.mapping import Decision, decide, load_rule_set
from features.models import Usage
from kana.copy_rows import copy_rows, next_ids
from kana.locks import lock_rules_shared_and_read
from kana.models import Workspace
from users import services as user_services
from users.profile import UNSET, validated_changes

from .messages import Message
from .models import USAGE_TYPES, Event, EventStatus, MessageType

BILLING_TRAITS = ("billingUserId", "billingId")
PROFILE_TRAITS = {"name", "email", *BILLING_TRAITS}
ENGAGE_CLASSES = {"audience", "trait"}


@dataclass
class Outcome:
    message_id: str
    status: str  # mapped, unmapped, processed, or duplicate (a replay: nothing changed)
    reason: str = ""
    user_pk: int | None = None
    warnings: list[dict] = field(default_factory=list)


def ingest_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    """Apply messages in order; returns one outcome per message, in the same order."""
    outcomes: list[Outcome] = []
    usage_run: list[Message] = []
    for message in messages:
        if message.type in USAGE_TYPES:
            usage_run.append(message)
            continue
        if usage_run:
            outcomes.extend(ingest_usage_messages(workspace=workspace, messages=usage_run))
            usage_run = []
        outcomes.append(ingest_profile_message(workspace=workspace, message=message))
    if usage_run:
        outcomes.extend(ingest_usage_messages(workspace=workspace, messages=usage_run))
    return outcomes


def ingest_usage_messages(*, workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    return user_services.run_with_retries(lambda: _ingest_usage_once(workspace, messages))


@transaction.atomic
def _ingest_usage_once(workspace: Workspace, messages: list[Message]) -> list[Outcome]:
    version, replayed = _lock_rules_and_find_replays(workspace, {m.message_id for m in messages})
    fresh: dict[str, Message] = {}
    for message in messages:
        if message.message_id not in replayed and message.message_id not in fresh:
            fresh[message.message_id] = message
    if not fresh:
        return [Outcome(m.message_id, "duplicate") for m in messages]

    rule_set = load_rule_set(workspace.pk, version)
    user_pks = user_services.resolve_users(workspace=workspace, external_ids={m.user_id for m in fresh.values()})
    decided = [(m, decide(rule_set, m.name, m.properties), user_pks[m.user_id]) for m in fresh.values()]
    if connection.vendor == "postgresql" and len(decided) >= COPY_MIN_EVENTS:
        _copy_events_and_usage(workspace, decided)
    else:
        _insert_events_and_usage(workspace, decided)
    by_id = {m.message_id: Outcome(m.message_id, d.status, d.reason, user_pk) for m, d, user_pk in decided}
    outcomes, seen = [], set()
    for message in messages:
        if message.message_id in by_id and message.message_id not in seen:
            outcomes.append(by_id[message.message_id])
            seen.add(message.message_id)
        else:
            outcomes.append(Outcome(message.message_id, "duplicate"))
    return outcomes


# Fewer events go in with INSERT: COPY costs two round trips and the ids one more query.
COPY_MIN_EVENTS = 8
_EVENT_COLUMNS = (
    "id",
    "workspace_id",
    "message_id",
    "type",
    "name",
    "user_id",
    "external_user_id",
    "payload",
    "occurred_at",
    "received_at",
    "status",
    "unmapped_reason",
    "warnings",
)
_USAGE_COLUMNS = ("workspace_id", "user_id", "feature_id", "event_id", "rule_id", "amount", "occurred_at")


def _copy_events_and_usage(workspace: Workspace, decided: list[tuple[Message, Decision, int]]) -> None:
    """The same rows as ``_insert_events_and_usage``, written with COPY (PostgreSQL).

    The events' ids are drawn first so the usage rows can name them. A messageId stored
    concurrently makes the COPY fail with IntegrityError: the caller retries the whole
    transaction, and the retry's replay check then finds it.
    """
    event_ids = next_ids(Event._meta.db_table, len(decided))
    ws = workspace.pk
    copy_rows(
        Event._meta.db_table,
        _EVENT_COLUMNS,
        (
            (
                event_id,
                ws,
                m.message_id,
                str(m.type),
                m.name,
                user_pk,
                m.user_id,
                m.payload_text(),
                m.occurred_at,
                m.received_at,
                str(d.status),
                str(d.reason),
                json.dumps(m.warnings) if m.warnings else "[]",
            )
            for event_id, (m, d, user_pk) in zip(event_ids, decided, strict=True)
        ),
    )
    usages = [
        (ws, user_pk, feature_id, event_id, rule_id, amount, m.occurred_at)
        for event_id, (m, d, user_pk) in zip(event_ids, decided, strict=True)
        for feature_id, amount, rule_id in d.usages
    ]
    if usages:
        copy_rows(Usage._meta.db_table, _USAGE_COLUMNS, usages)


def _insert_events_and_usage(workspace: Workspace, decided: list[tuple[Message, Decision, int]]) -> None:
    events = [
        Event(
            workspace=workspace,
            message_id=m.message_id,
            type=m.type,
            name=m.name,
            user_id=user_pk,
            external_user_id=m.user_id,
            payload=m.payload,
            occurred_at=m.occurred_at,
            received_at=m.received_at,
            status=d.status,
            unmapped_reason=d.reason,
            warnings=m.warnings,
        )
        for m, d, user_pk in decided
    ]
    Event.objects.bulk_create(events)
    usages = [
        Usage(
            workspace=workspace,
            user_id=event.user_id,
            feature_id=feature_id,
            event_id=event.pk,
            rule_id=rule_id,
            amount=amount,
            occurred_at=event.occurred_at,
        )
        for event, (_m, d, _u) in zip(events, decided, strict=True)
        for feature_id, amount, rule_id in d.usages
    ]
    if usages:
        Usage.objects.bulk_create(usages)


def _lock_rules_and_find_replays(workspace: Workspace, message_ids: set[str]) -> tuple[int, set[str]]:
    """The rules version (under the shared rules lock) and which messageIds are stored
    already, in one round trip: this runs for every message Segment sends one at a time."""
    placeholders = ", ".join(["%s"] * len(message_ids))
    sql = f"SELECT message_id FROM {Event._meta.db_table} WHERE workspace_id = %s AND message_id IN ({placeholders})"
    version, rows = lock_rules_shared_and_read(workspace.pk, sql, [workspace.pk, *message_ids])
    return version, {message_id for (message_id,) in rows}


def ingest_profile_message(*, workspace: Workspace, message: Message) -> Outcome:
    return user_services.run_with_retries(lambda: _ingest_profile_once(workspace, message))


def engage_values(message: Message) -> dict:
    """Engage audience/computed-trait values carried by an identify, name -> value."""
    context = message.payload.get("context")
    personas = context.get("personas") if isinstance(context, dict) else None
    if not isinstance(personas, dict) or personas.get("computation_class") not in ENGAGE_CLASSES:
        return {}
    key = personas.get("computation_key")
    if isinstance(key, str) and key in message.traits:
        return {key: message.traits[key]}
    return {k: v for k, v in message.traits.items() if k not in PROFILE_TRAITS}


@transaction.atomic
def _ingest_profile_once(workspace: Workspace, message: Message) -> Outcome:
    if Event.objects.for_workspace(workspace).filter(message_id=message.message_id).exists():
        return Outcome(message.message_id, "duplicate")
    warnings = list(message.warnings)
    if message.type == MessageType.IDENTIFY:
        traits = message.traits
        billing = UNSET
        for key in BILLING_TRAITS:
            if key in traits:
                billing = traits[key]
                break
        changes, problems = validated_changes(
            name=traits.get("name", UNSET),
            email=traits.get("email", UNSET),
            billing_id=billing,
            audiences=engage_values(message),
        )
        warnings.extend({"code": p.code, "message": p.message, "field": f"traits.{p.field}"} for p in problems)
        result = user_services.identify_user(
            workspace=workspace,
            user_id=message.user_id,
            changes=changes,
            occurred_at=message.occurred_at,
            source=f"message:{message.message_id}",
        )
        if result.ambiguous:
            warnings.append(
                {
                    "code": "ambiguous_email_match",
                    "message": "the email matches several users, one without a userId: not merged, flagged for review",
                    "field": "traits.email",
                }
            )
        user_pk = result.user.pk
    elif message.type == MessageType.ALIAS:
        result = user_services.alias_user(
            workspace=workspace,
            previous_id=message.previous_id,
            user_id=message.user_id,
            occurred_at=message.occurred_at,
            source=f"message:{message.message_id}",
        )
        user_pk = result.user.pk
    else:  # group
        user_pk = user_services.resolve_users(workspace=workspace, external_ids=[message.user_id])[message.user_id]
        user_services.record_group(
            workspace=workspace,
            user_pk=user_pk,
            group_id=message.group_id,
            traits=message.traits,
            occurred_at=message.occurred_at,
        )
    Event.objects.create(
        workspace=workspace,
        message_id=message.message_id,
        type=message.type,
        user_id=user_pk,
        external_user_id=message.user_id or "",
        payload=message.payload,
        occurred_at=message.occurred_at,
        received_at=message.received_at,
        status=EventStatus.PROCESSED,
        warnings=warnings,
    )
    return Outcome(message.message_id, EventStatus.PROCESSED, user_pk=user_pk, warnings=warnings)
