"""The identity engine's chunk reads probe an index per key under every statistics state.

An import's chunk reads the owners of its rows' userIds and locks the users of its rows'
email keys (``users.bulk``). Its own users are uncommitted, so no statistics can count
them: with ``workspace_id = … AND key = ANY(keys)`` the planner scanned every user the
import had created in the workspace, with the keys as a filter, and a large import was
quadratic; hiding the workspace from the planner fixed that only where other workspaces
had been analysed, and on a fresh install kept the scan with an unhashed filter, ~100x
slower (docs/performance-history.md, "Round 9: s5plan" and "Round 10: s5probe").

Each test builds one statistics state inside its transaction, creates many uncommitted
users of the workspace as an import does, and asserts from ``EXPLAIN (FORMAT JSON)`` that
every read of the users' tables is an index probe with a key in its index condition.
"""

import pytest
from django.db import connection, transaction

from tests.conftest import make_tenant, requires_postgres
from users import bulk
from users.models import EndUser, UserIdentity

pytestmark = requires_postgres

IMPORTED = 30_000  # the import's uncommitted users before the chunk
CHUNK = 1_000
KNOWN = 10  # the chunk's rows that name users made earlier in the import

USERS = EndUser._meta.db_table
IDENTITIES = UserIdentity._meta.db_table
# The index each kind of key may be probed through, and what its condition must name.
PROBES = {
    "identity_unique_external_id": "external_id",
    "users_enduser_pkey": "id",
    "enduser_email_ws_idx": "email_key",
}


def _create_users(cursor, workspace_id: int, first: int, count: int) -> None:
    """``count`` users (userId ``u<n>``, email ``e<n>@example.com``) and their identities."""
    cursor.execute(
        f"INSERT INTO {USERS} (workspace_id, user_id, name, email, email_key, billing_id, billing_provider, "
        "audiences, created_at, updated_at) "
        "SELECT %s, 'u' || g, '', 'e' || g || '@example.com', 'e' || g || '@example.com', '', '', '{}', now(), now() "
        "FROM generate_series(%s, %s) AS g",
        [workspace_id, first, first + count - 1],
    )
    cursor.execute(
        f"INSERT INTO {IDENTITIES} (workspace_id, external_id, user_id, created_at) "
        f"SELECT workspace_id, user_id, id, now() FROM {USERS} u WHERE workspace_id = %s "
        f"AND NOT EXISTS (SELECT 1 FROM {IDENTITIES} i WHERE i.user_id = u.id)",
        [workspace_id],
    )


def _relstats(cursor) -> dict[str, tuple[int, float]]:
    cursor.execute("SELECT relname, relpages, reltuples FROM pg_class WHERE relname = ANY(%s)", [[USERS, IDENTITIES]])
    return {name: (pages, tuples) for name, pages, tuples in cursor.fetchall()}


def _fresh(cursor, workspace_id: int, other_id: int) -> None:
    """Tables never analysed or vacuumed (a new install): TRUNCATE resets them to that."""
    cursor.execute(f"TRUNCATE {IDENTITIES}, {USERS} CASCADE")
    assert set(_relstats(cursor).values()) == {(0, -1.0)}


def _analysed_empty(cursor, workspace_id: int, other_id: int) -> None:
    """Analysed after every user was deleted, before a vacuum: 0 rows over pages that exist."""
    _create_users(cursor, other_id, 0, 500)
    cursor.execute(f"DELETE FROM {IDENTITIES}")
    cursor.execute(f"DELETE FROM {USERS}")
    cursor.execute(f"ANALYZE {USERS}, {IDENTITIES}")
    assert all(pages > 0 and tuples == 0 for pages, tuples in _relstats(cursor).values())


def _stale_small(cursor, workspace_id: int, other_id: int) -> None:
    """Analysed when the workspace had 100 users (the import then adds thousands)."""
    cursor.execute(f"TRUNCATE {IDENTITIES}, {USERS} CASCADE")
    _create_users(cursor, workspace_id, 0, 100)
    cursor.execute(f"ANALYZE {USERS}, {IDENTITIES}")


def _other_workspace(cursor, workspace_id: int, other_id: int) -> None:
    """The bench's state: only another workspace's 1,000 users analysed."""
    cursor.execute(f"TRUNCATE {IDENTITIES}, {USERS} CASCADE")
    _create_users(cursor, other_id, 0, 1_000)
    cursor.execute(f"ANALYZE {USERS}, {IDENTITIES}")


STATES = {
    "fresh": _fresh,
    "analysed_empty": _analysed_empty,
    "stale_small": _stale_small,
    "other_workspace": _other_workspace,
}


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(cursor, sql: str, params: list) -> dict:
    cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
    return cursor.fetchone()[0][0]["Plan"]


def _assert_probes(plan: dict, jit_above_cost: float) -> None:
    """Every read of the users' tables goes through a key's index, with the key in its
    condition, and the statement is not costed high enough to be JIT-compiled (~60 ms)."""
    # A tenth: the estimate grows with the table (30,000 users here); with the 1,000 keys
    # visible to the planner, the email probes passed the threshold at 100,000.
    assert plan["Total Cost"] < jit_above_cost / 10, plan["Total Cost"]
    nodes = list(_nodes(plan))
    scans = [n for n in nodes if n.get("Relation Name") in (USERS, IDENTITIES)]
    assert scans, plan
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], plan
    indexed = [n for n in nodes if "Index Name" in n]
    for node in indexed:
        assert node["Index Name"] in PROBES, (node["Index Name"], node.get("Index Cond"))
        assert PROBES[node["Index Name"]] in node.get("Index Cond", ""), (node["Index Name"], node.get("Index Cond"))


@pytest.mark.django_db
@pytest.mark.parametrize("state", list(STATES))
def test_chunk_reads_probe_an_index_per_key(state):
    tenant, other = make_tenant("Importer"), make_tenant("Other")
    workspace = tenant.workspace
    # The import's users are made and read in a savepoint rolled back at the end: their
    # deferred FK checks go with it. Run at the test's teardown instead (Django checks
    # constraints before it rolls back), 31,000 checks were planned on this test's statistics
    # states, and on a test database bloated by a long run without autovacuum they took minutes.
    with transaction.atomic():
        _probe_the_chunk_reads(state, workspace, other)
        transaction.set_rollback(True)


def _probe_the_chunk_reads(state, workspace, other):
    with connection.cursor() as cursor:
        cursor.execute("SHOW jit_above_cost")
        jit_above_cost = float(cursor.fetchone()[0])
        STATES[state](cursor, workspace.pk, other.workspace.pk)
        # The import so far: its users are this transaction's own, which no statistics count.
        _create_users(cursor, workspace.pk, 1_000, IMPORTED)
        new = range(1_000 + IMPORTED, 1_000 + IMPORTED + CHUNK - KNOWN)
        known = range(1_000, 1_000 + KNOWN * 97, 97)
        user_ids = {f"u{n}" for n in [*new, *known]}
        emails = {f"e{n}@example.com" for n in [*new, *known]}
        earlier = EndUser.objects.filter(workspace=workspace, user_id__in=["u1000", "u1001"])
        pks = set(earlier.values_list("pk", flat=True))

        for sql, params in (
            bulk.owners_of_sql(workspace, user_ids),
            bulk.lock_users_sql(workspace, pks, emails),
            bulk.lock_users_sql(workspace, set(), emails, owners_of=user_ids),
        ):
            _assert_probes(_explain(cursor, sql, params), jit_above_cost)

    # And the reads find exactly the users made earlier in the import.
    owners = bulk.owners_of(workspace, user_ids)
    assert set(owners) == {f"u{n}" for n in known}
    locked = bulk.lock_users(workspace, pks, emails)
    assert sorted(u.user_id for u in locked) == sorted({f"u{n}" for n in known} | {"u1000", "u1001"})
    assert [u.pk for u in locked] == sorted(u.pk for u in locked)


@pytest.mark.django_db
def test_reads_stay_in_the_workspace():
    """The email probe keeps the workspace as a filter (``workspace_id + 0``): another
    workspace's user with the same email or userId is never read or locked."""
    tenant, other = make_tenant("Importer"), make_tenant("Other")
    with connection.cursor() as cursor:
        _create_users(cursor, other.workspace.pk, 0, 5)
        _create_users(cursor, tenant.workspace.pk, 3, 5)
    emails = {f"e{n}@example.com" for n in range(10)}
    locked = bulk.lock_users(tenant.workspace, set(), emails)
    assert sorted(u.user_id for u in locked) == [f"u{n}" for n in range(3, 8)]
    assert {u.workspace_id for u in locked} == {tenant.workspace.pk}
    assert set(bulk.owners_of(tenant.workspace, {f"u{n}" for n in range(10)})) == {f"u{n}" for n in range(3, 8)}
    sql, params = bulk.lock_users_sql(tenant.workspace, set(), {"e0@example.com"}, owners_of={"u1", "u4"})
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = bulk.users_from_rows(cursor.fetchall())
    assert [u.user_id for u in rows] == ["u4"]
