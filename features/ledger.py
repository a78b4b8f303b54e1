"""The only writer of events and usage: every path that stores, maps, moves or removes them.

Ingest records messages here; reprocessing maps stored events here; voids remove usage here;
merges, undone merges and user deletions move or remove a user's events and usage here,
through the signals ``users.signals`` sends (connected by importing this module in
``FeaturesConfig.ready``). Keeping the writes in one module is what lets the usage totals
(and the counters SPEC §11 keeps on them) stay exact whichever path changed them.

Idempotency is the database's: ``(workspace, message_id)`` is unique on events and
``(event, feature)`` on usage, and every insert here skips what is stored already
(``ON CONFLICT DO NOTHING``) rather than checking first and racing.
"""

import functools
import json
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.db import connection
from django.db.models import ProtectedError
from django.db.models.signals import pre_delete
from django.dispatch import receiver

from kana.db import kept_cursor, on_postgres, pipelined, prepared
from kana.locks import (
    lock_rules_exclusive,
    lock_rules_shared_and_read,
    lock_rules_shared_then_read,
    lock_rules_shared_then_run,
)
from kana.models import Workspace
from users.models import AnonymousLink, Suppression, UserIdentity
from users.signals import user_absorbed, user_deleting, user_restored

from .incoming import Message, compact_json
from .mapping import Decision
from .models import Event, EventStatus, Usage

# One decided usage message: the message, its mapping decision, its user's id.
Decided = tuple[Message, Decision, int]


def record_usage_events(
    workspace: Workspace, decided: list[Decided], *, then_commit: bool = False, prepare: bool = False
) -> set[str]:
    """Store track/page/screen events and their usage; returns the messageIds stored.

    ``then_commit`` (inside ``kana.db.pipelined.transaction``): the statement that inserts
    the events carries the transaction's ``COMMIT`` in the same round trip. ``prepare``: a
    single event's insert is a prepared statement (``kana.db.prepared``); a caller that
    passes it re-runs its transaction once when ``prepared.is_missing`` its error.

    A messageId that another request stored meanwhile is skipped by the insert itself (it
    waits for that request to commit) and is not returned: its message is a replay. Rows go
    in messageId order, so concurrent batches replaying the same messages wait on each
    other in one order, which cannot deadlock. A messageId repeated in ``decided`` is stored
    once, as its first copy: event and usage alike.
    """
    first: dict[str, Decided] = {}
    for item in decided:
        first.setdefault(item[0].message_id, item)
    # One row per messageId: each usage row is then for an event this statement inserts
    # (``ev`` returns only those), one per feature (``Decision.usages``), so no (event,
    # feature) can exist already and the usage insert needs no ``ON CONFLICT``.
    decided = sorted(first.values(), key=lambda item: item[0].message_id)
    if not on_postgres():
        _insert_serialised(workspace, decided)
        return {m.message_id for m, _, _ in decided}
    if len(decided) >= JSON_ROWS_MIN_EVENTS:
        return _insert_json_rows(workspace, decided, then_commit=then_commit, prepare=prepare)
    return _insert_returning(workspace, decided, then_commit=then_commit, prepare=prepare)


# Fewer events go in with one INSERT of rendered values; more as JSON documents
# (``_insert_json_rows``: no per-value rendering in Python).
JSON_ROWS_MIN_EVENTS = 8
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
_INSERT_NEW_EVENTS_USAGE = f"""
    INSERT INTO {_USAGE_TABLE} (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)
    SELECT %(ws)s, u.user_id, u.feature_id, ev.id, u.rule_id, u.amount, u.occurred_at
    FROM {{source}} AS u ({", ".join(_USAGE_STAGE_COLUMNS)}) JOIN ev USING (message_id)"""


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
        m.user_id or m.anonymous_id or "",  # a pending event is keyed by its anonymousId
        m.payload_text(),
        m.occurred_at,
        m.received_at,
        str(d.status),
        str(d.reason),
        json.dumps(warnings) if warnings else "[]",
    )


def _usage_rows(decided: list[Decided]) -> list[tuple]:
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


# A single event's insert is prepared when it has at most this many usage rows: the
# statement's text varies with the rows' count, so the prepared shapes stay few (one per count).
PREPARED_MAX_USAGES = 4


def _insert_returning(
    workspace: Workspace, decided: list[Decided], *, then_commit: bool = False, prepare: bool = False
) -> set[str]:
    """Events and their usage in one statement (PostgreSQL); returns the messageIds stored.

    A messageId stored meanwhile by a concurrent request is skipped by the insert itself
    (``ON CONFLICT DO NOTHING``, which waits for that request to commit), so a replay race
    is decided by the database, not by retrying.
    """
    usages = _usage_rows(decided)
    sql = _insert_returning_sql(len(decided), len(usages))
    params = [value for m, d, u in decided for value in _event_row(workspace, m, d, u)]
    if usages:
        params += [workspace.pk, *(value for row in usages for value in row)]  # the workspace first in the usage SELECT
    # With the COMMIT in the same round trip: if the insert fails, PostgreSQL skips the
    # COMMIT and the transaction is left aborted, for the caller's ROLLBACK. On the kept
    # cursor (kana.db.kept_cursor): this is a single track's second round trip.
    if prepare and len(decided) == 1 and len(usages) <= PREPARED_MAX_USAGES:
        # The single track's insert: parsing and planning it was half of its PostgreSQL time.
        # Its values are bound server-side (``message_rows``): formatting them into an
        # ``EXECUTE`` text was the largest part of the app's CPU in the track's statements.
        statements = [kept_cursor.Statement(sql, params, prepare=True)]
        if then_commit:
            statements.append(kept_cursor.Statement("COMMIT"))
        return {message_id for (message_id,) in kept_cursor.message_rows(statements)}
    return {message_id for (message_id,) in kept_cursor.rows(sql + pipelined.COMMIT if then_commit else sql, params)}


@functools.lru_cache(maxsize=256)
def _insert_returning_sql(event_count: int, usage_count: int) -> str:
    """``_insert_returning``'s statement for so many events and usage rows: its text depends on
    the counts alone, so it is built once per process and shape (building it was ≈ 20 µs of a
    single track's app CPU; fewer than ``JSON_ROWS_MIN_EVENTS`` events take this form)."""
    events_sql, _ = _values_sql([()] * event_count, _EVENT_VALUE_TYPES)
    sql = (
        f"WITH ev AS (INSERT INTO {_EVENT_TABLE} ({', '.join(_EVENT_COLUMNS)}) {events_sql}"
        " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING id, message_id)"
    )
    if usage_count:
        usage_sql, _ = _values_sql([()] * usage_count, _USAGE_VALUE_TYPES)
        # Usage rows only for events this statement has just inserted, one per messageId and
        # feature (``record_usage_events``), so no (event, feature) can exist already. Without
        # ``ON CONFLICT`` the rows go in without a speculative insertion (its lock, the unique
        # index probed first, a confirmation record in WAL): docs/performance-history.md, "Round 13:
        # s1pg" and "Round 14: s3batch".
        sql += ", used AS (" + _INSERT_NEW_EVENTS_USAGE.format(source=f"({usage_sql})").replace("%(ws)s", "%s") + ")"
    return sql + " SELECT message_id FROM ev"


def guarded_usage_event(
    workspace: Workspace,
    message: Message,
    decision: Decision,
    user_pk: int | None,
    *,
    rows: str,
    payload: str,
    user: str | None = None,
) -> tuple[str, dict]:
    """One event and its usage as two CTEs (``ev``, ``used``) for a caller's statement: stored
    once per row of ``rows`` (the caller's ``FROM`` source and condition, at most one row;
    none: nothing is stored), with ``payload`` (an SQL jsonb expression, which may read those
    rows) as the event's payload. A messageId stored already, or meanwhile by a concurrent
    request, is skipped as ``record_usage_events`` skips it; ``ev`` returns
    ``(id, message_id)`` of what was stored. The event's user is ``user_pk``, or ``user`` when
    given: an SQL expression that reads ``rows`` (the user found by the statement itself).

    For a decision made on the server in the statement that records it (``entitlements``'s
    consume: the budget read and the usage insert are one statement, under the budget's
    lock), and for a single track of a known user (``record_known_user_usage``). Named
    parameters, each prefixed ``ev_``; every one is cast, so the statement can be prepared."""
    params = {
        "ev_ws": workspace.pk,
        "ev_message_id": message.message_id,
        "ev_type": str(message.type),
        "ev_name": message.name,
        "ev_external": message.user_id or message.anonymous_id or "",
        "ev_occurred_at": message.occurred_at,
        "ev_received_at": message.received_at,
        "ev_status": str(decision.status),
        "ev_reason": str(decision.reason),
        "ev_warnings": json.dumps(message.warnings) if message.warnings else "[]",
    }
    if user is None:
        params["ev_user"] = user_pk
        user = "%(ev_user)s::bigint"
    for n, (feature_id, amount, rule_id) in enumerate(decision.usages):
        params |= {f"ev_feature{n}": feature_id, f"ev_amount{n}": amount, f"ev_rule{n}": rule_id}
    return _guarded_usage_event_sql(len(decision.usages), rows, payload, user), params


@functools.lru_cache(maxsize=64)
def _guarded_usage_event_sql(usage_count: int, rows: str, payload: str, user: str) -> str:
    """``guarded_usage_event``'s CTEs: their text depends on these alone, so it is built once
    per process and shape (a single track's statement is built on every track, as
    ``_insert_returning_sql``)."""
    values = [
        "%(ev_ws)s::bigint",
        "%(ev_message_id)s::text",
        "%(ev_type)s::text",
        "%(ev_name)s::text",
        user,
        "%(ev_external)s::text",
        payload,
        "%(ev_occurred_at)s::timestamptz",
        "%(ev_received_at)s::timestamptz",
        "%(ev_status)s::text",
        "%(ev_reason)s::text",
        "%(ev_warnings)s::jsonb",
    ]
    usages = [
        f"(%(ev_feature{n})s::bigint, %(ev_amount{n})s::numeric, %(ev_rule{n})s::bigint)" for n in range(usage_count)
    ]
    sql = (
        f"ev AS (INSERT INTO {_EVENT_TABLE} ({', '.join(_EVENT_COLUMNS)}) SELECT {', '.join(values)} FROM {rows}"
        " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING id, message_id, user_id)"
    )
    if usages:
        # Usage only for the event this statement has just inserted (``ev`` returns nothing
        # else), one row per feature (``Decision.usages``): no (event, feature) can exist
        # already, so no ``ON CONFLICT`` (and no speculative insertion), as in
        # ``_insert_returning_sql``.
        sql += (
            f", used AS (INSERT INTO {_USAGE_TABLE}"
            " (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)"
            " SELECT %(ev_ws)s::bigint, ev.user_id, u.feature_id, ev.id, u.rule_id, u.amount,"
            " %(ev_occurred_at)s::timestamptz"
            f" FROM ev, (VALUES {', '.join(usages)}) AS u (feature_id, amount, rule_id))"
        )
    return sql


# The user of a single track's userId, found by the statement that stores the track
# (``record_known_user_usage``): none (nothing is stored) when the userId has no user, is
# suppressed (its user was deleted), or the workspace's rules moved past the version the
# track was decided with. Each lookup compares both columns of a ``(workspace, value)``
# unique constraint (or the primary key) with ``=``: a unique-index probe in any plan.
_KNOWN_USER_SQL = f"""known AS (
    SELECT i.user_id FROM {UserIdentity._meta.db_table} AS i
    WHERE i.workspace_id = %(ev_ws)s::bigint AND i.external_id = %(ev_external)s::text
      AND (SELECT w.rules_version FROM {Workspace._meta.db_table} AS w WHERE w.id = %(ev_ws)s::bigint)
          = %(ev_rules_version)s::bigint
      AND NOT EXISTS (
          SELECT FROM {Suppression._meta.db_table} AS s
          WHERE s.workspace_id = %(ev_ws)s::bigint AND s.user_id = %(ev_external)s::text))"""


@dataclass(frozen=True)
class KnownUserUsage:
    """What ``record_known_user_usage`` did: ``user_pk`` None when it stored nothing because
    the userId's user is not there to take it (none, suppressed) or the rules moved; else
    ``stored`` False means the messageId was stored already (a replay)."""

    user_pk: int | None
    stored: bool


def record_known_user_usage(
    workspace: Workspace, message: Message, decision: Decision, *, rules_version: int
) -> KnownUserUsage:
    """A single usage message of a userId, decided with the rules at ``rules_version``, stored
    with its usage in one round trip and one implicit transaction (PostgreSQL, outside any
    transaction: ``kana.db.pipelined.available``), if its userId has a user and the rules
    are still at that version.

    The round trip is the shared rules lock's statement, then this statement (prepared, one
    shape per number of usage rows): it reads the rules version with a snapshot taken after
    the lock was granted, exactly as the two-round-trip path reads it (``kana.locks``), and
    stores nothing unless it is ``rules_version``. The replay check is the event insert's
    ``ON CONFLICT``. The caller re-runs it once when ``prepared.is_missing`` its error."""
    record_sql, params = guarded_usage_event(
        workspace, message, decision, None, rows="known", payload="%(ev_payload)s::jsonb", user="known.user_id"
    )
    params["ev_payload"] = message.payload_text()
    params["ev_rules_version"] = rules_version
    sql = _known_user_usage_sql(record_sql)
    user_pk, stored = lock_rules_shared_then_run(workspace.pk, kept_cursor.Statement(sql, params, prepare=True))[0]
    return KnownUserUsage(user_pk, stored)


@functools.lru_cache(maxsize=16)
def _known_user_usage_sql(record_sql: str) -> str:
    return f"WITH {_KNOWN_USER_SQL}, {record_sql} SELECT (SELECT user_id FROM known), EXISTS (SELECT FROM ev)"


# The run's rows travel as JSON documents, each a single text parameter (one C-level escape
# on the client, one parse on the server), where COPY cost a staging table, two more round
# trips and a Python write per row, and text-format arrays a Python escape per element. The
# events' fields are one document (one encoder call for the run), their payloads another,
# joined from the JSON texts parsing made (``Message.payload_json``), so no payload is encoded
# twice; ``ROWS FROM`` pairs the two documents' elements by position.
_JSON_ROWS_SQL = f"""
WITH ev AS (
    INSERT INTO {_EVENT_TABLE} ({", ".join(_EVENT_COLUMNS)})
    SELECT %(ws)s::bigint, r->>0, r->>1, r->>2, (r->>3)::bigint, r->>4, payload, (r->>5)::timestamptz,
        (r->>6)::timestamptz, r->>7, r->>8, r->9
    FROM ROWS FROM (jsonb_array_elements(%(events)s::jsonb), jsonb_array_elements(%(payloads)s::jsonb))
        AS fields (r, payload)
    ORDER BY r->>0
    ON CONFLICT (workspace_id, message_id) DO NOTHING
    RETURNING id, message_id
),
used AS ({
    _INSERT_NEW_EVENTS_USAGE.format(
        source="(SELECT u->>0, (u->>1)::bigint, (u->>2)::bigint, (u->>3)::bigint, (u->>4)::numeric,"
        " (u->>5)::timestamptz FROM jsonb_array_elements(%(usages)s::jsonb) AS u)"
    )
})
SELECT message_id FROM ev
"""


def _json_rows(decided: list[Decided]) -> tuple[str, str, str]:
    """The three documents ``_JSON_ROWS_SQL`` reads: the events' fields (an array per event),
    their payloads in the same order, and the usage rows."""
    events, usages = [], []
    # A run's messages share one receipt time (one object): formatted once. A usage row
    # reuses its event's time text.
    received, received_text = None, ""
    for m, d, user_pk in decided:
        if m.received_at is not received:
            received, received_text = m.received_at, m.received_at.isoformat()
        occurred_text = m.occurred_at.isoformat()
        events.append(
            [
                m.message_id,
                str(m.type),
                m.name,
                user_pk,
                m.user_id or m.anonymous_id or "",  # a pending event is keyed by its anonymousId
                occurred_text,
                received_text,
                str(d.status),
                str(d.reason),
                m.warnings,
            ]
        )
        for feature_id, amount, rule_id in d.usages:
            usages.append([m.message_id, user_pk, feature_id, rule_id, str(amount), occurred_text])
    payloads = "[" + ",".join([m.payload_text() for m, _, _ in decided]) + "]"
    return compact_json(events), payloads, compact_json(usages)


def _insert_json_rows(
    workspace: Workspace, decided: list[Decided], *, then_commit: bool = False, prepare: bool = False
) -> set[str]:
    """The same as ``_insert_returning`` for larger runs (PostgreSQL), in one statement of
    constant text whose rows are three JSON parameters (``_JSON_ROWS_SQL``), carrying the
    ``COMMIT`` when ``then_commit``. Returns the messageIds stored."""
    events, payloads, usages = _json_rows(decided)
    params = {"ws": workspace.pk, "events": events, "payloads": payloads, "usages": usages}
    # Its text is the same for every run, so it is prepared (``prepare``: the caller re-runs
    # its transaction when ``prepared.is_missing``): parsing and planning it was ≈ 0.3 ms of
    # PostgreSQL a batch. The plan reads no table but the conflict arbiter's unique index,
    # so a generic plan cannot go stale as the tables grow.
    sql = prepared.statement(_JSON_ROWS_SQL) if prepare else _JSON_ROWS_SQL
    # As in _insert_returning: a failed insert skips the COMMIT, for the caller's ROLLBACK;
    # and on the kept cursor, as the run's first round trip (``lock_rules_shared_then_read``).
    return {message_id for (message_id,) in kept_cursor.rows(sql + pipelined.COMMIT if then_commit else sql, params)}


def _insert_serialised(workspace: Workspace, decided: list[Decided]) -> None:
    """SQLite: plain inserts. Its writers are serialised, so the replay check cannot race."""
    events = [
        Event(
            workspace=workspace,
            message_id=m.message_id,
            type=m.type,
            name=m.name,
            user_id=user_pk,
            external_user_id=m.user_id or m.anonymous_id or "",
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


@dataclass(frozen=True)
class KnownIds:
    """What a run must know before storing anything (``known_ids``)."""

    replayed: set[str]  # messageIds stored already
    suppressed: set[str]  # userIds of deleted users
    linked: dict[str, str]  # anonymousId -> the userId an identify or alias linked it to
    # userId -> its user's id, when asked (``with_users``): saves ``resolve_users`` its read
    users: dict[str, int] | None = None


def _text_array(values: set[str]) -> str:
    """``values`` as a PostgreSQL array literal, for a ``%s::text[]`` parameter: every element
    double-quoted, its backslashes and double quotes escaped (nothing else is special inside
    quotes). psycopg's text dumper escapes each element with a regex, about 1 µs each: a
    fifth of a millisecond for a batch's three lists."""
    return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]) + "}"


def _known_ids_sql(
    workspace: Workspace,
    message_ids: set[str],
    user_ids: set[str],
    anonymous_ids: set[str],
    with_users: bool = False,
    with_version: bool = False,
) -> tuple[str, list]:
    """One read for what a run asks before storing anything: which messageIds are stored
    (replays), which userIds are suppressed, which anonymousIds are linked to a userId. Each
    branch is an indexed lookup on a unique constraint; rows are (value, kind, linked userId).
    ``with_version`` (PostgreSQL): one more row, the workspace's rules version, as
    ``_single_known_ids_sql`` reads it."""

    # PostgreSQL: one array parameter per list, so the statement's text is the same for every
    # batch size (psycopg caches its parse of a short statement; splitting one with hundreds
    # of placeholders was a fifth of a 100-message batch's Python). SQLite: an IN list.
    #
    # Events (PostgreSQL): one probe of the (workspace, messageId) unique index per messageId,
    # with the workspace id hidden from the planner (a sub-select it cannot read). Given the
    # id, the planner estimates the workspace's rows from statistics, which lag a workspace
    # that grows fast (a new tenant; S3 and S1, whose workspace starts empty): estimating
    # ~1 row, it scanned all of the workspace's stored events through a workspace-leading
    # index and filtered them, on every batch (21 ms a read at 28,000 events; the bulk of
    # S3's PostgreSQL time, docs/performance-history.md "Round 5: s3batch"). Hidden, the workspace
    # counts as an average one, and a probe that finds ≤ 1 row costs less than any scan.
    # LIMIT 1 (the pair is unique) keeps each probe a parameterised subquery.
    #
    # The userIds' users (PostgreSQL) are probed the same way, one per userId. As
    # ``external_id = ANY(array)`` the planner estimated the array's selectivity element by
    # element against the column's statistics: ≈ 0.3 ms of planning for a batch's 100 userIds,
    # more than running the read; and with the workspace's users counted, it chose between
    # reading all of them (a 1,000-user workspace: 900 rows read and filtered away) and the
    # probes (docs/performance-history.md, "Round 14: s3batch"). The suppressions stay a plain
    # ``ANY``: a workspace has few, and their read plans in a fraction of that.
    as_array = connection.vendor == "postgresql"
    probed = (_EVENT_TABLE, UserIdentity._meta.db_table)

    def branch(select: str, table: str, column: str, values: set[str]) -> tuple[str, list]:
        if as_array and table in probed:
            return (
                f"SELECT found.* FROM unnest(%s::text[]) AS wanted(value), LATERAL (SELECT {select} FROM {table}"
                f" WHERE workspace_id = (SELECT %s::bigint) AND {column} = wanted.value LIMIT 1) AS found",
                [_text_array(values), workspace.pk],
            )
        where = f"{column} = ANY(%s::text[])" if as_array else f"{column} IN ({', '.join(['%s'] * len(values))})"
        return f"SELECT {select} FROM {table} WHERE workspace_id = %s AND {where}", (
            [workspace.pk, _text_array(values)] if as_array else [workspace.pk, *values]
        )

    wanted = [("message_id, 0, ''", _EVENT_TABLE, "message_id", message_ids)]
    if user_ids:
        wanted.append(("user_id, 1, ''", Suppression._meta.db_table, "user_id", user_ids))
    if anonymous_ids:
        wanted.append(("anonymous_id, 2, user_id", AnonymousLink._meta.db_table, "anonymous_id", anonymous_ids))
    if with_users and user_ids:
        wanted.append(("external_id, 3, user_id::text", UserIdentity._meta.db_table, "external_id", user_ids))
    branches, params = [], []
    for select, table, column, values in wanted:
        sql, values_params = branch(select, table, column, values)
        branches.append(sql)
        params += values_params
    if with_version:
        branches.append(_VERSION_BRANCH)
        params.append(workspace.pk)
    return " UNION ALL ".join(branches), params


# The read's row that carries the workspace's rules version (``with_version``): the
# workspace's primary key probed.
_VERSION_KIND = 4
_VERSION_BRANCH = f"SELECT rules_version::text, {_VERSION_KIND}, '' FROM {Workspace._meta.db_table} WHERE id = %s"


def _single_known_ids_sql(
    workspace: Workspace,
    message_id: str,
    user_id: str | None,
    anonymous_id: str | None,
    with_users: bool = False,
    with_version: bool = False,
) -> tuple[str, list]:
    """``_known_ids_sql`` for one message (at most one userId or anonymousId; PostgreSQL): each
    branch compares both columns of a ``(workspace, value)`` unique constraint with ``=``, the
    form a generic plan (``kana.db.prepared``) reads as at most one row: the unique index's
    probe, unless the table looked empty when the plan was made (see
    ``lock_rules_and_find_replays``). The users' tables have no other workspace index
    (users migrations 0005 and 0006). Rows are ``_known_ids_sql``'s; ``with_version``: one
    more, ``(rules_version as text, _VERSION_KIND, '')``, the workspace's primary key probed."""
    # The events' workspace is hidden from the planner (a sub-select), as in ``_known_ids_sql``:
    # a prepared statement's first five plans (and the five after each ``replan_every``) are
    # custom, made with the values; given a workspace newer than the statistics, the planner
    # puts its events at one row, the workspace-only ``(workspace, received_at)`` index ties
    # with the unique one and wins (a smaller index), and each of those runs read every event
    # of the workspace (docs/performance-history.md, "Round 15: s2ties").
    wanted = [("message_id, 0, ''", _EVENT_TABLE, "message_id", message_id)]
    if user_id is not None:
        wanted.append(("user_id, 1, ''", Suppression._meta.db_table, "user_id", user_id))
    if anonymous_id is not None:
        wanted.append(("anonymous_id, 2, user_id", AnonymousLink._meta.db_table, "anonymous_id", anonymous_id))
    if with_users and user_id is not None:
        wanted.append(("external_id, 3, user_id::text", UserIdentity._meta.db_table, "external_id", user_id))
    sql = " UNION ALL ".join(
        f"SELECT {select} FROM {table} WHERE workspace_id = {'(SELECT %s::bigint)' if table == _EVENT_TABLE else '%s'}"
        f" AND {column} = %s"
        for select, table, column, _ in wanted
    )
    params = [value for *_, value in wanted for value in (workspace.pk, value)]
    if with_version:
        sql += " UNION ALL " + _VERSION_BRANCH
        params.append(workspace.pk)
    return sql, params


def single_known_ids_statement(workspace: Workspace, message_id: str, user_id: str | None) -> kept_cursor.Statement:
    """``known_ids``'s read for one message and its userId, prepared (PostgreSQL), for a
    caller that sends it in a message of its own making (an identify's first round trip:
    ``users.services.MessageIdentify``); its rows are ``_known_ids_sql``'s. The caller
    re-runs its transaction once when ``prepared.is_missing`` its error. Prepared again
    every ``prepared.REPLAN_EVERY`` uses, as the single track's read (``lock_rules_and_find_replays``)."""
    if connection.vendor != "postgresql":
        return kept_cursor.Statement(*_known_ids_sql(workspace, {message_id}, {user_id} if user_id else set(), set()))
    sql, params = _single_known_ids_sql(workspace, message_id, user_id, None)
    return kept_cursor.Statement(sql, params, prepare=True, replan_every=prepared.REPLAN_EVERY)


def _known_ids(rows: list[tuple], with_users: bool = False) -> KnownIds:
    known = KnownIds(set(), set(), {}, {} if with_users else None)
    for value, kind, linked in rows:
        if kind == 0:
            known.replayed.add(value)
        elif kind == 1:
            known.suppressed.add(value)
        elif kind == 2:
            known.linked[value] = linked
        else:
            known.users[value] = int(linked)
    return known


def lock_rules_and_find_replays(
    workspace: Workspace,
    message_ids: set[str],
    user_ids: set[str] = frozenset(),
    anonymous_ids: set[str] = frozenset(),
    *,
    begin: bool = False,
    with_users: bool = False,
    prepare: bool = False,
) -> tuple[int, KnownIds]:
    """The rules version (under the shared rules lock) and ``known_ids``, in one round trip:
    this runs for every message Segment sends one at a time. ``begin``: the round trip also
    opens the transaction (inside ``kana.db.pipelined.transaction``); ``with_users``: the
    read also maps ``user_ids`` to their users (``KnownIds.users``). ``prepare``: one
    message's read is a prepared statement (``kana.db.prepared``); a caller that passes it
    re-runs its transaction once when ``prepared.is_missing`` its error."""
    if not on_postgres():
        sql, params = _known_ids_sql(workspace, message_ids, user_ids, anonymous_ids, with_users)
        version, rows = lock_rules_shared_and_read(workspace.pk, sql, params, begin=begin)
        return version, _known_ids(rows, with_users)
    if prepare and len(message_ids) == 1 and len(user_ids) <= 1 and len(anonymous_ids) <= 1:
        # A single message (Segment sends most one at a time): the form whose every plan is
        # a unique-index probe, prepared. Parsing and planning the array form was about half
        # of the read's PostgreSQL time (docs/performance-history.md, "Round 6: s1pg").
        (message_id,) = message_ids
        sql, params = _single_known_ids_sql(
            workspace,
            message_id,
            next(iter(user_ids), None),
            next(iter(anonymous_ids), None),
            with_users,
            with_version=True,
        )
        # Its PREPARE, if any, goes before the transaction opens. Prepared again every
        # prepared.REPLAN_EVERY uses: a generic plan made while the events were few (a new
        # database) may tie the unique index with a workspace-leading one at one estimated
        # row, and keep scanning with the latter as the events grow, until an ANALYZE.
        read = kept_cursor.Statement(sql, params, prepare=True, replan_every=prepared.REPLAN_EVERY)
    else:
        # Not prepared: a generic plan of the array form, made once while the events were few
        # (a new or emptied table), probes a workspace-leading index and filters every event
        # of the workspace, for each messageId, until it is made again (docs/performance-history.md,
        # "Round 5: s1prep" and "Round 14: s3batch"). Planned each time, it follows the
        # table's size.
        sql, params = _known_ids_sql(workspace, message_ids, user_ids, anonymous_ids, with_users, with_version=True)
        read = kept_cursor.Statement(sql, params)
    # The rules version is read by the same statement (a branch of its own), after the lock's
    # statement as before: one statement fewer in the round trip.
    rows = lock_rules_shared_then_read(workspace.pk, read, begin=begin)
    version = next((int(value) for value, kind, _ in rows if kind == _VERSION_KIND), None)
    if version is None:  # as ``lock_rules_shared`` would fail: no such workspace
        raise Workspace.DoesNotExist(f"workspace {workspace.pk} does not exist")
    return version, _known_ids([row for row in rows if row[1] != _VERSION_KIND], with_users)


def known_ids(workspace: Workspace, message_ids: set[str], user_ids: set[str]) -> KnownIds:
    """Which messageIds are stored already, and which of ``user_ids`` are suppressed."""
    sql, params = _known_ids_sql(workspace, message_ids, user_ids, set())
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return _known_ids(cursor.fetchall())


def record_processed_events(
    workspace: Workspace,
    applied: list[tuple[Message, int, list[dict]]],
    *,
    then_commit: bool = False,
    prepare: bool = False,
) -> set[str]:
    """Store applied identify/alias/group messages (message, user id, warnings) as processed
    events; returns the messageIds stored (one stored meanwhile by a concurrent request is not).

    ``prepare`` (PostgreSQL): one event's insert is a prepared statement (``kana.db.prepared``:
    its text is the same for every single event); a caller that passes it re-runs its
    transaction once when ``prepared.is_missing`` its error.

    ``then_commit`` (PostgreSQL, inside ``kana.db.pipelined.transaction``): the insert carries
    the transaction's ``COMMIT``. A messageId stored meanwhile must then not be skipped (the
    profile writes before it would commit without their event): the insert fails on it
    instead, PostgreSQL skips the ``COMMIT``, and the caller's retry finds the replay."""
    if not applied:
        return set()
    if connection.vendor != "postgresql":  # serialised writers: the caller's check cannot race
        Event.objects.bulk_create(
            Event(
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
            for message, user_pk, warnings in applied
        )
        return {message.message_id for message, _, _ in applied}
    processed = Decision(EventStatus.PROCESSED)
    rows = [_event_row(workspace, m, processed, user_pk, warnings=w) for m, user_pk, w in applied]
    values, params = _values_sql(sorted(rows, key=lambda row: row[1]), _EVENT_VALUE_TYPES)  # messageId order
    sql = f"INSERT INTO {_EVENT_TABLE} ({', '.join(_EVENT_COLUMNS)}) {values}"
    if then_commit:
        sql += " RETURNING message_id"  # a unique violation is an IntegrityError: retried
    else:
        sql += " ON CONFLICT (workspace_id, message_id) DO NOTHING RETURNING message_id"
    if prepare and len(rows) == 1:
        # Parsing and planning the insert as text was ≈ 0.1-0.2 ms of PostgreSQL CPU an identify;
        # its plan reads no table (but the unique index's arbiter), so it cannot go stale. Its
        # values (the payload among them) bound server-side in a pipeline (``message_rows``),
        # not formatted into an ``EXECUTE`` text: docs/performance-history.md, "Round 15: s2app".
        statements = [kept_cursor.Statement(sql, params, prepare=True)]
        if then_commit:
            statements.append(kept_cursor.Statement("COMMIT"))
        return {message_id for (message_id,) in kept_cursor.message_rows(statements)}
    with connection.cursor() as cursor:
        cursor.execute(sql + pipelined.COMMIT if then_commit else sql, params)
        return {message_id for (message_id,) in cursor.fetchall()}


# --- Reprocessing: mapping stored events -------------------------------------------------

# One (event_id, feature_id, rule_id or None, amount) per usage record to write.
UsageRow = tuple[int, int, int | None, Decimal]


@dataclass(frozen=True)
class FlippedInSql:
    """Events a reprocessing chunk's SQL statement flipped to mapped without writing their
    usage (``map_events_decided_in_sql``: the chunk has rows for the evaluator too), each with
    the user and time that statement returned and its amount for the rule's feature. They get
    their usage in ``map_events``'s statement, with the evaluator's rows."""

    feature_id: int
    rule_id: int
    event_ids: list[int]
    user_ids: list[int]
    occurred_at: list
    amounts: list[Decimal]


def map_events(
    workspace_id: int, event_ids: list[int], usages: list[UsageRow], *, flipped_in_sql: FlippedInSql | None = None
) -> int:
    """Flip still-unmapped events to mapped and record their usage; returns events flipped.

    Usage is written only for the rows this UPDATE flipped, with the event's user and
    original time, so an event can never be counted by two runs. A detached event (its user
    was deleted, its events kept) gets usage without a user: it counts for the feature.

    ``flipped_in_sql`` (PostgreSQL): events flipped earlier in this transaction whose usage
    goes in with this statement's, so the transaction writes all its usage in one statement.
    That is what keeps the daily counters deadlock-free: their trigger takes a statement's
    counter keys in key order, so writers that take all their keys in one statement wait for
    each other in one global order; a transaction writing usage in two statements takes its
    keys in two runs, and two such transactions can each hold a key the other needs.
    """
    if connection.vendor == "postgresql":
        return _map_events_postgres(workspace_id, event_ids, usages, flipped_in_sql)
    if flipped_in_sql is not None:
        raise ValueError("events are flipped in SQL on PostgreSQL only")
    flipped = dict(Event.objects.filter(id__in=event_ids, status=EventStatus.UNMAPPED).values_list("id", "user_id"))
    times = dict(Event.objects.filter(id__in=list(flipped)).values_list("id", "occurred_at"))
    Event.objects.filter(id__in=list(flipped)).update(status=EventStatus.MAPPED, unmapped_reason="")
    Usage.objects.bulk_create(
        [
            Usage(
                workspace_id=workspace_id,
                user_id=flipped[event_id],
                feature_id=feature_id,
                event_id=event_id,
                rule_id=rule_id,
                amount=amount,
                occurred_at=times[event_id],
            )
            for event_id, feature_id, rule_id, amount in usages
            if event_id in flipped
        ],
        ignore_conflicts=True,
        batch_size=1000,
    )
    return len(flipped)


# One statement, one round trip: arrays in, the count of events flipped out. Set-based, so
# its cost is PostgreSQL's, not Python's (S4 in docs/performance).
_MAP_EVENTS_SQL = f"""
WITH flipped AS (
    UPDATE {Event._meta.db_table} SET status = %(mapped)s, unmapped_reason = ''
    WHERE id = ANY(%(event_ids)s) AND status = %(unmapped)s
    RETURNING id, user_id, occurred_at
), recorded AS (
    INSERT INTO {Usage._meta.db_table} (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)
    SELECT %(workspace_id)s, flipped.user_id, u.feature_id, u.event_id, u.rule_id, u.amount, flipped.occurred_at
    FROM unnest(%(u_event)s::bigint[], %(u_feature)s::bigint[], %(u_rule)s::bigint[], %(u_amount)s::numeric[])
        AS u(event_id, feature_id, rule_id, amount)
    JOIN flipped ON flipped.id = u.event_id{{flipped_in_sql}}
    ON CONFLICT (event_id, feature_id) DO NOTHING
)
SELECT count(*) FROM flipped
"""
# The usage of events a chunk's SQL statement flipped (``FlippedInSql``), in the same INSERT.
_FLIPPED_IN_SQL = """
    UNION ALL
    SELECT %(workspace_id)s, f.user_id, %(f_feature)s, f.event_id, %(f_rule)s, f.amount, f.occurred_at
    FROM unnest(%(f_event)s::bigint[], %(f_user)s::bigint[], %(f_occurred)s::timestamptz[], %(f_amount)s::numeric[])
        AS f(event_id, user_id, occurred_at, amount)"""
_MAP_EVENTS_ONLY_SQL = _MAP_EVENTS_SQL.format(flipped_in_sql="")
_MAP_EVENTS_WITH_FLIPPED_SQL = _MAP_EVENTS_SQL.format(flipped_in_sql=_FLIPPED_IN_SQL)


def _map_events_postgres(
    workspace_id: int, event_ids: list[int], usages: list[UsageRow], flipped_in_sql: FlippedInSql | None
) -> int:
    u_event, u_feature, u_rule, u_amount = (
        (list(column) for column in zip(*usages, strict=True)) if usages else [[]] * 4
    )
    params = {
        "mapped": EventStatus.MAPPED.value,
        "unmapped": EventStatus.UNMAPPED.value,
        "workspace_id": workspace_id,
        "event_ids": event_ids,
        "u_event": u_event,
        "u_feature": u_feature,
        "u_rule": u_rule,
        "u_amount": u_amount,
    }
    sql = _MAP_EVENTS_ONLY_SQL
    if flipped_in_sql is not None:
        sql = _MAP_EVENTS_WITH_FLIPPED_SQL
        params.update(
            f_feature=flipped_in_sql.feature_id,
            f_rule=flipped_in_sql.rule_id,
            f_event=flipped_in_sql.event_ids,
            f_user=flipped_in_sql.user_ids,
            f_occurred=flipped_in_sql.occurred_at,
            f_amount=flipped_in_sql.amounts,
        )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def map_events_decided_in_sql(
    workspace_id: int, decided_sql: str, params: list, *, feature_id: int, rule_id: int
) -> tuple[int, int | None, int, list[int], FlippedInSql | None]:
    """Reprocessing decided in SQL (PostgreSQL), one statement for a chunk.

    ``decided_sql`` selects the chunk's candidates (locked by the caller's query) as
    ``id, amount, to_python``: rows with an amount and not ``to_python`` are flipped (if still
    unmapped, with a user) and get one usage row for the rule, at the event's user and time,
    exactly as ``map_events`` records them. Returns (candidates, their highest id, events
    flipped, the ids left to the caller's evaluator, in id order, and the flipped events
    whose usage is left to the caller). A row decided here that the UPDATE did not flip (a
    concurrent change committed while the statement ran: its user deleted, say) is left to
    the evaluator too, which reads it as it is now.

    When any row is left to the evaluator, the flipped rows' usage is not written here but
    returned (``FlippedInSql``) for the caller's ``map_events``: the chunk then writes all its
    usage in one statement, so its counter keys are taken in one key order (see ``map_events``;
    two parts of one job writing usage in two statements each deadlocked on them).

    The flip joins ``decided`` to the events on their primary key. Name the candidates in
    ``decided_sql`` as ``e.id = ANY(ARRAY(...))``: PostgreSQL then estimates a few rows and
    probes the key for each; estimating the chunk's true size, it scanned and hashed the
    whole table instead, twice a chunk (docs/performance-history.md, "Round 7: s4hot").
    """
    sql = f"""
    WITH decided AS MATERIALIZED ({decided_sql}),
    flipped AS (
        UPDATE {Event._meta.db_table} e SET status = %s, unmapped_reason = ''
        FROM decided d
        WHERE e.id = d.id AND d.amount IS NOT NULL AND NOT d.to_python
            AND e.status = %s AND e.user_id IS NOT NULL
        RETURNING e.id, e.user_id, e.occurred_at, d.amount
    ), to_evaluator AS MATERIALIZED (
        -- Set operations, not a test per row against ``flipped`` (NOT EXISTS, or a join the
        -- planner may loop over): hashed or sorted, whatever the estimates say.
        SELECT id FROM decided WHERE to_python
        UNION (SELECT id FROM decided WHERE amount IS NOT NULL EXCEPT SELECT id FROM flipped)
    ), recorded AS (
        INSERT INTO {Usage._meta.db_table} (workspace_id, user_id, feature_id, event_id, rule_id, amount, occurred_at)
        SELECT %s, user_id, %s, id, %s, amount, occurred_at FROM flipped
        WHERE NOT EXISTS (SELECT FROM to_evaluator)
        ON CONFLICT (event_id, feature_id) DO NOTHING
    )
    SELECT (SELECT count(*) FROM decided), (SELECT max(id) FROM decided), (SELECT count(*) FROM flipped),
        ARRAY(SELECT id FROM to_evaluator ORDER BY 1),
        CASE WHEN EXISTS (SELECT FROM to_evaluator) THEN (
            SELECT ARRAY[array_agg(id ORDER BY id), array_agg(user_id ORDER BY id)] FROM flipped
        ) END,
        CASE WHEN EXISTS (SELECT FROM to_evaluator) THEN (
            SELECT array_agg(occurred_at ORDER BY id) FROM flipped
        ) END,
        CASE WHEN EXISTS (SELECT FROM to_evaluator) THEN (
            SELECT array_agg(amount ORDER BY id) FROM flipped
        ) END
    """
    values = [*params, EventStatus.MAPPED.value, EventStatus.UNMAPPED.value, workspace_id, feature_id, rule_id]
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        scanned, last_id, flipped, to_python, ids_and_users, times, amounts = cursor.fetchone()
    usage_left = None
    # ``ids_and_users`` is NULL when no row went to the evaluator, and empty when rows did but
    # none was flipped (PostgreSQL builds ARRAY[NULL, NULL] of arrays as an empty array).
    if ids_and_users:
        usage_left = FlippedInSql(feature_id, rule_id, list(ids_and_users[0]), list(ids_and_users[1]), times, amounts)
    return scanned, last_id, flipped, list(to_python), usage_left


def attach_detached_events(user_by_event: dict[int, int]) -> None:
    """Give detached events (their user was deleted) a user again: ``{event id: user id}``."""
    if connection.vendor != "postgresql":
        for event_id, user_pk in user_by_event.items():
            Event.objects.filter(id=event_id, user__isnull=True).update(user_id=user_pk)
        return
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_EVENT_TABLE} AS e SET user_id = v.user_id"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS v(id, user_id)"
            " WHERE e.id = v.id AND e.user_id IS NULL",
            [list(user_by_event), list(user_by_event.values())],
        )


def set_unmapped_reasons(event_ids_by_reason: dict[str, list[int]]) -> None:
    """Events still unmapped, but now for another reason (a new feature, an invalid delta)."""
    for reason, ids in event_ids_by_reason.items():
        Event.objects.filter(id__in=ids, status=EventStatus.UNMAPPED).update(unmapped_reason=reason)


# --- Held anonymous events: pending until an identify or alias names their anonymousId -----


def pending_event_ids(workspace: Workspace, anonymous_ids: set[str]) -> list[int]:
    """The pending events kept under these anonymousIds (a probe on a small partial index:
    most identifies carry an anonymousId, few have events waiting)."""
    return list(
        Event.objects.for_workspace(workspace)
        .filter(status=EventStatus.PENDING, external_user_id__in=anonymous_ids)
        .values_list("id", flat=True)
    )


def lock_pending_events(workspace: Workspace, event_ids: list[int]) -> list[tuple[int, str, str, dict]]:
    """Row-lock the events still pending, in id order: (id, anonymousId, name, properties).

    A concurrent identify of the same anonymousId waits here, then finds them no longer
    pending and moves nothing: an event is attributed once."""
    rows = (
        Event.objects.for_workspace(workspace)
        .filter(id__in=event_ids, status=EventStatus.PENDING)
        .order_by("id")
        .select_for_update(of=("self",))
        .values_list("id", "external_user_id", "name", "payload__properties")
    )
    return [
        (pk, anonymous_id, name, props if isinstance(props, dict) else {}) for pk, anonymous_id, name, props in rows
    ]


def attribute_pending_events(
    workspace: Workspace, owners: dict[int, tuple[int, str]], decisions: dict[int, Decision]
) -> int:
    """Give locked pending events their user (``owners``: event id -> (user id, userId)) and
    map them as decided, usage at their original time; returns the events mapped.

    Two steps that reuse the reprocessing write: the events become unmapped events of their
    user (with the reason decided), then ``map_events`` flips the mapped ones and records
    their usage, so an event cannot be counted twice whichever path maps it.
    """
    by_owner: dict[tuple[int, str, str], list[int]] = {}
    for event_id, (user_pk, user_id) in owners.items():
        by_owner.setdefault((user_pk, user_id, str(decisions[event_id].reason)), []).append(event_id)
    for (user_pk, user_id, reason), ids in by_owner.items():
        Event.objects.filter(id__in=ids, status=EventStatus.PENDING).update(
            status=EventStatus.UNMAPPED, unmapped_reason=reason, user_id=user_pk, external_user_id=user_id
        )
    mapped = [event_id for event_id, d in decisions.items() if d.status == EventStatus.MAPPED]
    usages = [(event_id, f, r, a) for event_id in mapped for f, a, r in decisions[event_id].usages]
    return map_events(workspace.pk, mapped, usages) if mapped else 0


def expire_pending_events(now) -> dict[int, int]:
    """Pending events received longer ago than their workspace's hold window become
    ``expired`` (counted, never mapped); returns the count per workspace id."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_EXPIRE_SQL, {"now": now, "pending": EventStatus.PENDING, "expired": EventStatus.EXPIRED})
            return dict(cursor.fetchall())
    expired = {}
    for workspace in Workspace.objects.filter(
        pk__in=Event.objects.filter(status=EventStatus.PENDING).values("workspace_id")
    ):
        cutoff = now - timedelta(days=workspace.anonymous_hold_days)
        count = (
            Event.objects.for_workspace(workspace)
            .filter(status=EventStatus.PENDING, received_at__lt=cutoff)
            .update(status=EventStatus.EXPIRED)
        )
        if count:
            expired[workspace.pk] = count
    return expired


_EXPIRE_SQL = f"""
WITH expired AS (
    UPDATE {_EVENT_TABLE} AS e SET status = %(expired)s
    FROM {Workspace._meta.db_table} AS w
    WHERE e.workspace_id = w.id AND e.status = %(pending)s
        AND e.received_at < %(now)s - make_interval(days => w.anonymous_hold_days)
    RETURNING e.workspace_id
)
SELECT workspace_id, count(*) FROM expired GROUP BY workspace_id
"""


# --- Corrections: voiding a stored event ----------------------------------------------------


def void_event(*, event: Event, reason: str, voided_at) -> list[dict]:
    """Mark an event voided and delete its usage; returns the usage removed.

    The caller holds the event's row lock (``select_for_update``), so reprocessing, which
    locks the unmapped events it maps and only flips rows still unmapped, either mapped it
    before (its usage is deleted here) or finds it voided and skips it.
    """
    usage = Usage.objects.for_workspace(event.workspace_id).filter(event_id=event.pk)
    removed = [
        {"feature": key, "amount": amount, "rule": rule_id}
        for key, amount, rule_id in usage.order_by("feature__key").values_list("feature__key", "amount", "rule_id")
    ]
    usage.delete()
    Event.objects.filter(pk=event.pk).update(
        status=EventStatus.VOIDED, unmapped_reason="", voided_at=voided_at, void_reason=reason
    )
    event.status, event.unmapped_reason, event.voided_at, event.void_reason = (
        EventStatus.VOIDED,
        "",
        voided_at,
        reason,
    )
    return removed


# --- Merges: a user's events and usage follow it into the survivor -----------------------


def reassign_user(*, workspace_id: int, absorbed_pk: int, survivor_pk: int) -> list[pipelined.Step]:
    """The statements that move the absorbed user's events and usage to the survivor: the
    merge sends them in its own message (``users.signals.user_absorbed``).

    ``workspace_id + 0``: the workspace is checked, not probed, so the user's own index is the
    only one that answers. Statistics lag a workspace that grows fast (a new tenant, the
    benchmark's S2): estimating its events at one row, the planner tied the workspace-only
    ``(workspace_id, received_at)`` index with ``(workspace_id, user_id, …)`` and read every
    event of the workspace to find the absorbed user's, on every merge (docs/performance-history.md,
    "Round 14: s2conc")."""
    params = [survivor_pk, absorbed_pk, workspace_id]
    return [
        pipelined.Step(f"UPDATE {table} SET user_id = %s WHERE user_id = %s AND workspace_id + 0 = %s", params)
        for table in (_EVENT_TABLE, _USAGE_TABLE)
    ]


# What anonymising a kept event removes from its payload: who sent it. ``properties`` stay:
# the rules read them, and a rule created later must map the event as it did before.
_IDENTIFYING_KEYS = ("userId", "anonymousId", "previousId", "traits", "context")


def forget_user(*, workspace_id: int, user_pk: int, keep_events: bool = True) -> None:
    """A user is being deleted. ``keep_events``: its events and usage stay, detached (no user)
    and anonymised, so feature totals do not change; else both are deleted."""
    usage = Usage.objects.for_workspace(workspace_id).filter(user_id=user_pk)
    events = Event.objects.for_workspace(workspace_id).filter(user_id=user_pk)
    if not keep_events:
        usage.delete()
        events.delete()
        return
    usage.update(user_id=None)
    if connection.vendor == "postgresql":
        stripped, params = "payload - %s::text[]", [list(_IDENTIFYING_KEYS)]
    else:
        stripped, params = (
            f"json_remove(payload, {', '.join(['%s'] * len(_IDENTIFYING_KEYS))})",
            [f"$.{key}" for key in _IDENTIFYING_KEYS],
        )
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {_EVENT_TABLE} SET user_id = NULL, external_user_id = '', payload = {stripped}"
            " WHERE workspace_id = %s AND user_id = %s",
            [*params, workspace_id, user_pk],
        )


@receiver(user_deleting, dispatch_uid="features.ledger.forget_user")
def _on_user_deleting(sender, *, workspace_id: int, user_pk: int, keep_events: bool = True, **kwargs) -> None:
    forget_user(workspace_id=workspace_id, user_pk=user_pk, keep_events=keep_events)


# --- A workspace's deletion: no usage may outlive its event ---------------------------------


@receiver(pre_delete, sender=Workspace, dispatch_uid="features.ledger.guard_workspace_deletion")
def guard_workspace_deletion(sender, instance: Workspace, **kwargs) -> None:
    """Django's collector deletes a workspace's events (and their usage) from lists it read
    before deleting anything, and refuses a workspace with usage (PROTECT on the feature).
    A reprocessing chunk or an attribution that adds usage to a listed event meanwhile would
    leave that usage behind, its event deleted: the usage's ``event_id`` has no constraint
    to fail the deletion (migration features/0008). Usage is added to stored events only
    under the shared rules lock, so this takes it exclusively before the first DELETE, then
    refuses the deletion as PROTECT would have if usage committed since the collector read.
    """
    lock_rules_exclusive(instance.pk)
    if Usage.objects.for_workspace(instance).exists():
        raise ProtectedError(f"Workspace {instance.pk} has usage (recorded while it was being deleted)", set())


@receiver(user_absorbed, dispatch_uid="features.ledger.reassign_user")
def _on_user_absorbed(
    sender, *, workspace_id: int, absorbed_pk: int, survivor_pk: int, **kwargs
) -> list[pipelined.Step]:
    return reassign_user(workspace_id=workspace_id, absorbed_pk=absorbed_pk, survivor_pk=survivor_pk)


def restore_user_events(*, workspace_id: int, restored_pk: int, survivor_pk: int, user_ids: list[str]) -> None:
    """An unmerge: the survivor's events addressed to one of ``user_ids`` (whenever they came)
    go back to the restored user, with their usage."""
    if not user_ids:
        return
    events = Event.objects.for_workspace(workspace_id).filter(user_id=survivor_pk, external_user_id__in=user_ids)
    Usage.objects.for_workspace(workspace_id).filter(user_id=survivor_pk, event__in=events.values("pk")).update(
        user_id=restored_pk
    )
    events.update(user_id=restored_pk)


@receiver(user_restored, dispatch_uid="features.ledger.restore_user_events")
def _on_user_restored(sender, *, workspace_id: int, restored_pk: int, survivor_pk: int, user_ids, **kwargs) -> None:
    restore_user_events(workspace_id=workspace_id, restored_pk=restored_pk, survivor_pk=survivor_pk, user_ids=user_ids)
