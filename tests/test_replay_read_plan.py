"""The replay check probes the (workspace, messageId) unique index whatever the statistics say.

PostgreSQL's statistics lag a workspace that grows fast (a new tenant's first hours; the
benchmark's S1 and S3, whose workspaces start empty). Estimating its events at about one
row, the planner read a batch's messageIds by scanning every stored event of the workspace
through a workspace-leading index and filtering them: a read that grew with the workspace
(docs/performance.md, "Round 5: s3batch").
"""

from django.db import connection

from features.ledger import _known_ids_sql

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
