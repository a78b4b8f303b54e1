"""Migrations that rebuild an index on a large table let writes go on while they run.

Each test migrates a database of its own to just before the migration, holds a writer's
transaction open on the table (as a long import chunk would), starts the migration in a real
``manage.py migrate`` process, and checks that another writer is not queued behind it.
"""

import os
import secrets
import subprocess
import sys

import psycopg
import pytest
from django.db import connection

from .conftest import ROOT, database_url_for_subprocess, requires_postgres, wait_until

pytestmark = requires_postgres


@pytest.fixture
def scratch_database(db):
    """An empty database on the test server, dropped afterwards; yields its URL."""
    name = f"{connection.settings_dict['NAME']}_online_{secrets.token_hex(3)}"
    server = database_url_for_subprocess().rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str, *target: str, wait: bool = True):
    argv = [sys.executable, "manage.py", "migrate", *target, "--no-input", "-v", "0"]
    env = {**os.environ, "DATABASE_URL": url, "KANA_DEBUG": "1"}
    if wait:
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _index_waiting_for_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as probe:
        row = probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query ~* '^\\s*(CREATE|DROP) INDEX'"
        ).fetchone()
        return row[0] > 0


def _migrate_while_another_transaction_writes(url: str, app: str, target: str, table: str) -> None:
    """Migrate ``app`` to ``target`` while a writer's transaction on ``table`` stays open, and
    check that a second writer is not queued behind the migration's index statements."""
    with psycopg.connect(url) as long_writer:
        # An open transaction that writes the table, as an import chunk's or a track's does.
        long_writer.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
        migration = _migrate(url, app, target, wait=False)
        try:
            wait_until(
                lambda: _index_waiting_for_a_lock(url),
                timeout=120,
                message="the migration's index statement waits for the open transaction",
            )
            with psycopg.connect(url) as other_writer:
                other_writer.execute("SET lock_timeout = '3s'")
                # The lock every INSERT and UPDATE takes: a plain CREATE or DROP INDEX would queue
                # it behind the migration (lock_timeout raises LockNotAvailable); CONCURRENTLY does not.
                other_writer.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
                other_writer.execute(f"SELECT count(*) FROM {table}").fetchone()
                other_writer.rollback()
        finally:
            long_writer.rollback()
            output, _ = migration.communicate(timeout=300)
        assert migration.returncode == 0, output


def _indexes(url: str, table: str) -> dict[str, tuple[bool, str]]:
    """The table's indexes: name -> (valid, definition)."""
    with psycopg.connect(url) as check:
        rows = check.execute(
            "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
            [table],
        ).fetchall()
    return {name: (valid, definition) for name, valid, definition in rows}


def test_the_email_index_migration_lets_writes_to_the_users_table_go_on(scratch_database):
    _migrate(scratch_database, "users", "0006")
    _migrate_while_another_transaction_writes(scratch_database, "users", "0007", "users_enduser")
    indexes = _indexes(scratch_database, "users_enduser")
    assert indexes["enduser_email_ws_idx"][0] is True
    assert "enduser_ws_email_idx" not in indexes


def test_the_partial_rule_index_migration_lets_writes_to_the_usage_table_go_on(scratch_database):
    _migrate(scratch_database, "features", "0010")
    _migrate_while_another_transaction_writes(scratch_database, "features", "0011", "features_usage")
    on_rule = {
        name: (valid, definition)
        for name, (valid, definition) in _indexes(scratch_database, "features_usage").items()
        if "(rule_id)" in definition
    }
    # The partial index alone, valid; the full one dropped.
    assert list(on_rule) == ["usage_rule_idx"], on_rule
    valid, definition = on_rule["usage_rule_idx"]
    assert valid is True and "WHERE (rule_id IS NOT NULL)" in definition


def test_the_partial_rule_index_migration_reverses(scratch_database):
    _migrate(scratch_database, "features", "0011")
    _migrate(scratch_database, "features", "0010")
    on_rule = [d for d in _indexes(scratch_database, "features_usage").values() if "(rule_id)" in d[1]]
    assert len(on_rule) == 1 and "WHERE" not in on_rule[0][1], on_rule
    _migrate(scratch_database, "features", "0011")


def test_the_email_index_migration_reverses(scratch_database):
    _migrate(scratch_database, "users", "0007")
    _migrate(scratch_database, "users", "0006")
    with psycopg.connect(scratch_database) as check:
        names = {
            row[0]
            for row in check.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'users_enduser'").fetchall()
        }
    assert "enduser_ws_email_idx" in names
    assert "enduser_email_ws_idx" not in names
