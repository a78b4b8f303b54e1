"""The replay check probes the (workspace, messageId) unique index whatever the statistics say.

PostgreSQL's statistics lag a workspace that grows fast (a new tenant's first hours; the
benchmark's S1 and S3, whose workspaces start empty). Estimating its events at about one
row, the planner read a batch's messageIds by scanning every stored event of the workspace
through a workspace-leading index and filtering them: a read that grew with the workspace
(docs/performance-history.md, "Round 5: s3batch").
"""

import pytest
from django.db import connection

from features.ledger import _VERSION_KIND, _known_ids_sql, _single_known_ids_sql
from kana.db import prepared
from users.models import EndUser, UserIdentity

from .conftest import make_tenant, requires_postgres


def _event_nodes(plan: dict):
    if plan.get("Relation Name") == "features_event":
        yield plan
    for child in plan.get("Plans", []):
        yield from _event_nodes(child)


def _indexes_of(node: dict) -> set[str]:
    """The indexes a scan node reads: its own, or its bitmap children's (a Bitmap Heap Scan
    names no index; the Bitmap Index Scans under it do)."""
    if "Index Name" in node:
        return {node["Index Name"]}
    return set().union(*(_indexes_of(child) for child in node.get("Plans", [])))


def _store_events(workspace_id: int, prefix: str, count: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO features_event (workspace_id, message_id, type, name, external_user_id, payload,"
            " occurred_at, received_at, status, unmapped_reason, warnings)"
            " SELECT %s, %s || g, 'track', 'Report Exported', '', '{}', now(), now(), 'unmapped', '', '[]'"
            " FROM generate_series(1, %s) AS g",
            [workspace_id, prefix, count],
        )


@requires_postgres
def test_a_batch_s_replay_check_probes_the_unique_index_when_statistics_lag(tenant):
    _store_events(tenant.workspace.pk, "old-", 300)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE features_event")  # statistics from before the new tenant's events
    grown = make_tenant("Grown fast")
    _store_events(grown.workspace.pk, "new-", 5000)
    message_ids = {f"new-{i}" for i in range(4990, 5010)}  # ten replays, ten new
    sql, params = _known_ids_sql(grown.workspace, message_ids, {"u1"}, set())
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        (plan,) = cursor.fetchone()[0]
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    nodes = list(_event_nodes(plan["Plan"]))
    assert nodes
    for node in nodes:
        # An index scan or a bitmap scan of the unique index: either probes the messageIds;
        # neither reads the workspace's other events.
        assert _indexes_of(node) == {"event_unique_message_id"}, node
        assert node.get("Rows Removed by Filter", 0) == 0, node
    assert {value for value, kind, _ in rows if kind == 0} == {f"new-{i}" for i in range(4990, 5001)}


def _scan_nodes(plan: dict):
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scan_nodes(child)


# Each table the single message's read asks, and the unique index that answers for it.
_UNIQUE_INDEXES = {
    "features_event": "event_unique_message_id",
    "users_suppression": "suppression_unique_user_id",
    "users_anonymouslink": "anonymous_link_unique_anonymous_id",
    "users_useridentity": "identity_unique_external_id",
    "kana_workspace": "kana_workspace_pkey",  # the rules version's branch
}


@requires_postgres
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("sender", ["userId", "anonymousId"])
def test_a_single_message_s_prepared_read_probes_unique_indexes_with_either_plan(tenant, sender, plan_cache_mode):
    """The single track's read is prepared (``kana.db.prepared``): PostgreSQL runs its first
    five executions (and five after each ``replan_every``) with custom plans, made with the
    values, then may run a generic plan, made without them, for good. Every branch of either
    must probe its unique index, with statistics from before the workspace's events: a custom
    plan that knew the workspace put its events at one row and read them all through the
    workspace-only index (docs/performance-history.md, "Round 15: s2ties")."""
    _store_events(tenant.workspace.pk, "old-", 300)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE features_event")
    grown = make_tenant("Grown fast")
    _store_events(grown.workspace.pk, "new-", 5000)
    user_id, anonymous_id = ("u1", None) if sender == "userId" else (None, "anon-1")
    sql, params = _single_known_ids_sql(
        grown.workspace, "new-4999", user_id, anonymous_id, with_users=True, with_version=True
    )
    name, prepare, execute = prepared._shape(sql)
    with connection.cursor() as cursor:
        # An earlier test's track on this connection may have prepared the same statement.
        cursor.execute("DEALLOCATE ALL")
        prepared.forget_all()
        cursor.execute(prepare)
        try:
            cursor.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + execute, params)
            (plan,) = cursor.fetchone()[0]
            cursor.execute(execute, params)
            rows = cursor.fetchall()
        finally:
            cursor.execute("RESET plan_cache_mode")
            cursor.execute(f"DEALLOCATE {name}")
    nodes = list(_scan_nodes(plan["Plan"]))
    expected = (
        {"features_event", "users_useridentity", "users_suppression", "kana_workspace"}
        if user_id
        else {
            "features_event",
            "users_anonymouslink",
            "kana_workspace",
        }
    )
    assert {node["Relation Name"] for node in nodes} == expected
    for node in nodes:
        assert _indexes_of(node) == {_UNIQUE_INDEXES[node["Relation Name"]]}, node
        assert node.get("Rows Removed by Filter", 0) == 0, node
    assert rows == [("new-4999", 0, ""), (str(grown.workspace.rules_version), 4, "")]


@requires_postgres
def test_a_batch_s_read_probes_the_userids_it_was_sent_and_reads_no_other_user(tenant):
    """The batch's read of its userIds' users (``with_users``) probes the (workspace, userId)
    unique index once per userId, whatever the workspace holds: as ``= ANY(array)`` the
    planner read all of a 1,000-user workspace's identities and filtered them."""
    users = EndUser.objects.bulk_create(EndUser(workspace=tenant.workspace, user_id=f"u{i}") for i in range(1, 1001))
    UserIdentity.objects.bulk_create(
        UserIdentity(workspace=tenant.workspace, user=user, external_id=user.user_id) for user in users
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE users_useridentity")
    sent = {f"u{i}" for i in range(1, 101)} | {"nobody"}
    sql, params = _known_ids_sql(tenant.workspace, {"m-1", "m-2"}, sent, set(), with_users=True, with_version=True)
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        (plan,) = cursor.fetchone()[0]
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    (identities,) = [node for node in _scan_nodes(plan["Plan"]) if node["Relation Name"] == "users_useridentity"]
    assert _indexes_of(identities) == {"identity_unique_external_id"}, identities
    assert identities.get("Rows Removed by Filter", 0) == 0, identities
    assert identities["Actual Loops"] == len(sent)  # one probe per userId sent
    assert {value for value, kind, _ in rows if kind == 3} == sent - {"nobody"}
    assert [value for value, kind, _ in rows if kind == _VERSION_KIND] == [str(tenant.workspace.rules_version)]
