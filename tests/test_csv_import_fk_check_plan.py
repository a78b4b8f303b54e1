"""An import's deferred foreign-key checks probe the users' primary key under any statistics.

An import is one transaction, so PostgreSQL checks every new identity's reference to its
user at COMMIT, one ``SELECT 1 FROM ONLY users_enduser x WHERE id = $1 FOR KEY SHARE OF x``
each. When the users' table was analysed while empty over pages that still exist (every
user deleted, then analysed), the planner counts it empty: both indexes that hold ``id``
then cost the same, and the tie went to ``enduser_ws_created_idx`` (workspace_id,
created_at, id), whose scan for ``id = $1`` walks the whole index. Each check then read
every user the import had created, and the COMMIT grew quadratically (1.2 s a check at
8,000 rows; docs/performance-history.md, "What is left (after round 12)").

The test builds that state, runs a real import with ``auto_explain`` sending the plan of
every statement, the checks included, to the client, and asserts the plan of the checks.
"""

import io
import json
import threading

import psycopg
import pytest
from django.db import connection

from tests.conftest import make_tenant, requires_postgres
from users.csv_import import import_users_csv
from users.models import EndUser, UserIdentity

pytestmark = [requires_postgres, pytest.mark.django_db(transaction=True)]

USERS = EndUser._meta.db_table
IDENTITIES = UserIdentity._meta.db_table
ROWS = 2000


def _old_users(cursor, count: int) -> None:
    """``count`` users of another workspace, made before the import, and their identities."""
    other = make_tenant("Other").workspace
    cursor.execute(
        f"INSERT INTO {USERS} (workspace_id, user_id, name, email, email_key, billing_id, "
        "billing_provider, audiences, created_at, updated_at) "
        "SELECT %s, 'old' || g, '', '', '', '', '', '{}', now(), now() FROM generate_series(1, %s) g",
        [other.pk, count],
    )
    cursor.execute(
        f"INSERT INTO {IDENTITIES} (workspace_id, external_id, user_id, created_at) "
        f"SELECT workspace_id, user_id, id, now() FROM {USERS}"
    )


def _analyse_empty_over_pages() -> None:
    """500 users and identities written and deleted, then analysed: 0 rows over pages."""
    with connection.cursor() as cursor:
        _old_users(cursor, 500)
        cursor.execute(f"DELETE FROM {IDENTITIES}")
        cursor.execute(f"DELETE FROM {USERS}")
        cursor.execute(f"ANALYZE {USERS}, {IDENTITIES}")
        cursor.execute("SELECT relpages, reltuples FROM pg_class WHERE relname = ANY(%s)", [[USERS, IDENTITIES]])
        assert all(pages > 0 and tuples == 0 for pages, tuples in cursor.fetchall())


def _csv(rows: int) -> bytes:
    lines = ["user_id,email,name"] + [f"imp{n},imp{n}@example.com,User {n}" for n in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def _plans_sent_while(run) -> list[dict]:
    """Every plan ``auto_explain`` sends to this connection while ``run()`` runs, nested
    statements (the foreign-key triggers' checks) included."""
    notices: list[str] = []
    connection.ensure_connection()
    raw = connection.connection

    def collect(diagnostic) -> None:
        notices.append(diagnostic.message_primary or "")

    raw.add_notice_handler(collect)
    with connection.cursor() as cursor:
        cursor.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("log_min_duration", "0"),
            ("log_nested_statements", "on"),
            ("log_format", "json"),
            ("log_level", "notice"),
        ):
            cursor.execute(f"SET auto_explain.{setting} = '{value}'")
    try:
        run()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET auto_explain.log_min_duration = -1")
        raw.remove_notice_handler(collect)
    plans = []
    for notice in notices:
        _, _, body = notice.partition("duration:")
        if "plan:" in body:
            plans.append(json.loads(body.partition("plan:")[2]))
    return plans


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _never_analysed() -> None:
    """A new install: tables truncated to never analysed, never vacuumed."""
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {IDENTITIES}, {USERS} CASCADE")


def _analysed_small() -> None:
    """Analysed when the install had 20 users; the import then adds many more."""
    with connection.cursor() as cursor:
        _old_users(cursor, 20)
        cursor.execute(f"ANALYZE {USERS}, {IDENTITIES}")


@pytest.mark.parametrize("statistics", [_analyse_empty_over_pages, _never_analysed, _analysed_small])
def test_the_identity_to_user_checks_at_commit_probe_the_primary_key(statistics):
    workspace = make_tenant().workspace
    statistics()

    plans = _plans_sent_while(
        lambda: import_users_csv(
            workspace=workspace, file=io.BytesIO(_csv(ROWS)), dry_run=False, actor="test", run_inline=True
        )
    )

    assert EndUser.objects.filter(workspace=workspace).count() == ROWS
    checks = [
        plan
        for plan in plans
        if "FOR KEY SHARE" in plan["Query Text"] and f'ONLY "public"."{USERS}"' in plan["Query Text"]
    ]
    # One check per identity the import created (PostgreSQL checks each deferred row).
    assert len(checks) >= ROWS
    # How each check reads the users: an index scan, or a bitmap scan built from index scans.
    reads = {
        (node["Node Type"], index["Index Name"])
        for plan in checks
        for node in _nodes(plan["Plan"])
        if node.get("Relation Name") == USERS
        for index in ([node] if "Index Name" in node else list(_nodes(node))[1:] or [{"Index Name": None}])
    }
    assert {index for _, index in reads} == {f"{USERS}_pkey"}, reads


def test_an_import_does_not_wait_for_another_holder_of_the_statistics_lock():
    """Another import (or a vacuum) holding the table's ANALYZE lock until its own commit
    could be waiting for a user this import's checks lock: the import leaves the statistics
    as they are and commits, instead of waiting."""
    workspace = make_tenant().workspace
    _analyse_empty_over_pages()
    settings = connection.get_connection_params()
    with psycopg.connect(**settings) as other:
        other.execute(f"LOCK TABLE {USERS} IN SHARE UPDATE EXCLUSIVE MODE")
        finished = threading.Event()

        def run_import():
            try:
                with connection.cursor() as cursor:  # longer than the join's wait below
                    cursor.execute("SET lock_timeout = '60s'")
                import_users_csv(
                    workspace=workspace, file=io.BytesIO(_csv(50)), dry_run=False, actor="test", run_inline=True
                )
                finished.set()
            finally:
                connection.close()

        importer = threading.Thread(target=run_import)
        importer.start()
        importer.join(timeout=20)
        holding = not finished.is_set()
        other.rollback()
        importer.join()
    assert not holding, "the import waited for the other holder's commit"
    assert EndUser.objects.filter(workspace=workspace).count() == 50
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE relname = %s", [USERS])
        assert cursor.fetchone()[0] == 0  # left as they were
