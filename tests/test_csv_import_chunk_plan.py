"""An import's chunk reads find its keys by index, however many users the import has made.

A CSV import runs in one transaction, so the users it creates are invisible to autovacuum
and to an ANALYZE in any other session: the statistics keep saying that its workspace has
no users. With the workspace id and the chunk's 1,000 keys in the statement, the planner
weighed 1,000 index descents against that (empty) workspace and chose to read all of its
users through a workspace-leading index, filtering them by the keys: each chunk read every
user the import had created so far, and PostgreSQL's time per row doubled over a 100,000-row
import (docs/performance.md, "Round 9: s5plan").
"""

from datetime import UTC, datetime

from django.db import connection

from users.identity import IdentifyOutcome, ProfileRow, apply_profile_rows
from users.profile import validated_changes

from .conftest import make_tenant, requires_postgres

pytestmark = requires_postgres

_TABLES = {"users_enduser", "users_useridentity"}
# The index columns that are a chunk's keys (the primary key: ids read back by owner).
_KEYS = ("external_id", "email_key", "(id = ")


def _store_users(workspace_id: int, prefix: str, count: int) -> None:
    """``count`` users with a userId and an email, and their identities, set-based."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users_enduser (workspace_id, user_id, name, email, email_key, billing_id,"
            " billing_provider, audiences, created_at, updated_at)"
            " SELECT %s, %s || g, 'n', %s || g || '@example.com', %s || g || '@example.com', '', '', '{}',"
            " now(), now() FROM generate_series(1, %s) AS g",
            [workspace_id, prefix, prefix, prefix, count],
        )
        cursor.execute(
            "INSERT INTO users_useridentity (workspace_id, user_id, external_id, created_at)"
            " SELECT workspace_id, id, user_id, now() FROM users_enduser WHERE workspace_id = %s",
            [workspace_id],
        )


def _scans(plan: dict):
    """The plan's nodes that read the users' tables (a bitmap heap scan with its index scans)."""
    if plan.get("Relation Name") in _TABLES or plan.get("Node Type") == "Bitmap Index Scan":
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


def test_a_chunk_reads_its_keys_by_index_when_statistics_say_the_workspace_is_empty(tenant):
    _store_users(make_tenant("Seeded").workspace.pk, "seed-", 300)
    with connection.cursor() as cursor:
        # Statistics from before the import: one workspace of 300 users, none in the tenant's.
        cursor.execute("ANALYZE users_enduser, users_useridentity")
    _store_users(tenant.workspace.pk, "imp-", 5000)  # the import's earlier chunks (uncommitted)
    # The next chunk: ten users made by earlier chunks, then new ones.
    rows = [
        ProfileRow(
            changes=validated_changes(name=f"Imported {i}", email=f"imp-{i}@example.com")[0],
            user_id=f"imp-{i}",
            label=f"row {i}",
        )
        for i in range(4991, 5991)
    ]
    plans = []

    def explain_reads(execute, sql, params, many, context):
        if sql.startswith("SELECT") and {"users_useridentity", "users_enduser"} & set(sql.replace('"', " ").split()):
            cursor = context["cursor"]
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
            plans.append(cursor.fetchone()[0][0]["Plan"])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(explain_reads):
        outcomes = apply_profile_rows(
            workspace=tenant.workspace, rows=rows, occurred_at=datetime(2026, 1, 1, tzinfo=UTC), touched={}
        )

    assert [o.outcome for o in outcomes].count(IdentifyOutcome.CREATED) == 990
    assert [o.outcome for o in outcomes[:10]] == [IdentifyOutcome.UPDATED] * 10
    assert len(plans) == 2  # the userIds' owners, the users locked by id and email
    for plan in plans:
        scans = list(_scans(plan))
        assert scans
        for node in scans:
            # Every read is an index probe by the chunk's keys: no node reads the workspace's
            # other users and drops them.
            assert node["Node Type"] != "Seq Scan", node
            assert node.get("Rows Removed by Filter", 0) == 0, node
            if "Index Cond" in node:
                assert any(key in node["Index Cond"] for key in _KEYS), node
