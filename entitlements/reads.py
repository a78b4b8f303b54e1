"""A decision's reads on PostgreSQL in two statements instead of eight ORM queries.

The ORM path (``access.evaluate``) reads the feature, the subject, its groups, its
subscriptions, their packages' rows for the feature, the period's counters, its partial days'
usage rows and the held reservations, one query each; each costs about a millisecond of
Python (query building, compiling, model instances) for a few microseconds of PostgreSQL.
Here the same rows come in two plain statements, as tuples:

1. ``offers``: the feature, the subject (a userId's user and its groups, or a group), and
   every subscription of the subject with its package's row for the feature (if any).
2. ``budget``: once Python has chosen the offer and computed its period (the same
   ``periods`` and ``counters.split_period`` functions the ORM path uses), the period's
   used amount from the counters and the partial days' usage rows, the held reservations
   and the owner's members.

Two statements, not one: the period depends on the chosen subscription's anchor and the
package's reset period, computed in Python (calendar months clamped as Stripe does); doing
that in SQL too would be a second implementation of ``periods`` to keep equal.
tests/test_entitlement_reads.py holds both paths equal over the cases that differ.
"""

from datetime import datetime
from decimal import Decimal

from django.db import DatabaseError, connection

from features.counters import split_period
from features.models import Feature, Usage, UsageCounter
from kana.db import kept_cursor
from kana.db import prepared as prepared_statements
from users.models import Group, GroupMembership, UserIdentity

from .models import PackageFeature, Reservation, ReservationStatus, Subscription

_OFFERS_SQL = f"""
WITH f AS (
    SELECT id, type, archived_at FROM {Feature._meta.db_table} WHERE workspace_id = %(ws)s AND key = %(feature)s
), u AS (
    SELECT user_id AS pk FROM {UserIdentity._meta.db_table}
    WHERE workspace_id = %(ws)s AND external_id = %(user_id)s ORDER BY id LIMIT 1
), g AS (
    SELECT id AS pk FROM {Group._meta.db_table} WHERE workspace_id = %(ws)s AND group_id = %(group_id)s
    ORDER BY id LIMIT 1
), m AS (
    SELECT coalesce(array_agg(group_id ORDER BY group_id), '{{}}') AS pks FROM {GroupMembership._meta.db_table}
    WHERE workspace_id + 0 = %(ws)s AND user_id = (SELECT pk FROM u)
), s AS (
    SELECT s.id, s.user_id, s.group_id, s.package_id, s.status, s.started_at
    FROM {Subscription._meta.db_table} s, m
    WHERE s.workspace_id + 0 = %(ws)s
      AND (s.user_id = (SELECT pk FROM u) OR s.group_id = ANY (m.pks) OR s.group_id = (SELECT pk FROM g))
)
SELECT (SELECT id FROM f), (SELECT type FROM f), (SELECT archived_at FROM f), (SELECT pk FROM u),
       (SELECT pk FROM g), m.pks,
       s.id, s.user_id, s.group_id, s.package_id, s.status, s.started_at,
       pf.id, pf."limit", pf.overage_enabled, pf.reset_period
FROM m
LEFT JOIN s ON true
LEFT JOIN {PackageFeature._meta.db_table} pf
    ON pf.workspace_id = %(ws)s AND pf.package_id = s.package_id AND pf.feature_id = (SELECT id FROM f)
"""


# The memberships and subscriptions are found by the subject's own indexes, the workspace
# checked, not probed (``workspace_id + 0``): a plan made with the values (a prepared
# statement's first five, or every check when connections are not kept) puts a workspace
# newer than the statistics at one row, and its workspace-only index then ties with the
# subject's and wins, the check reading every subscription of the workspace
# (docs/performance-history.md, "Round 15: s2ties"). The generic plan probed the subject's already.


def available() -> bool:
    return connection.vendor == "postgresql"


# Planning these statements costs PostgreSQL more than running them (EXPLAIN: ~0.8 ms of
# planning for ~0.3 ms of execution each): they are prepared once per connection
# (``kana.db.prepared``), also inside the pipelined consume's messages.
prepared = prepared_statements.statement
forget_prepared_if_missing = prepared_statements.forget_if_missing
_prepared = prepared_statements._prepared  # the connections' registry (tests reset it)


def _rows(sql: str, params: dict) -> list[tuple]:
    # On the kept cursor with the values bound server-side (kana.db.kept_cursor.prepared_rows):
    # an entitlement check is these two statements.
    try:
        return kept_cursor.prepared_rows(sql, params)
    except DatabaseError as error:
        forget_prepared_if_missing(error)
        raise


def rows(sql: str, params: dict) -> list[tuple]:
    """The rows of a caller's statement around ``budget_statement`` (named parameters),
    prepared and its values bound server-side as ``offers`` and ``budget`` are."""
    return _rows(sql, params)


def message_results(statements: list[kept_cursor.Statement]) -> list[list[tuple]]:
    """``kept_cursor.message_results`` of a caller's message around ``budget_statement``,
    a prepared statement the connection lost forgotten as ``rows`` forgets it."""
    try:
        return kept_cursor.message_results(statements)
    except DatabaseError as error:
        forget_prepared_if_missing(error)
        raise


def offers(workspace_id: int, *, feature_key: str, user_id: str | None, group_id: str | None) -> list[tuple]:
    """One row per subscription of the subject (one row with null subscription columns when
    it has none): feature id, type, archived_at, user pk, group pk, group pks, then the
    subscription's pk, user_id, group_id, package_id, status, started_at and its package's
    row for the feature: pk (null: not in the package), limit, overage_enabled, reset_period.

    As ``access.find_subject``: a userId when given, else the group."""
    params = {
        "ws": workspace_id,
        "feature": feature_key,
        "user_id": user_id,
        "group_id": group_id if user_id is None else None,
    }
    return _rows(_OFFERS_SQL, params)


# ``offers``' statement for a message that holds a budget read too, in one dict of values: its
# feature key named apart from the budget's feature id (both ``feature`` in their own statements).
OFFERS_BESIDE_BUDGET_SQL = _OFFERS_SQL.replace("%(feature)s", "%(offers_feature)s")


def budget_statement(
    workspace_id: int,
    *,
    feature_id: int,
    user_pk: int | None,
    group_pk: int | None,
    owner: str,
    start: datetime,
    end: datetime | None,
    now: datetime,
) -> tuple[str, dict]:
    """The statement of ``budget`` (named parameters), for a caller that sends it in one
    message with others; ``budget_of`` reads its row."""
    # The budget's users (``m.pks``), each read as its own range of the (workspace, user,
    # feature, …) indexes of the counters and the usage rows. The ranges are written as row
    # comparisons, which only those indexes can take as their bounds: with the user, the
    # feature and the days as separate conditions (and the users in a CTE), a generic plan
    # made while the tables were small read the (workspace, feature, …) range of every user
    # and filtered the budget's users out of it: every counter of the feature, and for a
    # period that started today the whole workspace's usage of the day, at each read
    # (docs/performance-history.md, "Round 7: consumepg"). ``ranged`` says what else each range
    # carries, and why.
    if user_pk is not None:
        members = "ARRAY[%(user_pk)s::bigint]"
    else:
        members = (
            f"ARRAY(SELECT user_id FROM {GroupMembership._meta.db_table}"
            " WHERE workspace_id = %(ws)s AND group_id = %(group_pk)s::bigint)"
        )
    first_day, end_day, partial = split_period(start, end)
    params = {
        "ws": workspace_id,
        "feature": feature_id,
        "user_pk": user_pk,
        "group_pk": group_pk,
        "first_day": first_day,
        "end_day": end_day,
        "owner": owner,
        "held": ReservationStatus.HELD.value,
        "now": now,
    }

    # The values the ranges are bounded by, as columns of ``m`` (``OFFSET 0``: a subquery the
    # planner keeps, so each probe reads them as parameters of its own).
    values = {"ws": "%(ws)s::bigint", "feature": "%(feature)s::bigint"}

    def ranged(table: str, column: str, low: tuple[str, str], high: tuple[str, str] | None) -> str:
        """The sum of ``amount`` over the members' rows with ``low <= column < high``
        (each bound: its parameter's name and type)."""
        # PostgreSQL estimates a row comparison by its first column alone, as an open range
        # (a third of the rows per bound), and the user's foreign-key index takes the row
        # comparisons' first column as its own range (``user_id >= … AND user_id <= …``,
        # estimated as a closed range: 0.5 % of the rows). With statistics that put the
        # workspace at every row (taken while only other workspaces had usage: the
        # benchmark's full run, or a workspace alone in its table), the generic plan then
        # read every usage row of the user, of every feature and day, once per range. So each
        # range also carries the same bounds as plain conditions, which only refine the
        # estimate: the user as a closed range (not ``=``: an equality beside that range put
        # the foreign-key index at one row, tied with this one and smaller), and ``column``'s
        # own range. Its index is then the cheapest under every statistics state
        # (tests/test_entitlement_budget_plan.py).
        #
        # The bounds are ``m``'s columns, not the statement's parameters: a custom plan then
        # knows no more of them than the generic plan, and costs the same, so after its first
        # five executions the prepared statement keeps its generic plan. With the values in
        # view, a custom plan put a workspace newer than the statistics at no rows and cost a
        # third of the generic one, and PostgreSQL planned the statement again at every
        # execution: 0.3-0.8 ms of PostgreSQL's CPU per consume (docs/performance-history.md, "Round
        # 16: s7plan").
        for name, type_ in (low, high) if high else (low,):
            values[name] = f"%({name})s::{type_}"
        lo = f"m.{low[0]}"
        key = f"(r.user_id, r.feature_id, r.{column})"
        bounds = [
            "r.user_id >= p.user_id AND r.user_id <= p.user_id",
            f"{key} >= (p.user_id, m.feature, {lo})",
            f"{key} < (p.user_id, m.feature, m.{high[0]})"
            if high
            else "(r.user_id, r.feature_id) <= (p.user_id, m.feature)",
            f"r.{column} >= {lo}",
        ]
        if high:
            bounds.append(f"r.{column} < m.{high[0]}")
        # LATERAL: one probe per member (a join would let a plan read the workspace's rows once
        # and match the members after).
        return (
            f"coalesce((SELECT sum(s.amount) FROM unnest(m.pks) AS p (user_id), LATERAL (SELECT sum(r.amount) AS amount"
            f" FROM {table} AS r WHERE r.workspace_id = m.ws AND {' AND '.join(bounds)}) AS s), 0)"
        )

    # As counters.period_used: the counters of the whole days, the usage rows of the partial ones.
    days = "0"
    if end_day is None or first_day < end_day:
        days = ranged(
            UsageCounter._meta.db_table, "day", ("first_day", "date"), None if end_day is None else ("end_day", "date")
        )
    sums = []
    for n, (range_start, range_end) in enumerate(partial):
        params[f"from{n}"], params[f"to{n}"] = range_start, range_end
        sums.append(ranged(Usage._meta.db_table, "occurred_at", (f"from{n}", "timestamptz"), (f"to{n}", "timestamptz")))
    rows = " + ".join(sums) or "0"
    columns = ", ".join(f"{value} AS {name}" for name, value in values.items())
    sql = (
        f"SELECT coalesce({days}, 0), coalesce({rows}, 0),"
        f" coalesce((SELECT sum(amount) FROM {Reservation._meta.db_table} WHERE workspace_id = %(ws)s"
        " AND subject = %(owner)s AND feature_id = %(feature)s AND status = %(held)s AND expires_at > %(now)s), 0),"
        f" m.pks FROM (SELECT {members} AS pks, {columns} OFFSET 0) AS m"
    )
    return sql, params


def budget_of(row: tuple) -> tuple[Decimal, Decimal, list[int]]:
    days_used, rows_used, held, member_pks = row
    return Decimal(days_used) + Decimal(rows_used), Decimal(held), list(member_pks)


def budget(workspace_id: int, **question) -> tuple[Decimal, Decimal, list[int]]:
    """(used in ``[start, end)``, held at ``now``, the owner's members) for a budget owned by
    ``user_pk`` or by every member of ``group_pk``: ``counters.period_used`` and
    ``access.held_amount`` in one statement (``budget_statement``'s keywords)."""
    sql, params = budget_statement(workspace_id, **question)
    (row,) = _rows(sql, params)
    return budget_of(row)
