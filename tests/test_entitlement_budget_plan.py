"""The budget read probes its users' ranges, whatever the statistics say.

A consume reads a budget's used amount (``entitlements.reads.budget_statement``) in a
statement prepared once per connection, so after its first five executions PostgreSQL may
keep a generic plan, chosen on the statistics of that moment. The usage table has four
indexes a read of one user's feature range can take, and which one the planner picks depends
on those statistics: taken before the workspace had rows, with only other workspaces' rows
(the benchmark's full run: ~1M rows of other workspaces when S7 starts), or never taken.
Only the (workspace, user, feature, occurred_at) index reads just the budget's rows; the
user's foreign-key index reads every usage row of the user (every feature, every day), the
(workspace, feature, occurred_at) one every user's (docs/performance-history.md, "Round 16: s7plan").

Each state is made here, in the test's transaction (catalog rows touched first, so that
``ANALYZE``'s in-place updates of ``pg_class`` are rolled back with it): the plan asserted
depends on no other test file's leftovers.
"""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from entitlements import reads
from features.models import Feature, Usage, UsageCounter
from kana.db import prepared
from users.models import EndUser, Group, GroupMembership

from .conftest import make_tenant, requires_postgres

pytestmark = requires_postgres

USAGE = Usage._meta.db_table
COUNTERS = UsageCounter._meta.db_table
USERS = EndUser._meta.db_table


def _users(workspace_id: int, prefix: str, count: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {USERS} (workspace_id, user_id, name, email, email_key, billing_id, billing_provider,"
            " audiences, created_at, updated_at)"
            " SELECT %s, %s || g, '', '', '', '', '', '[]', now(), now() FROM generate_series(1, %s) AS g"
            " RETURNING id",
            [workspace_id, prefix, count],
        )
        return sorted(pk for (pk,) in cursor.fetchall())


def _usage(
    workspace_id: int, feature_id: int, user_pks: list[int], per_user: int, *, days: int, ago=timedelta(0)
) -> None:
    """``per_user`` usage rows of each user over ``days`` days up to ``ago`` before now (the
    counters follow by the table's trigger)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {USAGE} (amount, occurred_at, event_id, feature_id, user_id, workspace_id)"
            " SELECT 1, now() - %s - (g %% %s) * interval '1 day' - g * interval '1 second',"
            " (SELECT coalesce(max(event_id), 0) FROM " + USAGE + ") + row_number() OVER (), %s, u, %s"
            " FROM unnest(%s::bigint[]) AS u, generate_series(1, %s) AS g",
            [ago, days, feature_id, workspace_id, user_pks, per_user],
        )


def _hold_catalog_rows() -> None:
    """A transactional no-op update of the tables' ``pg_class`` rows: ``ANALYZE`` then
    updates this transaction's versions in place, and the rollback at the test's end
    restores the statistics as they were before it."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE pg_class SET reltuples = reltuples WHERE oid = ANY(%s::regclass[])", [[USAGE, COUNTERS]])


def _forget_statistics() -> None:
    """The tables as never analysed, never vacuumed: no column statistics, no size."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM pg_statistic WHERE starelid = ANY(%s::regclass[])", [[USAGE, COUNTERS]])
        cursor.execute(
            "UPDATE pg_class SET reltuples = -1, relpages = 0, relallvisible = 0 WHERE oid = ANY(%s::regclass[])",
            [[USAGE, COUNTERS]],
        )


def _analyse() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {USAGE}, {COUNTERS}")


def _never_analysed(budget) -> None:
    budget.own_usage()


def _analysed_empty(budget) -> None:
    _analyse()
    budget.own_usage()


def _analysed_with_other_workspaces_rows(budget) -> None:
    other = make_tenant("Other").workspace
    feature = Feature.objects.create(workspace=other, key="messages")
    _usage(other.pk, feature.pk, _users(other.pk, "other-", 100), 30, days=3)
    _analyse()
    budget.own_usage()


def _analysed_with_many_other_workspaces_rows(budget) -> None:
    """As the benchmark's full run when S7 starts: S4's workspace's usage, many users' rows
    of one day long past, analysed before S7's workspace had any."""
    other = make_tenant("Other").workspace
    feature = Feature.objects.create(workspace=other, key="messages")
    _usage(other.pk, feature.pk, _users(other.pk, "other-", 2000), 25, days=1, ago=timedelta(days=300))
    _analyse()
    budget.own_usage()


def _analysed_with_its_own_rows(budget) -> None:
    budget.own_usage()
    _analyse()


class _Budget:
    """A workspace whose budget owners have usage today and in the days before."""

    def __init__(self, tenant):
        self.workspace = tenant.workspace
        self.feature = Feature.objects.create(workspace=self.workspace, key="messages")
        Feature.objects.create(workspace=self.workspace, key="exports")
        self.user_pks = _users(self.workspace.pk, "u", 20)
        group = Group.objects.create(workspace=self.workspace, group_id="team")
        GroupMembership.objects.bulk_create(
            GroupMembership(workspace=self.workspace, group=group, user_id=pk) for pk in self.user_pks[:5]
        )
        self.group_pk = group.pk

    def own_usage(self) -> None:
        exports = Feature.objects.get(workspace=self.workspace, key="exports")
        _usage(self.workspace.pk, self.feature.pk, self.user_pks, 50, days=3)
        _usage(self.workspace.pk, exports.pk, self.user_pks, 50, days=40)


STATES = [
    _never_analysed,
    _analysed_empty,
    _analysed_with_other_workspaces_rows,
    _analysed_with_many_other_workspaces_rows,
    _analysed_with_its_own_rows,
]


def _scans(plan: dict):
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


def _generic_plan(sql: str, params: dict) -> dict:
    """The generic plan of ``sql`` prepared afresh: the one a prepared statement keeps."""
    name, prepare, execute = prepared._shape(sql)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # an earlier test may have prepared the same statement
        prepared.forget_all()
        cursor.execute(prepare)
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        try:
            cursor.execute("EXPLAIN (FORMAT JSON) " + execute, params)
            (plan,) = cursor.fetchone()[0]
        finally:
            cursor.execute("RESET plan_cache_mode")
            cursor.execute(f"DEALLOCATE {name}")
    return plan["Plan"]


def _question(budget: "_Budget", owner: str, period: str) -> dict:
    now = timezone.now()
    if period == "open":  # whole days from a partial first day on, never ending
        start, end = now - timedelta(days=40, hours=1), None
    else:  # a month that started today: a partial first day, whole days, a partial last day
        start = now - timedelta(hours=3)
        end = start + timedelta(days=30)
    return {
        "feature_id": budget.feature.pk,
        "user_pk": budget.user_pks[0] if owner == "user" else None,
        "group_pk": budget.group_pk if owner == "group" else None,
        "owner": "budget",
        "start": start,
        "end": end,
        "now": now,
    }


@pytest.mark.parametrize("period", ["open", "month"])
@pytest.mark.parametrize("owner", ["user", "group"])
@pytest.mark.parametrize("statistics", STATES, ids=lambda state: state.__name__.strip("_"))
def test_the_budget_read_probes_only_its_users_feature_and_days(tenant, statistics, owner, period):
    budget = _Budget(tenant)
    _hold_catalog_rows()
    _forget_statistics()
    statistics(budget)
    sql, params = reads.budget_statement(budget.workspace.pk, **_question(budget, owner, period))
    scans = [s for s in _scans(_generic_plan(sql, params)) if s["Relation Name"] in (USAGE, COUNTERS)]
    assert {s["Relation Name"] for s in scans} == {USAGE, COUNTERS}
    for scan in scans:
        # An index scan, or a bitmap heap scan whose bounds are its bitmap index scans'.
        probes = [scan] if "Index Name" in scan else scan.get("Plans", [])
        assert probes, scan
        for probe in probes:
            assert probe["Index Name"] in ("usage_ws_user_feature_idx", "usagecounter_unique_key"), probe
            assert "user_id" in probe["Index Cond"] and "feature_id" in probe["Index Cond"], probe


@pytest.mark.parametrize("owner", ["user", "group"])
@pytest.mark.parametrize("statistics", STATES, ids=lambda state: state.__name__.strip("_"))
def test_the_prepared_budget_read_keeps_its_generic_plan(tenant, statistics, owner):
    """After its first five executions a prepared statement keeps its generic plan only if
    that plan costs no more than the custom ones did; otherwise PostgreSQL plans it again at
    every execution (0.3-0.8 ms of a consume's PostgreSQL CPU in the full run's state)."""
    budget = _Budget(tenant)
    _hold_catalog_rows()
    _forget_statistics()
    statistics(budget)
    sql, params = reads.budget_statement(budget.workspace.pk, **_question(budget, owner, "month"))
    name, prepare, execute = prepared._shape(sql)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
        prepared.forget_all()
        cursor.execute(prepare)
        for _ in range(10):
            cursor.execute(execute, params)
        cursor.execute("SELECT custom_plans, generic_plans FROM pg_prepared_statements WHERE name = %s", [name])
        plans = cursor.fetchone()
        cursor.execute(f"DEALLOCATE {name}")
    # Five custom plans first, then the generic plan for every execution after them.
    assert plans == (5, 5)
