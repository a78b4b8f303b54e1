"""Applying validated Segment messages: store every one, then hand it to users/features.

Usage messages (track, page, screen) are handled in bulk, one transaction per run of
consecutive usage messages, with a fixed number of queries whatever the run's length:
rules lock + version, replay check, userId resolution, event insert, usage insert (on
PostgreSQL: one INSERT … ON CONFLICT DO NOTHING for events and their usage, or for runs of
COPY_MIN_EVENTS or more, COPY into staging tables and one statement moving them).
Identify, alias and group are applied one at a time, in order, by the identity service.
"""

import json
from dataclasses import dataclass, field

from django.db import connection, transaction

from features.mapping import Decision, decide, load_rule_set
from features.models import Usage
from kana.copy_rows import copy_rows
from kana.locks import lock_rules_shared_and_read
from kana.models import Workspace
from kana.retries import run_with_retries
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
    return run_with_retries(lambda: _ingest_usage_once(workspace, messages))


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
    # Sorted by messageId: concurrent batches replaying the same messages then wait on each
    # other's rows in one order, which cannot deadlock.
    decided = sorted(
        ((m, decide(rule_set, m.name, m.properties), user_pks[m.user_id]) for m in fresh.values()),
        key=lambda item: item[0].message_id,
    )
    if connection.vendor != "postgresql":
        _insert_events_and_usage(workspace, decided)
        stored = set(fresh)
    elif len(decided) >= COPY_MIN_EVENTS:
        stored = _copy_events_and_usage(workspace, decided)
    else:
        stored = _insert_events_and_usage_returning(workspace, decided)
    by_id = {m.message_id: Outcome(m.message_id, d.status, d.reason, user_pk) for m, d, user_pk in decided}
    outcomes, seen = [], set()
    for message in messages:
        if message.message_id in stored and message.message_id not in seen:
            outcomes.append(by_id[message.message_id])
            seen.add(message.message_id)
        else:
            outcomes.append(Outcome(message.message_id, "duplicate"))
    return outcomes


# Fewer events go in with one INSERT statement; more are COPYed into a staging table first
# (COPY costs two round trips more, but no per-value rendering in Python).
COPY_MIN_EVENTS = 8
_EVENT_COLUMNS = (
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
_EVENT_VALUE_TYPES = (
    "bigint",
    "text",
    "text",
    "text",
    "bigint",
    "text",
    "jsonb",
    "timestamptz",
    "timestamptz",
    "text",
    "text",
    "jsonb",
)
# Usage rows are matched to their event by messageId: only events that were really inserted
# (not skipped as a concurrent replay) get usage.
_USAGE_STAGE_COLUMNS = ("message_id", "user_id", "feature_id", "rule_id", "amount", "occurred_at")
_USAGE_VALUE_TYPES = ("text", "bigint", "bigint", "bigint", "numeric", "timestamptz")
_EVENT_TABLE = Event._meta.db_table
_USAGE_TABLE = Usage._meta.db_table
_INSERT_USAGE_FOR = f"""
    INSERT INTO {_USAGE_TABLE} (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)
    SELECT %(ws)s, u.user_id, u.feature_id, ev.id, u.rule_id, u.amount, u.occurred_at
    FROM {{source}} AS u ({", ".join(_USAGE_STAGE_COLUMNS)}) JOIN ev USING (message_id)
    ON CONFLICT (event_id, feature_id) DO NOTHING"""


def _event_row(
    workspace: Workspace, m: Message, d: Decision, user_pk: int, warnings: list[dict] | None = None
) -> tuple:
    warnings = m.warnings if warnings is None else warnings
    return (
        workspace.pk,
        m.message_id,
        str(m.type),
        m.name,
        user_pk,
        m.user_id or "",
        m.payload_text(),
        m.occurred_at,
        m.received_at,
        str(d.status),
        str(d.reason),
        json.dumps(warnings) if warnings else "[]",
    )


def _usage_rows(decided: list[tuple[Message, Decision, int]]) -> list[tuple]:
    return [
        (m.message_id, user_pk, feature_id, rule_id, amount, m.occurred_at)
        for m, d, user_pk in decided
        for feature_id, amount, rule_id in d.usages
    ]


def _values_sql(rows: list[tuple], types: tuple[str, ...]) -> tuple[str, list]:
    """``VALUES (…), (…)`` with the first row's values cast, so PostgreSQL knows the types."""
    first = "(" + ", ".join(f"%s::{t}" for t in types) + ")"
    rest = "(" + ", ".join(["%s"] * len(types)) + ")"
    sql = "VALUES " + ", ".join([first] + [rest] * (len(rows) - 1))
    return sql, [value for row in rows for value in row]


def _insert_events_and_usage_returning(workspace: Workspace, decided: list[tuple[Message, Decision, int]]) -> set[str]:
    """Events and their usage in one statement (PostgreSQL); returns the messageIds stored.

    A messageId stored meanwhile by a concurrent request is skipped by the insert itself
    (``ON CONFLICT DO NOTHING``, which waits for that request to commit), so a replay race
    is decided by the database, not by retrying.
    """
    events_sql, params = _values_sql([_event_row(workspace, m, d, u) for m, d, u in decided], _EVENT_VALUE_TYPES)
    sql = (
        f"WITH ev AS (INSERT INTO {_EVENT_TABLE} ({', '.join(_EVENT_COLUMNS)}) {events_sql}"
        " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING id, message_id)"
    )
    usages = _usage_rows(decided)
    if usages:
        usage_sql, usage_params = _values_sql(usages, _USAGE_VALUE_TYPES)
        sql += ", used AS (" + _INSERT_USAGE_FOR.format(source=f"({usage_sql})").replace("%(ws)s", "%s") + ")"
        params += [workspace.pk, *usage_params]  # the workspace comes first in the usage SELECT
    with connection.cursor() as cursor:
        cursor.execute(sql + " SELECT message_id FROM ev", params)
        return {message_id for (message_id,) in cursor.fetchall()}


_STAGE_SQL = f"""
CREATE TEMP TABLE IF NOT EXISTS kana_event_stage ON COMMIT DELETE ROWS
    AS SELECT {", ".join(_EVENT_COLUMNS)} FROM {_EVENT_TABLE} WITH NO DATA;
CREATE TEMP TABLE IF NOT EXISTS kana_usage_stage
    (message_id text, user_id bigint, feature_id bigint, rule_id bigint, amount numeric, occurred_at timestamptz)
    ON COMMIT DELETE ROWS
"""
_UNSTAGE_SQL = f"""
WITH staged AS (DELETE FROM kana_event_stage RETURNING {", ".join(_EVENT_COLUMNS)}),
ev AS (
    INSERT INTO {_EVENT_TABLE} ({", ".join(_EVENT_COLUMNS)})
    SELECT {", ".join(_EVENT_COLUMNS)} FROM staged ORDER BY message_id
    ON CONFLICT (workspace_id, message_id) DO NOTHING
    RETURNING id, message_id
),
staged_usage AS (DELETE FROM kana_usage_stage RETURNING *),
used AS ({_INSERT_USAGE_FOR.format(source="staged_usage")})
SELECT message_id FROM ev
"""


def _copy_events_and_usage(workspace: Workspace, decided: list[tuple[Message, Decision, int]]) -> set[str]:
    """The same as ``_insert_events_and_usage_returning`` for larger runs (PostgreSQL): the
    rows are COPYed into per-connection staging tables, then moved by one statement that
    skips stored messageIds. Returns the messageIds stored."""
    with connection.cursor() as cursor:
        cursor.execute(_STAGE_SQL)
    copy_rows("kana_event_stage", _EVENT_COLUMNS, (_event_row(workspace, m, d, u) for m, d, u in decided))
    usages = _usage_rows(decided)
    if usages:
        copy_rows("kana_usage_stage", _USAGE_STAGE_COLUMNS, usages)
    with connection.cursor() as cursor:
        cursor.execute(_UNSTAGE_SQL, {"ws": workspace.pk})
        return {message_id for (message_id,) in cursor.fetchall()}


def _insert_events_and_usage(workspace: Workspace, decided: list[tuple[Message, Decision, int]]) -> None:
    """SQLite: plain inserts. Its writers are serialised, so the replay check cannot race."""
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
    return run_with_retries(lambda: _ingest_profile_once(workspace, message))


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


class _ReplayedMeanwhile(Exception):
    """A concurrent request stored the same messageId first: undo this one's changes."""


def _ingest_profile_once(workspace: Workspace, message: Message) -> Outcome:
    try:
        with transaction.atomic():
            return _apply_profile_message(workspace, message)
    except _ReplayedMeanwhile:
        return Outcome(message.message_id, "duplicate")


def _apply_profile_message(workspace: Workspace, message: Message) -> Outcome:
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
    if not _store_profile_event(workspace, message, user_pk, warnings):
        raise _ReplayedMeanwhile()
    return Outcome(message.message_id, EventStatus.PROCESSED, user_pk=user_pk, warnings=warnings)


def _store_profile_event(workspace: Workspace, message: Message, user_pk: int, warnings: list[dict]) -> bool:
    """Store an applied identify/alias/group; False when its messageId was stored meanwhile."""
    if connection.vendor != "postgresql":  # serialised writers: the check above cannot race
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
        return True
    row = _event_row(workspace, message, Decision(EventStatus.PROCESSED), user_pk, warnings=warnings)
    values, params = _values_sql([row], _EVENT_VALUE_TYPES)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_EVENT_TABLE} ({', '.join(_EVENT_COLUMNS)}) {values}"
            " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING id",
            params,
        )
        return cursor.fetchone() is not None
